"""Dataset folders under a data root, in one of two layouts, recognised by the split's name.

* Split files (VTAB-1K's layout): ``<root>/<dataset>/<split>.txt`` with ``<image path> <label>``
  lines, or for multi-label data ``<image path> <label>[,<label>...]``, where a label with a
  trailing ``?`` is "difficult" (VOC07's flag: left out of the training loss and of AP).
* Class folders: ``<root>/<dataset>/<split>/<class>/<image>``. Classes are numbered in the sorted
  order of the class-folder names of all split folders of the dataset, so that every split
  numbers them alike.

A dataset folder holding both ``<name>.txt`` and ``<name>/`` is refused (mixed layouts). Image
paths are relative to ``<root>/<dataset>/``. Split files are parsed strictly, so a typo surfaces
as an error naming the file and line instead of as a silently smaller dataset. A job chooses the
folder it reads, so what it can make a runner read is bounded: image paths must stay inside the
dataset folder (also once links are followed; listing a split folder follows no folder link out
of it), images may not decode to more than `MAX_IMAGE_PIXELS`, split files may not be larger than
`MAX_SPLIT_FILE_BYTES`, and listings stop at `MAX_FOLDER_FILES` entries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import stat
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch.utils.data import Dataset

from vtab.errors import ConfigError, DataError, VtabError
from vtab.evaluation.schemas import TASKS
from vtab.fsutil import sha256_hex
from vtab.vtab1k import VTAB1K_DATASETS

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
# Line counts fixed by the VTAB-1K protocol; test sizes differ per dataset.
EXPECTED_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}
# Pillow's own default bound (its DecompressionBombWarning): 256 MiB once decoded as RGB, a
# 9459 x 9459 image. VTAB's images are a few hundred pixels a side and a 48-megapixel camera's
# photos fit; a small file that claims more is a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485
# About five million lines of the usual length: far above any benchmark's test split.
MAX_SPLIT_FILE_BYTES = 256 * 2**20
# Entries (files and folders, taken or not) one listing of a dataset or split folder may visit.
MAX_FOLDER_FILES = 5_000_000

MAX_CLASSES = 1_000_000  # labels are 0 .. MAX_CLASSES - 1: a linear head holds a column each

# The files a class folder contributes (case-insensitive); others (a README, say) are passed over.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class LabelSet:
    """The labels of one image of a multi-label split: sorted, disjoint class numbers.

    `difficult` ones are neither present nor absent: left out of the loss and of AP.
    """

    positive: tuple[int, ...]
    difficult: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for part in (self.positive, self.difficult):
            if any(a >= b for a, b in itertools.pairwise(part)):
                raise ValueError("a LabelSet's labels must be sorted and distinct")
        if set(self.positive) & set(self.difficult):
            raise ValueError("a LabelSet's positive and difficult labels must be disjoint")


Label = int | LabelSet


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError("data.task", f"unknown task {task!r}: one of {', '.join(TASKS)}")


def parse_split_text(text: str, source: Path, task: str = "single_label") -> list[
        tuple[str, Label]]:
    """Parse split file content; `source` only names the file in errors. Blank lines are skipped.

    With task ``multi_label`` every label is a `LabelSet` (a plain ``<path> <label>`` line gives a
    one-label set). Errors name the line but never quote it: a job chooses which file is read (its
    data root), and its crash record must not carry another file's content back to it.
    """
    return _parse_lines(text, source, task)[0]


def _parse_lines(text: str, source: Path, task: str) -> tuple[list[tuple[str, Label]], bool]:
    """(entries, whether any line had multi-label syntax: a ',' or a '?')."""
    multi = task == "multi_label"
    entries: list[tuple[str, Label]] = []
    seen_multi = False
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source}:{number}"
        if multi and len(fields) == 1:
            raise DataError(f"{where}: empty label set: every image needs at least one label")
        if len(fields) != 2:
            shape = "<label>[,<label>...]" if multi else "<label>"
            raise DataError(f"{where}: expected '<image path> {shape}', got {len(fields)} fields")
        path, field = fields
        problem = _path_problem(path)
        if problem is not None:
            raise DataError(f"{where}: the image path {problem}")
        syntax = "," in field or "?" in field
        seen_multi = seen_multi or syntax
        if multi:
            entries.append((path, _label_set(field, where)))
        elif syntax:
            raise DataError(f"{where}: a multi-label line (labels separated by ',' or marked "
                            "difficult with '?'): set data.task: multi_label to read this file")
        else:
            entries.append((path, _label(field, where)))
    return entries, seen_multi


def _label(token: str, where: str) -> int:
    # isdigit rejects signs and decimals; isascii rejects other scripts' digits.
    if not (token.isascii() and token.isdigit()):
        raise DataError(f"{where}: the label is not a non-negative integer")
    if len(token) > 7 or int(token) >= MAX_CLASSES:  # a head has a column per class
        raise DataError(f"{where}: the label is {MAX_CLASSES} or more; labels number the "
                        f"classes from 0 (at most {MAX_CLASSES} classes)")
    return int(token)


def _label_set(field: str, where: str) -> LabelSet:
    tokens = field.split(",")
    if not any(tokens):
        raise DataError(f"{where}: empty label set: every image needs at least one label")
    positive, difficult = [], []
    for token in tokens:
        if not token:
            raise DataError(f"{where}: an empty label (two commas in a row, or one at an end)")
        hard = token.endswith("?")
        (difficult if hard else positive).append(_label(token[:-1] if hard else token, where))
    if len(set(positive + difficult)) != len(positive) + len(difficult):
        raise DataError(f"{where}: a label appears more than once")
    return LabelSet(tuple(sorted(positive)), tuple(sorted(difficult)))


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


def read_split_file(path: Path, task: str = "single_label") -> list[tuple[str, Label]]:
    return parse_split_text(_read_bounded(path, MAX_SPLIT_FILE_BYTES).decode("utf-8"), path,
                            task)


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
    """One split (a parsed split file or a listed split folder); images are not opened.

    `file` is the split file, or the split folder for class folders; `class_names` is set for
    class folders only (label i is class_names[i]). Multi-label splits hold `LabelSet` labels.
    """

    dataset: str
    name: str
    folder: Path
    file: Path
    sha256: str
    entries: tuple[tuple[str, Label], ...]
    task: str = "single_label"
    class_names: tuple[str, ...] | None = None

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]

    @property
    def labels(self) -> list[Label]:
        return [label for _, label in self.entries]

    def subset(self, indices: Sequence[int]) -> Split:
        """The entries at `indices`, in that order (for extraction; `sha256` stays the file's)."""
        return replace(self, entries=tuple(self.entries[i] for i in indices))


def _require_folder(path: Path, key: str, what: str) -> None:
    if not path.is_dir():
        raise ConfigError(key, f"{what} {path.absolute()} does not exist")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_dataset(folder: Path) -> tuple[set[str], set[str]]:
    """(split file names, split folder names) of a dataset folder: the stems of its plain
    ``*.txt`` files and the names of its folders, hidden ones left out."""
    files, folders = set(), set()
    with os.scandir(folder) as listing:
        for count, entry in enumerate(listing, start=1):
            if count > MAX_FOLDER_FILES:
                raise DataError(f"dataset folder {folder} holds more than {MAX_FOLDER_FILES} "
                                "entries, the most listed")
            if _hidden(entry.name):
                continue
            if entry.name.endswith(".txt"):
                if entry.is_file():
                    files.add(entry.name[:-4])
            elif entry.is_dir():
                folders.add(entry.name)
    return files, folders


def _mixed(folder: Path, files: set[str], folders: set[str]) -> str | None:
    clash = sorted(files & folders)
    if not clash:
        return None
    shown = "; ".join(f"{folder / name}.txt and {folder / name}/" for name in clash[:3])
    return (f"mixed layouts in dataset folder {folder}: split file and split folder of the "
            f"same name ({shown}{'; ...' if len(clash) > 3 else ''}): keep one of each pair")


def _available(files: set[str], folders: set[str]) -> str:
    return (f"split files there: {', '.join(sorted(files)) or 'none'}; "
            f"split folders there: {', '.join(sorted(folders)) or 'none'}")


def open_split(root: Path, dataset: str, split: str, *, key: str,
               task: str = "single_label") -> Split:
    """Read split `split` of ``<root>/<dataset>``: ``<split>.txt`` or the class folders of
    ``<split>/``. `key` is the config key that chose `split`."""
    _check_task(task)
    _require_folder(root, "data.root", "data root folder")
    folder = root / dataset
    _require_folder(folder, "dataset", "dataset folder")
    try:
        files, folders = _scan_dataset(folder)
    except DataError as exc:
        raise ConfigError(key, str(exc)) from None
    mixed = _mixed(folder, files, folders)
    if mixed is not None:
        raise ConfigError(key, mixed)
    if split in folders:
        return _open_split_folder(folder, dataset, split, folders, key, task)
    file = folder / f"{split}.txt"
    if split not in files:
        what = "is not a file" if file.exists() else "does not exist"
        raise ConfigError(key, f"split file {file.absolute()} {what}, nor is there a split "
                               f"folder {split}/ ({_available(files, folders)})")
    stamp = file.stat()
    try:
        sha256, entries = _read_split(file, (stamp.st_ino, stamp.st_size, stamp.st_mtime_ns,
                                             stamp.st_ctime_ns), task)
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"split file {file}: not UTF-8 text (offset {exc.start})") from None
    except DataError as exc:  # a bad line: name the key that chose this split file too
        raise ConfigError(key, f"split file {exc}") from None
    if not entries:
        raise ConfigError(key, f"split file {file} has no entries")
    return Split(dataset, split, folder, file, sha256, entries, task)


