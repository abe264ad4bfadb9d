"""scikit-learn's bundled digits (1797 8x8 images) laid out as three small datasets.

* ``digits``: VTAB-1K split files (the debug pipeline's data; its files never change).
* ``digits_folders``: the same images and splits as class folders ``<split>/d<digit>/<index>.png``.
* ``digit_pairs``: multi-label split files; each image is two digits side by side (8x16 pixels),
  labelled with the classes present; a few test lines carry a "difficult" label (``3?``).

They ship with the dependencies, so the demos and the tests need no download.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vtab.errors import DataError, VtabError
from vtab.evaluation.data import SPLITS, open_split, read_split_file
from vtab.fsutil import atomic_write

NAME = "digits"
FOLDERS_NAME = "digits_folders"
PAIRS_NAME = "digit_pairs"
SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
PAIR_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 800}
CLASS_NAMES: tuple[str, ...] = tuple(f"d{digit}" for digit in range(10))
PAIRS_DIFFICULT = 40  # test lines with one extra difficult label: 5% of 800


def is_complete(folder: Path) -> bool:
    """Whether all four split files of ``digits`` exist with their expected line counts."""
    return _files_complete(folder, SIZES, "single_label")


def _files_complete(folder: Path, sizes: dict[str, int], task: str) -> bool:
    try:
        return all(len(read_split_file(folder / f"{split}.txt", task)) == sizes[split]
                   for split in SPLITS)
    except (OSError, DataError, UnicodeDecodeError):
        return False


def _folders_complete(folder: Path) -> bool:
    """Whether every split folder of ``digits_folders`` holds its images in the ten classes."""
    try:
        splits = [open_split(folder.parent, folder.name, split, key=split) for split in SPLITS]
    except (OSError, VtabError):
        return False
    return all(len(split.entries) == SIZES[split.name] and split.class_names == CLASS_NAMES
               for split in splits)


def _png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 0..16 digits image."""
    gray = np.rint(pixels * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def _load() -> tuple[Any, dict[str, np.ndarray]]:
    """scikit-learn's digits and the seed-0 partition: train800 = the first 800 of a shuffle,
    val200 = the next 200, test = the other 797 (sklearn indices)."""
    from sklearn.datasets import load_digits  # only needed when writing

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return digits, {"train800": order[:800], "val200": order[800:1000], "test": order[1000:]}


def write_digits(root: Path) -> Path:
    """Write the three embedded datasets under `root` (each unless complete); returns the
    ``digits`` folder. See `write_embedded`."""
    return write_embedded(root)[NAME]


def write_embedded(root: Path) -> dict[str, Path]:
    """Write ``digits``, ``digits_folders`` and ``digit_pairs`` under `root`, each unless already
    complete; returns their folders by name.

    Split files are written last, so an interrupted run leaves a folder incomplete and the next
    call redoes it (a class-folder dataset is complete when each split holds all its images).
    """
    loaded: list[tuple[Any, dict[str, np.ndarray]]] = []

    def load() -> tuple[Any, dict[str, np.ndarray]]:
        if not loaded:
            loaded.append(_load())
        return loaded[0]

    folders = {NAME: root / NAME, FOLDERS_NAME: root / FOLDERS_NAME, PAIRS_NAME: root / PAIRS_NAME}
    if not is_complete(folders[NAME]):
        _write_vtab(folders[NAME], *load())
    if not _folders_complete(folders[FOLDERS_NAME]):
        _write_folders(folders[FOLDERS_NAME], *load())
    if not _files_complete(folders[PAIRS_NAME], PAIR_SIZES, "multi_label"):
        _write_pairs(folders[PAIRS_NAME], *load())
    return folders


def _write_vtab(folder: Path, digits: Any, parts: dict[str, np.ndarray]) -> None:
    lines: dict[str, list[str]] = {}
    for split, indices in parts.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for index in indices.tolist():
            relative = f"images/{split}/{index:04d}.png"
            atomic_write(folder / relative, _png(digits.images[index]))
            lines[split].append(f"{relative} {int(digits.target[index])}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split in SPLITS:
        atomic_write(folder / f"{split}.txt", "".join(lines[split]))


def _write_folders(folder: Path, digits: Any, parts: dict[str, np.ndarray]) -> None:
    """``<split>/d<digit>/<index>.png``; train800val200 holds copies of train800 and val200."""
    members = {**parts, "train800val200": np.concatenate([parts["train800"], parts["val200"]])}
    for split in SPLITS:
        for name in CLASS_NAMES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for index in members[split].tolist():
            relative = f"{split}/{CLASS_NAMES[int(digits.target[index])]}/{index:04d}.png"
            atomic_write(folder / relative, _png(digits.images[index]))


def compose_pairs(parts: dict[str, np.ndarray], targets: np.ndarray) -> dict[
        str, list[tuple[int, int, tuple[int, ...], int | None]]]:
    """The seed-0 composition of ``digit_pairs``: per split (train800, val200, test), a list of
    (left index, right index, digits present, extra difficult digit or None). Each split's
    pairs take two different images of that split's own source images only, so no image of
    train800 or val200 appears in test."""
    rng = np.random.default_rng(0)
    pairs: dict[str, list[tuple[int, int, tuple[int, ...], int | None]]] = {}
    for split in ("train800", "val200", "test"):
        pairs[split] = []
        for _ in range(PAIR_SIZES[split]):
            left, right = (int(i) for i in rng.choice(parts[split], size=2, replace=False))
            present = tuple(sorted({int(targets[left]), int(targets[right])}))
            pairs[split].append((left, right, present, None))
    for line in sorted(rng.choice(PAIR_SIZES["test"], size=PAIRS_DIFFICULT, replace=False)):
        left, right, present, _ = pairs["test"][line]
        absent = [digit for digit in range(10) if digit not in present]
        pairs["test"][line] = (left, right, present, int(rng.choice(absent)))
    return pairs


def _write_pairs(folder: Path, digits: Any, parts: dict[str, np.ndarray]) -> None:
    """``images/<split>/<n>_<left>_<right>.png`` (sklearn indices of the two halves)."""
    lines: dict[str, list[str]] = {}
    for split, pairs in compose_pairs(parts, digits.target).items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for number, (left, right, present, difficult) in enumerate(pairs):
            relative = f"images/{split}/{number:04d}_{left:04d}_{right:04d}.png"
            side_by_side = np.concatenate([digits.images[left], digits.images[right]], axis=1)
            atomic_write(folder / relative, _png(side_by_side))
            labels = [str(digit) for digit in present]
            if difficult is not None:
                labels.append(f"{difficult}?")
            lines[split].append(f"{relative} {','.join(labels)}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split in SPLITS:
        atomic_write(folder / f"{split}.txt", "".join(lines[split]))
