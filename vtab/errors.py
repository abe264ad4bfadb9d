"""Errors that name what a user must fix: the file and the key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def did_you_mean(value: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `known` to `value`, or nothing."""
    close = difflib.get_close_matches(str(value), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class VtabError(Exception):
    """Base class for errors caused by a job's input rather than by a bug."""


class ConfigError(VtabError):
    """A value in a job or pipeline is missing, of the wrong type or out of range.

    `key` is the dotted path of the offending entry (``optim.lr``); `file` is set
    by whoever knows which yaml the value came from. One error can carry several
    problems (`problems`), so that a user sees every mistake of a config at once;
    `key` is then the first one's.
    """

    def __init__(self, key: str, message: str, file: str | None = None,
                 also: tuple[ConfigError, ...] = ()) -> None:
        self.key = key
        self.message = message
        self.file = file
        self.also = also
        super().__init__(str(self))

    @classmethod
    def combine(cls, errors: list[ConfigError]) -> ConfigError:
        """One error for several problems (repeated ones once), in their order."""
        flat = [problem for error in errors for problem in error.problems]
        unique = list({(e.key, e.message): e for e in flat}.values())
        first = unique[0]
        return cls(first.key, first.message, first.file, tuple(unique[1:]))

    @property
    def problems(self) -> list[ConfigError]:
        return [ConfigError(self.key, self.message, self.file), *self.also]

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        pairs = [(self.key, self.message), *((p.key, p.message) for p in self.also)]
        problems = "; ".join(f"key '{key}': {message}" for key, message in pairs)
        return where + (f"{len(pairs)} problems: " if self.also else "") + problems

    def in_file(self, file: str) -> ConfigError:
        """Return a copy that names `file` (keeps an already named file)."""
        return ConfigError(self.key, self.message, self.file or file, self.also)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems with every key under `prefix` (``stages.s.processor``)."""
        return ConfigError.combine([ConfigError(f"{prefix}.{p.key}", p.message, p.file)
                                    for p in self.problems])


@dataclass(frozen=True)
class Advice:
    """Not an error, but worth knowing before queuing (weights not in the local cache yet)."""

    key: str
    message: str


class DataError(VtabError):
    """A dataset folder, split file or image is missing or malformed."""


class RunnerEnvironmentError(Exception):
    """This runner's installation cannot run the job (a broken torch, say).

    Not the job's fault: the runner returns the job to the queue and stops,
    instead of crashing every job it would claim.
    """