@functools.lru_cache(maxsize=256)
def _read_split(file: Path, stamp: tuple[int, int, int, int], task: str) -> tuple[
        str, tuple[tuple[str, Label], ...]]:
    """(sha256, entries) of a split file, parsed once while its `stamp` (inode, size, mtime,
    ctime) stays the same: a plan opens each split file once for every job that reads it. Any
    write changes the ctime, which no one can set back."""
    data = _read_bounded(file, MAX_SPLIT_FILE_BYTES)
    return hashlib.sha256(data).hexdigest(), tuple(parse_split_text(data.decode("utf-8"), file,
                                                                    task))


# -- class folders -------------------------------------------------------------------------------


def _open_split_folder(folder: Path, dataset: str, split: str, folders: set[str], key: str,
                       task: str) -> Split:
    where = folder / split
    if task == "multi_label":
        raise ConfigError("data.task", f"{where} is a split folder: class folders give one label "
                                       "per image, so the task is single_label there")
    try:
        classes = class_folder_names(folder, folders)
        sha256, entries = _list_split_folder(folder, split, classes)
    except DataError as exc:
        raise ConfigError(key, str(exc)) from None
    except OSError as exc:
        raise ConfigError(key, f"split folder {where} cannot be listed: {exc.strerror}") from None
    if not entries:
        raise ConfigError(key, f"split folder {where} holds no images in class folders "
                               f"(<split>/<class>/<image>, with {'/'.join(sorted(IMAGE_SUFFIXES))}"
                               " images)")
    return Split(dataset, split, folder, where, sha256, entries, task, classes)


