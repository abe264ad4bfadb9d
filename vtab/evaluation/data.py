"""VTAB-1K folder datasets: ``<root>/<dataset>/<split>.txt`` with ``<image path> <label>`` lines.

Image paths are relative to ``<root>/<dataset>/``. Split files are parsed strictly, so a typo
surfaces as an error naming the file and line instead of as a silently smaller dataset.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vtab.errors import ConfigError, DataError, VtabError

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
# Line counts fixed by the VTAB-1K protocol; test sizes differ per dataset.
EXPECTED_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}


def parse_split_text(text: str, source: Path) -> list[tuple[str, int]]:
    """Parse split file content; `source` only names the file in errors. Blank lines are skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{source}:{number}: expected '<image path> <label>', got {line!r}")
        path, label = fields
        # isdigit rejects signs and decimals; isascii rejects other scripts' digits.
        if not (label.isascii() and label.isdigit()):
            raise DataError(f"{source}:{number}: label {label!r} is not a non-negative integer")
        entries.append((path, int(label)))
    return entries


def read_split_file(path: Path) -> list[tuple[str, int]]:
    return parse_split_text(path.read_text(encoding="utf-8"), path)


@dataclass(frozen=True)
class Split:
    """One parsed split file; cheap to build, images are not opened."""

    dataset: str
    name: str
    folder: Path
    file: Path
    sha256: str
    entries: tuple[tuple[str, int], ...]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.entries]

    def subset(self, indices: Sequence[int]) -> Split:
        """The entries at `indices`, in that order (for extraction; `sha256` stays the file's)."""
        return replace(self, entries=tuple(self.entries[i] for i in indices))


def _require_folder(path: Path, key: str, what: str) -> None:
    if not path.is_dir():
        raise ConfigError(key, f"{what} {path.absolute()} does not exist")


def open_split(root: Path, dataset: str, split: str, *, key: str) -> Split:
    """Parse ``<root>/<dataset>/<split>.txt``; `key` is the config key that chose `split`."""
    _require_folder(root, "data.root", "data root folder")
    folder = root / dataset
    _require_folder(folder, "dataset", "dataset folder")
    file = folder / f"{split}.txt"
    if not file.is_file():
        present = sorted(p.stem for p in folder.glob("*.txt") if p.is_file())
        what = "is not a file" if file.exists() else "does not exist"
        raise ConfigError(key, f"split file {file.absolute()} {what} "
                               f"(split files there: {', '.join(present) or 'none'})")
    stat = file.stat()
    try:
        sha256, entries = _read_split(file, (stat.st_ino, stat.st_size, stat.st_mtime_ns,
                                             stat.st_ctime_ns))
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"split file {file}: not UTF-8 text (offset {exc.start})") from None
    except DataError as exc:  # a bad line: name the key that chose this split file too
        raise ConfigError(key, f"split file {exc}") from None
    if not entries:
        raise ConfigError(key, f"split file {file} has no entries")
    return Split(dataset, split, folder, file, sha256, entries)


@functools.lru_cache(maxsize=256)
def _read_split(file: Path, stamp: tuple[int, int, int, int]) -> tuple[
        str, tuple[tuple[str, int], ...]]:
    """(sha256, entries) of a split file, parsed once while its `stamp` (inode, size, mtime,
    ctime) stays the same: a plan opens each split file once for every job that reads it. Any
    write changes the ctime, which no one can set back."""
    data = file.read_bytes()
    return hashlib.sha256(data).hexdigest(), tuple(parse_split_text(data.decode("utf-8"), file))


def sibling_splits(split: Split) -> list[Split]:
    """The other standard splits of `split`'s dataset; ones that are absent or broken are left out
    (they are not this job's input, so their errors belong to the jobs that read them)."""
    siblings = []
    for name in SPLITS:
        if name != split.name:
            with contextlib.suppress(VtabError, OSError):
                siblings.append(open_split(split.folder.parent, split.dataset, name, key=name))
    return siblings


def num_classes(splits: Iterable[Split]) -> int:
    """Max label + 1 over `splits` (a class absent from every split still counts if below)."""
    return max(max(split.labels) for split in splits) + 1


class ImageSplit(Dataset):
    """The images of a `Split` as (transform(RGB image), label, index) triples."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], Any]) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.entries)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path, label = self.split.entries[index]
        file = self.split.folder / path
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"image {file} (listed in {self.split.file}) does not exist") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {file} (listed in {self.split.file}) cannot be read: "
                            f"{exc}") from exc
        return self.transform(rgb), label, index


def _sample(items: Sequence[str], count: int) -> list[str]:
    """Up to `count` items spread evenly over `items` (first and last included)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / max(count - 1, 1)
    return [items[round(i * step)] for i in range(count)]


def _check_split(folder: Path, split: str, samples: int) -> tuple[str, list[str], int, int]:
    """(summary, problems, images sampled, sampled images present) of one split file."""
    file = folder / f"{split}.txt"
    if not file.is_file():
        return f"{split} missing", [f"split file {file} missing"], 0, 0
    try:
        entries = read_split_file(file)
    except DataError as exc:
        return f"{split} malformed", [str(exc)], 0, 0
    problems = []
    expected = EXPECTED_SIZES.get(split)
    if expected is not None and len(entries) != expected:
        problems.append(f"{file} has {len(entries)} lines, expected {expected}")
    picked = _sample([path for path, _ in entries], samples)
    absent = [path for path in picked if not (folder / path).is_file()]
    problems += [f"image {folder / path} (listed in {file}) missing" for path in absent]
    return f"{split} {len(entries)}", problems, len(picked), len(picked) - len(absent)


def check_dataset(root: Path, dataset: str, samples: int = 5) -> tuple[str, list[str]]:
    """A one-line summary of one dataset folder and the list of its problems.

    Checks `samples` image files per split (spread over the file), not all of them.
    """
    folder = root / dataset
    if not folder.is_dir():
        return f"{dataset}: folder missing", [f"{dataset}: folder {folder} missing"]
    parts, problems, sampled, present = [], [], 0, 0
    for split in SPLITS:
        part, found, picked, there = _check_split(folder, split, samples)
        parts.append(part)
        problems += [f"{dataset}: {problem}" for problem in found]
        sampled, present = sampled + picked, present + there
    parts.append(f"sampled images present {present}/{sampled}")
    return f"{dataset}: {', '.join(parts)}", problems


def check_root(root: Path, datasets: Iterable[str]) -> tuple[list[str], list[str]]:
    """Summaries and problems of every dataset under a VTAB-1K root."""
    if not root.is_dir():
        return [], [f"data root {root.absolute()} does not exist"]
    lines, problems = [], []
    for dataset in datasets:
        line, found = check_dataset(root, dataset)
        lines.append(line + ("" if found else " - ok"))
        problems += found
    return lines, problems
