"""VTAB-1K folder datasets: ``<root>/<dataset>/<split>.txt`` with ``<image path> <label>`` lines.

Image paths are relative to ``<root>/<dataset>/``. Split files are parsed strictly, so a typo
surfaces as an error naming the file and line instead of as a silently smaller dataset. A job
chooses the folder it reads, so what it can make a runner read is bounded: image paths must stay
inside the dataset folder (also once links are followed), images may not decode to more than
`MAX_IMAGE_PIXELS`, split files may not be larger than `MAX_SPLIT_FILE_BYTES`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image
from torch.utils.data import Dataset

from vtab.errors import ConfigError, DataError, VtabError

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
# Line counts fixed by the VTAB-1K protocol; test sizes differ per dataset.
EXPECTED_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}
# Pillow's own default bound (its DecompressionBombWarning): 256 MiB once decoded as RGB, a
# 9459 x 9459 image. VTAB's images are a few hundred pixels a side and a 48-megapixel camera's
# photos fit; a small file that claims more is a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485
# About five million lines of the usual length: far above any benchmark's test split.
MAX_SPLIT_FILE_BYTES = 256 * 2**20


MAX_CLASSES = 1_000_000  # labels are 0 .. MAX_CLASSES - 1: a linear head holds a column each


def parse_split_text(text: str, source: Path) -> list[tuple[str, int]]:
    """Parse split file content; `source` only names the file in errors. Blank lines are skipped.

    Errors name the line but never quote it: a job chooses which file is read (its data root),
    and its crash record must not carry another file's content back to it.
    """
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{source}:{number}: expected '<image path> <label>', got "
                            f"{len(fields)} fields")
        path, label = fields
        problem = _path_problem(path)
        if problem is not None:
            raise DataError(f"{source}:{number}: the image path {problem}")
        # isdigit rejects signs and decimals; isascii rejects other scripts' digits.
        if not (label.isascii() and label.isdigit()):
            raise DataError(f"{source}:{number}: the label is not a non-negative integer")
        if len(label) > 7 or int(label) >= MAX_CLASSES:  # a head has a column per class
            raise DataError(f"{source}:{number}: the label is {MAX_CLASSES} or more; labels "
                            f"number the classes from 0 (at most {MAX_CLASSES} classes)")
        entries.append((path, int(label)))
    return entries


def _path_problem(path: str) -> str | None:
    """Why `path` could name a file outside the dataset folder (or an odd one), or None."""
    if "\\" in path:  # a folder separator elsewhere, and no image name has one
        return "contains a backslash: separate folders with '/'"
    if path.startswith("/"):
        return "is absolute: image paths are relative to the dataset folder"
    if ".." in path.split("/"):
        return "has a '..' component: image paths must stay inside the dataset folder"
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        return "contains a control character"
    return None


def read_split_file(path: Path) -> list[tuple[str, int]]:
    return parse_split_text(_read_bounded(path, MAX_SPLIT_FILE_BYTES).decode("utf-8"), path)


def _read_bounded(path: Path, limit: int) -> bytes:
    """`path`'s content, if it is a plain file of at most `limit` bytes (`limit` + 1 are read,
    in chunks: a read of n bytes allocates n at once)."""
    chunks: list[bytes] = []
    left = limit + 1
    with _open_plain(path, str(path)) as file:
        while left > 0 and (chunk := file.read(min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
    if left == 0:
        raise DataError(f"{path}: larger than {limit} bytes ({limit // 2**20} MiB), the most "
                        "read from one split file")
    return b"".join(chunks)


@contextlib.contextmanager
def _open_plain(path: Path, where: str) -> Iterator[BinaryIO]:
    """`path` open for reading, if it is a plain file. Opened without blocking: a FIFO in a
    file's place would otherwise wait for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{where} is not a plain file (a folder, FIFO, socket or device)")
    with open(fd, "rb") as handle:
        yield handle


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
    data = _read_bounded(file, MAX_SPLIT_FILE_BYTES)
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
        self.inside = split.folder.resolve()  # where every image must lie, links followed

    def __len__(self) -> int:
        return len(self.split.entries)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path, label = self.split.entries[index]
        return self.transform(self._rgb(self.split.folder / path)), label, index

    def _rgb(self, file: Path) -> Image.Image:
        where = f"image {file} (listed in {self.split.file})"
        try:
            with _open_inside(file, self.inside, where) as handle, warnings.catch_warnings():
                # Pillow warns, then refuses, past its own bound (Image.MAX_IMAGE_PIXELS).
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    _check_pixels(image, where)
                    return image.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"{where} does not exist") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{where} is too large to decode: {exc}") from exc
        # What Pillow raises on damaged files (UnidentifiedImageError is an OSError).
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{where} cannot be read: {exc}") from exc


@contextlib.contextmanager
def _open_inside(file: Path, inside: Path, where: str) -> Iterator[BinaryIO]:
    """`file` open for reading, if it is a plain file within `inside` once links are followed.

    Checked on the open file, so that a link changed between a check and the open cannot lead
    elsewhere.
    """
    with _open_plain(file, where) as handle:
        real = _opened_path(handle, file)
        if not real.is_relative_to(inside):
            raise DataError(f"{where} leads to {real}, outside the dataset folder {inside}: "
                            "images must lie inside it (to keep them elsewhere, link the whole "
                            "dataset folder)")
        yield handle


def _opened_path(handle: BinaryIO, file: Path) -> Path:
    """The real path of the file `handle` has open: from /proc on Linux, else `file` resolved."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
    except OSError:
        return file.resolve()


def _check_pixels(image: Image.Image, where: str) -> None:
    """Refuse, before decoding it, an image that would decode to more than MAX_IMAGE_PIXELS."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{where} is {width} x {height} = {width * height} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS} an image may have (a decompression bomb, or an "
                        "image to shrink first)")


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