def _name_problem(name: str, parent: Path) -> DataError | None:
    """Why a file or folder name can not become part of an image path, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return DataError(f"a name in {parent} is not UTF-8: rename it")
    problem = _path_problem(name)
    return None if problem is None else DataError(f"a name in {parent} {problem}: rename it")


def _enter(path: Path, inside: Path, what: str) -> Path:
    """The real path of folder `path`, which must lie within `inside` (links followed)."""
    real = path.resolve()
    if not real.is_relative_to(inside):
        raise DataError(f"{what} {path} leads to {real}, outside the dataset folder {inside}: "
                        "folders must lie inside it (to keep them elsewhere, link the whole "
                        "dataset folder)")
    return real


class _Listing:
    """Folder entries listed against one bound of MAX_FOLDER_FILES in all."""

    def __init__(self, what: str) -> None:
        self.what, self.left = what, MAX_FOLDER_FILES

    def entries(self, folder: Path) -> Iterator[os.DirEntry[str]]:
        with os.scandir(folder) as listing:
            for entry in listing:
                self.left -= 1
                if self.left < 0:
                    raise DataError(f"{self.what} more than {MAX_FOLDER_FILES} entries, the "
                                    "most listed")
                yield entry


def class_folder_names(folder: Path, split_folders: Iterable[str]) -> tuple[str, ...]:
    """The sorted class-folder names found in any of the split folders of dataset `folder`."""
    inside = folder.resolve()
    classes: set[str] = set()
    listing = _Listing(f"the split folders of {folder} hold")
    for split in sorted(split_folders):
        where = folder / split
        _enter(where, inside, "split folder")
        for entry in listing.entries(where):
            if not _hidden(entry.name) and entry.is_dir():
                problem = _name_problem(entry.name, where)
                if problem is not None:
                    raise problem
                classes.add(entry.name)
    if len(classes) > MAX_CLASSES:
        raise DataError(f"the split folders of {folder} hold more than {MAX_CLASSES} class "
                        "folders, the most classes")
    return tuple(sorted(classes))


# A split folder's listing, kept while none of the folders it went through changed: any entry
# added, removed or renamed in a folder changes its ctime, which no one can set back.
_Stamps = tuple[tuple[str, int, int, int], ...]
_LISTINGS: OrderedDict[tuple[str, str, tuple[str, ...]], tuple[
    _Stamps, str, tuple[tuple[str, int], ...]]] = OrderedDict()
_LISTINGS_KEPT = 32


def _stamp(path: str) -> tuple[str, int, int, int]:
    status = os.stat(path)
    return path, status.st_ino, status.st_mtime_ns, status.st_ctime_ns


def _list_split_folder(folder: Path, split: str, classes: tuple[str, ...]) -> tuple[
        str, tuple[tuple[str, int], ...]]:
    """(sha256 of the sorted "<path> <label>" lines, entries) of split folder `split`."""
    inside = folder.resolve()
    cache_key = (str(folder / split), str(inside), classes)
    cached = _LISTINGS.get(cache_key)
    if cached is not None:
        with contextlib.suppress(OSError):
            if all(_stamp(stamp[0]) == stamp for stamp in cached[0]):
                _LISTINGS.move_to_end(cache_key)
                return cached[1], cached[2]
    number = {name: label for label, name in enumerate(classes)}
    entries: list[tuple[str, int]] = []
    visited: list[str] = []  # the folders listed, for the cache's stamps
    top = folder / split
    bounded = _Listing(f"split folder {top} holds")
    _enter(top, inside, "split folder")
    with os.scandir(top) as listing:
        tops = sorted(entry.name for entry in listing if not _hidden(entry.name))
    visited.append(str(top))
    for name in tops:
        path = top / name
        if path.is_dir():
            label = number.get(name)
            if label is None:  # made since the classes were numbered
                raise DataError(f"class folder {path} changed while it was being listed")
            # (folder, its path relative to the dataset folder, real paths of its ancestors)
            stack = [(path, f"{split}/{name}", (str(_enter(path, inside, "class folder")),))]
            while stack:
                current, relative, ancestors = stack.pop()
                visited.append(str(current))
                for entry in bounded.entries(current):
                    if _hidden(entry.name):
                        continue
                    is_dir = entry.is_dir()
                    if not is_dir and os.path.splitext(entry.name)[1].lower() not in \
                            IMAGE_SUFFIXES:
                        continue
                    problem = _name_problem(entry.name, current)
                    if problem is not None:
                        raise problem
                    child = f"{relative}/{entry.name}"
                    if not is_dir:
                        entries.append((child, label))
                        continue
                    real = str(_enter(Path(entry.path), inside, "folder")
                               if entry.is_symlink() else Path(ancestors[-1]) / entry.name)
                    if real in ancestors:
                        raise DataError(f"folder link {entry.path} leads back to a folder "
                                        "that holds it (a loop)")
                    stack.append((Path(entry.path), child, (*ancestors, real)))
        elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
            raise DataError(f"split folder {top} holds images outside class folders: "
                            f"images go in {top}/<class>/")
    entries.sort()
    digest = hashlib.sha256()
    for path_text, label in entries:
        digest.update(f"{path_text} {label}\n".encode())
    result = (digest.hexdigest(), tuple(entries))
    with contextlib.suppress(OSError):
        _LISTINGS[cache_key] = (tuple(_stamp(path) for path in visited), *result)
        while len(_LISTINGS) > _LISTINGS_KEPT:
            _LISTINGS.popitem(last=False)
    return result


# -- what jobs use -------------------------------------------------------------------------------


def image_digests(split: Split) -> list[str]:
    """The sha256 of each image's bytes, in split order: an image's identity across splits that
    keep copies of it in folders of their own."""
    inside = split.folder.resolve()
    digests = []
    for path, _ in split.entries:
        file = split.folder / path
        where = f"image {file} (listed in {split.file})"
        try:
            with _open_inside(file, inside, where) as handle:
                digests.append(sha256_hex(handle))
        except FileNotFoundError as exc:
            raise DataError(f"{where} does not exist") from exc
    return digests


def label_text(label: Label) -> str:
    """A label as a split file writes it: ``3``; ``1,4,7?`` for a multi-label image (``?``
    marks a difficult label)."""
    if isinstance(label, LabelSet):
        marked = [(c, "") for c in label.positive] + [(c, "?") for c in label.difficult]
        return ",".join(f"{c}{mark}" for c, mark in sorted(marked))
    return str(label)


def sibling_splits(split: Split) -> list[Split]:
    """The other splits of `split`'s dataset in the same layout, read for the same task (the
    standard ones first); ones that are broken are left out (they are not this job's input, so
    their errors belong to the jobs that read them)."""
    try:
        files, folders = _scan_dataset(split.folder)
    except (VtabError, OSError):
        return []
    names = folders if split.class_names is not None else files
    ordered = [name for name in SPLITS if name in names] + sorted(names - set(SPLITS))
    siblings = []
    for name in ordered:
        if name != split.name:
            with contextlib.suppress(VtabError, OSError):
                siblings.append(open_split(split.folder.parent, split.dataset, name, key=name,
                                           task=split.task))
    return siblings


def _largest(label: Label) -> int:
    if isinstance(label, LabelSet):
        return max(label.positive[-1:] + label.difficult[-1:])
    return label


def num_classes(splits: Iterable[Split]) -> int:
    """The number of class names (class folders), else the largest label + 1 (difficult ones
    included) over `splits`: a class absent from every split still counts if below."""
    return max(len(split.class_names) if split.class_names is not None
               else max(_largest(label) for label in split.labels) + 1 for split in splits)


def targets(split: Split, num_classes: int) -> torch.Tensor:
    """The labels of `split` as a tensor: int64 [N] for single_label; for multi_label int8
    [N, num_classes] with 1 = present, 0 = absent, -1 = difficult."""
    labels = split.labels
    if split.task == "single_label":
        values = torch.tensor([int(label) for label in labels], dtype=torch.int64)
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{split.file}: a label is outside 0 .. {num_classes - 1}")
        return values
    result = torch.zeros((len(labels), num_classes), dtype=torch.int8)
    for value, part in ((1, "positive"), (-1, "difficult")):
        rows = [row for row, label in enumerate(labels) for _ in getattr(label, part)]
        cols = [col for label in labels for col in getattr(label, part)]
        if cols and max(cols) >= num_classes:
            raise ValueError(f"{split.file}: a label is outside 0 .. {num_classes - 1}")
        result[rows, cols] = value
    return result


class ImageSplit(Dataset):
    """The images of a `Split` as (transform(RGB image), label, index) triples; the label is -1
    for multi-label splits (their labels come from `targets`).

    With a `seed`, a random transform (an augmentation) of image i draws from torch's CPU
    generator seeded by (seed, i): the same for an image whatever the DataLoader's workers and
    batches, and the caller's generator is left as it was."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], Any],
                 seed: int | None = None) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed
        self.inside = split.folder.resolve()  # where every image must lie, links followed

    def __len__(self) -> int:
        return len(self.split.entries)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path, label = self.split.entries[index]
        plain = label if isinstance(label, int) else -1
        image = self._rgb(self.split.folder / path)
        if self.seed is None:
            return self.transform(image), plain, index
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed((self.seed * 1_000_003 + index) % 2**63)
            return self.transform(image), plain, index

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


