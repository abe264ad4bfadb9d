"""Checkpoint axes: a grid axis whose values are the files a pattern matches, each labelled by the
training step its name holds.

In a grid, ``backbone.weights: {checkpoints: /runs/x/checkpoint_{step}.pth}`` sweeps every file
that the pattern matches with ``{step}`` read as ``*``; the text that stands where ``{step}``
is must be a whole number (the step). Files are looked up each time the grid forks, so a
pipeline queued again finds the checkpoints written since. Glob characters (``*``, ``?``,
``[...]``) may appear elsewhere in the pattern.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtab.errors import ConfigError

STEP = "{step}"
KEY = "checkpoints"  # a grid value {checkpoints: pattern} is a checkpoint axis
LABEL = "step"


def is_checkpoint_axis(value: Any) -> bool:
    """Whether a grid value is a checkpoint axis (a mapping holding the key ``checkpoints``)."""
    return isinstance(value, Mapping) and KEY in value


@dataclass(frozen=True)
class CheckpointAxis:
    """The files of one checkpoint axis, found by `pattern`."""

    pattern: str

    @classmethod
    def parse(cls, value: Mapping[str, Any], where: str) -> CheckpointAxis:
        extra = sorted(set(map(str, value)) - {KEY})
        if extra:
            raise ConfigError(f"{where}.{extra[0]}", f"unknown key of a checkpoint axis (known: "
                                                     f"{KEY})")
        pattern = value[KEY]
        if not isinstance(pattern, str) or pattern.count(STEP) != 1:
            raise ConfigError(f"{where}.{KEY}", f"must be a file pattern holding {STEP} once, "
                                                 "where the training step stands in the names "
                                                 f"(/runs/x/checkpoint_{STEP}.pth); got "
                                                 f"{pattern!r}")
        return cls(str(Path(pattern).expanduser()))

    def _regex(self) -> re.Pattern[str]:
        before, after = self.pattern.split(STEP)
        return re.compile(_glob_regex(before) + r"([^/]*?)" + _glob_regex(after))

    def find(self, where: str) -> list[tuple[int, str]]:
        """(step, path) of every matching file, by step; an error naming the pattern when none
        matches, the file when its step is not a whole number or two files share a step."""
        matched = sorted(p for p in glob.glob(self.pattern.replace(STEP, "*"))
                         if Path(p).is_file())
        if not matched:
            raise ConfigError(f"{where}.{KEY}", f"no file matches {self.pattern!r} (with "
                                                 f"{STEP} read as *): nothing to sweep")
        found: dict[int, str] = {}
        for path in matched:
            step = self.step_of(path, where)
            if step in found:
                raise ConfigError(f"{where}.{KEY}", f"{found[step]} and {path} both hold step "
                                                     f"{step}: keep one of them, or narrow the "
                                                     "pattern")
            found[step] = path
        return sorted(found.items())

    def step_of(self, path: str, where: str) -> int:
        match = self._regex().fullmatch(path)
        text = match.group(1) if match else ""
        if not text.isdigit():
            raise ConfigError(f"{where}.{KEY}", f"cannot read a training step from {path}: "
                                                 f"{text!r} stands where {STEP} is in "
                                                 f"{self.pattern!r}, and a step is a whole "
                                                 "number; narrow the pattern so that it does "
                                                 "not match this file, or rename the file")
        return int(text)


def _glob_regex(text: str) -> str:
    """A regular expression for glob `text`: * and ? within one path part, [...] classes."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        end = text.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif end != -1:
            inner = text[i + 1:end]
            out.append("[" + ("^" + inner[1:] if inner.startswith("!") else inner) + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
