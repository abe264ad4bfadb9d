"""A runner's peak resident memory is bounded by the largest split it works on, not by the number
of jobs it has run: one runner process trains a head on each of several datasets in turn, and
each job's provenance records the runner's peak so far."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtab import yamlio
from vtab.fsutil import atomic_write

REPO = Path(__file__).resolve().parent.parent
DATASETS, TRAIN, EVAL, SIZE = 6, 250, 60, 128
FEATURE_MIB = (TRAIN + EVAL) * 3 * SIZE * SIZE * 4 / 2**20  # one dataset's float32 features
# A peak that grows by this much after the second job means the runner keeps what earlier
# jobs loaded. (It often rises once, at the second job, by up to about 65 MiB in the runs
# tried, and then stays put.)
ALLOWED_GROWTH_MIB = 1.5 * FEATURE_MIB


def write_datasets(root: Path) -> None:
    """Datasets of random 8 x 8 images (distinct content: no rows are shared), 10 classes; at
    SIZE px a flattened image is 49,152 features, so each dataset's features are 58 MiB."""
    for number in range(DATASETS):
        rng = np.random.default_rng(number)
        folder = root / f"set{number}"
        (folder / "images").mkdir(parents=True)
        for split, count in (("train", TRAIN), ("val", EVAL)):
            lines = []
            for index in range(count):
                relative = f"images/{split}{index:04d}.png"
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / relative)
                lines.append(f"{relative} {index % 10}\n")
            (folder / f"{split}.txt").write_text("".join(lines))


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_jobs_run(tmp_path: Path) -> None:
    assert (DATASETS - 2) * FEATURE_MIB > 2 * ALLOWED_GROWTH_MIB  # keeping them would show
    data = tmp_path / "data"
    write_datasets(data)
    doc = {"name": "memory", "current_stage": "datasets",
           "config": {"data": {"root": str(data), "train_split": "train", "eval_split": "val"},
                      "backbone": {"name": "torch.nn:Flatten", "source": "module",
                                   "weights": "none"},
                      "features": {"image_size": SIZE, "batch_size": 50},
                      "head": {"kind": "linear"},
                      "optim": {"epochs": 2, "batch_size": 125, "lr": 0.01},
                      "seed": 0, "metric": "top1"},
           "stages": {"datasets": {"grid": {"dataset": [f"set{n}" for n in range(DATASETS)]},
                                   "child_stage": "probe"},
                      "probe": {"hyperparams": {"kind": "linear_probe"}}}}
    area = tmp_path / "work"
    area.mkdir()
    atomic_write(area / "memory.yaml", yamlio.dump(doc) + "...\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "main_runner.py"), "--work_area", str(area),
         "--devices", "cpu", "--max_batch", "1", "--cache_dir", str(tmp_path / "cache"),
         "--module_backbones", "torch.nn", "--no_progress", "--poll_interval", "0.05"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [yamlio.load_mapping(path) for path in (area / "finished").rglob("*__*.yaml")]
    assert len(jobs) == DATASETS
    assert len({job["provenance"]["runner"] for job in jobs}) == 1
    # A process's peak only grows: the least is the first job's, the greatest the last's.
    peaks = sorted(job["provenance"]["runner_peak_memory_mib"] for job in jobs)
    assert peaks[-1] - peaks[1] < ALLOWED_GROWTH_MIB, (
        f"the runner's peak grew from {peaks[1]} to {peaks[-1]} MiB over its last "
        f"{DATASETS - 2} jobs of {FEATURE_MIB:.0f} MiB of features each: {peaks}")