# -- the check command ---------------------------------------------------------------------------


def _sample(items: Sequence[str], count: int) -> list[str]:
    """Up to `count` items spread evenly over `items` (first and last included)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / max(count - 1, 1)
    return [items[round(i * step)] for i in range(count)]


@dataclass
class _Checked:
    """What checking one split found."""

    summary: str
    problems: list[str]
    sampled: int = 0
    present: int = 0
    multi_label: bool = False
    difficult: int = 0


def _check_entries(folder: Path, split: str, where: Path, paths: Sequence[str], samples: int,
                   multi_label: bool = False, difficult: int = 0) -> _Checked:
    problems = []
    expected = EXPECTED_SIZES.get(split)
    if expected is not None and len(paths) != expected:
        what = "lines" if where.suffix == ".txt" else "images"
        problems.append(f"{where} has {len(paths)} {what}, expected {expected}")
    picked = _sample(paths, samples)
    absent = [path for path in picked if not (folder / path).is_file()]
    problems += [f"image {folder / path} (listed in {where}) missing" for path in absent]
    return _Checked(f"{split} {len(paths)}", problems, len(picked), len(picked) - len(absent),
                    multi_label, difficult)


def _check_split_file(folder: Path, split: str, samples: int) -> _Checked:
    file = folder / f"{split}.txt"
    if not file.is_file():
        return _Checked(f"{split} missing", [f"split file {file} missing"])
    try:
        text = _read_bounded(file, MAX_SPLIT_FILE_BYTES).decode("utf-8")
        entries, multi = _parse_lines(text, file, "multi_label")
    except UnicodeDecodeError as exc:
        return _Checked(f"{split} malformed", [f"{file}: not UTF-8 text (offset {exc.start})"])
    except (DataError, OSError) as exc:
        return _Checked(f"{split} malformed", [str(exc)])
    if not entries:
        return _Checked(f"{split} empty", [f"split file {file} has no entries"])
    difficult = sum(len(label.difficult) for _, label in entries)
    return _check_entries(folder, split, file, [path for path, _ in entries], samples, multi,
                          difficult)


def _check_split_folder(folder: Path, split: str, classes: tuple[str, ...],
                        samples: int) -> _Checked:
    where = folder / split
    if not where.is_dir():
        return _Checked(f"{split} missing", [f"split folder {where} missing"])
    try:
        _, entries = _list_split_folder(folder, split, classes)
    except (DataError, OSError) as exc:
        return _Checked(f"{split} unreadable", [str(exc)])
    if not entries:
        return _Checked(f"{split} empty", [f"split folder {where} holds no images in class "
                                           "folders"])
    return _check_entries(folder, split, where, [path for path, _ in entries], samples)


def check_dataset(root: Path, dataset: str, samples: int = 5) -> tuple[str, list[str]]:
    """A one-line summary of one dataset folder and the list of its problems.

    The layout: split files if the folder has any ``.txt`` file, else class folders (every
    folder a split). Where a split carries one of VTAB-1K's names (train800, val200,
    train800val200; or the dataset is a VTAB-1K task) all four must be there, train800/val200/
    train800val200 with 800/200/1000 images. Checks
    `samples` image files per split (spread over it), not all of them.
    """
    folder = root / dataset
    if not folder.is_dir():
        return f"{dataset}: folder missing", [f"{dataset}: folder {folder} missing"]
    try:
        files, folders = _scan_dataset(folder)
    except (DataError, OSError) as exc:
        return f"{dataset}: unreadable", [f"{dataset}: {exc}"]
    mixed = _mixed(folder, files, folders)
    if mixed is not None:
        return f"{dataset}: mixed layouts", [f"{dataset}: {mixed}"]
    use_folders = bool(folders) and not files
    present = folders if use_folders else files
    vtab_names = set(EXPECTED_SIZES)  # VTAB-1K's own split names ("test" is everyone's)
    vtab = bool(present & vtab_names) or dataset in VTAB1K_DATASETS
    if vtab and not present & set(SPLITS):
        use_folders = False  # a VTAB-1K task without its splits: report the split files missing
    names = list(SPLITS) if vtab else sorted(present)
    if not names:
        return f"{dataset}: empty", [f"{dataset}: no split files (<split>.txt) or split folders "
                                     f"(<split>/<class>/<image>) in {folder}"]
    parts: list[str] = []
    problems: list[str] = []
    checked: list[_Checked] = []
    if use_folders:
        try:
            classes = class_folder_names(folder, folders)
        except (DataError, OSError) as exc:
            return f"{dataset}: unreadable", [f"{dataset}: {exc}"]
        parts.append(f"class folders ({len(classes)} classes)")
        checked = [_check_split_folder(folder, name, classes, samples) for name in names]
    else:
        checked = [_check_split_file(folder, name, samples) for name in names]
    for result in checked:
        parts.append(result.summary)
        problems += [f"{dataset}: {problem}" for problem in result.problems]
    if any(result.multi_label for result in checked):
        parts.append(f"multi-label ({sum(r.difficult for r in checked)} difficult labels)")
    parts.append(f"sampled images present {sum(r.present for r in checked)}/"
                 f"{sum(r.sampled for r in checked)}")
    return f"{dataset}: {', '.join(parts)}", problems


def check_root(root: Path, datasets: Iterable[str]) -> tuple[list[str], list[str]]:
    """Summaries and problems of every dataset under a data root."""
    if not root.is_dir():
        return [], [f"data root {root.absolute()} does not exist"]
    lines, problems = [], []
    for dataset in datasets:
        line, found = check_dataset(root, dataset)
        lines.append(line + ("" if found else " - ok"))
        problems += found
    return lines, problems
