"""scikit-learn's bundled digits (1797 8x8 images) laid out as a VTAB-1K dataset named ``digits``.

It ships with the dependencies, so the demo and the tests need no download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vtab.errors import DataError
from vtab.evaluation.data import SPLITS, read_split_file
from vtab.fsutil import atomic_write

NAME = "digits"
SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}


def is_complete(folder: Path) -> bool:
    """Whether all four split files exist with their expected line counts."""
    try:
        return all(len(read_split_file(folder / f"{split}.txt")) == SIZES[split]
                   for split in SPLITS)
    except (OSError, DataError):
        return False


def _png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 0..16 digits image."""
    gray = np.rint(pixels * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def write_digits(root: Path) -> Path:
    """Write ``<root>/digits`` unless complete; returns the dataset folder.

    The order is a seed-0 shuffle: train800 = first 800, val200 = next 200, test = the other 797.
    Split files are written last, so an interrupted run leaves the folder incomplete and the next
    call redoes it.
    """
    from sklearn.datasets import load_digits  # only needed when writing

    folder = root / NAME
    if is_complete(folder):
        return folder
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    parts = {"train800": order[:800], "val200": order[800:1000], "test": order[1000:]}
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
    return folder
