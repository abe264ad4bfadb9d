"""Batched sweep: the tuning stage of one dataset at VTAB-1K scale, drained through the work area.

The VTAB-1K linear protocol tunes learning rate x weight decay x seed (6 x 2 x 2 = 24 jobs) on
train800 -> val200 for every task. The naive way is what the replaced tools do: one training
per job, one job per claim (``--max_batch 1``). vtab's runners claim the queued siblings that
can share a pass and train their heads together. Both ways run the same pipeline with the same
runners (``--devices cpu,cpu`` by default; ``0,0`` for two on GPU 0) on a feature cache warmed
beforehand, so the time is
head training and queue work; both start the same runner processes. Features are the pixels of
16 x 16 images (768 values, the width of ViT-B/16 features), 100 classes, 1,000 images.
Each job's result must agree between the two ways within 1e-5.

    python bench/batched_sweep.py [--devices cpu,cpu] [--epochs 100]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vtab import yamlio  # noqa: E402
from vtab.evaluation.probe import run_linear_probe  # noqa: E402
from vtab.fsutil import atomic_write  # noqa: E402
from vtab.results import one_per_pass  # noqa: E402

CLASSES, SIZE = 100, 16  # 3 x 16 x 16 = 768 features
DIM = 3 * SIZE * SIZE
SPLIT_SIZES = {"train800": 800, "val200": 200, "test": 100}
JOBS, SEEDS, BATCH = 24, 2, 128  # the grid below; heads of one seed form one wide layer
TOLERANCE = 1e-5
BACKBONE = {"name": "torch.nn:Flatten", "source": "module", "weights": "none"}


def write_dataset(folder: Path, seed: int = 0) -> None:
    """Images whose colours depend on their class, plus noise: a learnable 100-way task."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0, 255, size=(CLASSES, SIZE, SIZE, 3))
    lines: dict[str, list[str]] = {}
    for split, count in SPLIT_SIZES.items():
        (folder / "images" / split).mkdir(parents=True)
        lines[split] = []
        for index in range(count):
            label = index % CLASSES
            pixels = np.clip(means[label] + rng.normal(0, 250, means[label].shape), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
            relative = f"images/{split}/{index:04d}.png"
            atomic_write(folder / relative, buffer.getvalue())
            lines[split].append(f"{relative} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, content in lines.items():
        (folder / f"{split}.txt").write_text("".join(content))


def pipeline(root: Path, epochs: int) -> dict[str, Any]:
    return {
        "name": "sweep", "current_stage": "tune",
        "config": {"dataset": "synthetic", "data": {"root": str(root)}, "backbone": BACKBONE,
                   # fp32 on any device: the features warmed on the CPU serve GPU runners too
                   "features": {"image_size": SIZE, "batch_size": 256, "precision": "fp32"},
                   "head": {"kind": "linear", "feature_norm": "standardize"},
                   "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
                             "epochs": epochs, "batch_size": BATCH, "warmup_epochs": 5},
                   "seed": 0, "metric": "top1"},
        "stages": {
            "tune": {"grid": {"optim.lr": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
                              "optim.weight_decay": [0.0, 0.0001], "seed": [0, 1]},
                     "child_stage": "train_val"},
            "train_val": {"hyperparams": {"kind": "linear_probe", "data.train_split": "train800",
                                          "data.eval_split": "val200"}},
        },
    }


@dataclass(frozen=True)
class Drained:
    wall_s: float  # from starting the runners to their exit, as a user waits
    training_s: float  # the passes' own time, summed (runners run passes at once)
    passes: int
    results: dict[str, float]  # by job id


def drain(area: Path, doc: dict[str, Any], cache: Path, devices: str,
          max_batch: int) -> Drained:
    """Queue the pipeline, run the runners until drained."""
    area.mkdir()
    atomic_write(area / "sweep.yaml", yamlio.dump(doc) + "...\n")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "main_runner.py"), "--work_area", str(area),
                    "--devices", devices, "--max_batch", str(max_batch),
                    "--cache_dir", str(cache), "--module_backbones", "torch.nn",
                    "--no_progress", "--poll_interval", "0.05"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    jobs = [yamlio.load_mapping(path) for path in (area / "finished").rglob("*__*.yaml")]
    passes = one_per_pass(jobs)
    return Drained(seconds, sum(job["report"]["timings"]["total_s"] for job in passes), len(passes),
                   {job["id"]: job["result"] for job in jobs})


def arithmetic_floor(devices: list[str], epochs: int) -> tuple[float, float]:
    """The runner-seconds that the heads' matrix products alone take, however they are
    batched: per head and epoch, a forward and a weight gradient over every training row
    (4 x rows x DIM x CLASSES FLOPs). The rate is measured here on one pass's shapes (a batch of
    rows against every head of one seed), with each runner's share of the CPU threads; returns
    the seconds and the rate in GFLOP/s."""
    import torch

    device = "cpu" if devices[0] == "cpu" else f"cuda:{devices[0]}"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    try:
        rows = torch.randn(BATCH, DIM, device=device)
        weight = torch.randn(DIM, JOBS // SEEDS * CLASSES, device=device)
        grad = torch.randn(BATCH, weight.shape[1], device=device)
        reps = 200
        for _round in ("warm-up", "timed"):  # the last one counts
            if device != "cpu":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(reps):
                rows @ weight
                rows.T @ grad
            if device != "cpu":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    rate = reps * 4 * BATCH * DIM * weight.shape[1] / seconds
    flops = 4 * SPLIT_SIZES["train800"] * DIM * CLASSES * epochs * JOBS
    return flops / rate, rate / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cpu", help="the runners' devices")
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores; runners on {args.devices}, "
          f"{args.epochs} epochs")
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        write_dataset(data / "synthetic")
        doc = pipeline(data, args.epochs)
        warm = {**doc["config"], "optim": {**doc["config"]["optim"], "epochs": 1,
                                           "warmup_epochs": 0},
                "data": {"root": str(data), "train_split": "train800", "eval_split": "val200"}}
        run_linear_probe(warm, cache_dir=cache, progress=False)  # features cached for both
        naive = drain(Path(tmp) / "naive", doc, cache, args.devices, max_batch=1)
        vtab = drain(Path(tmp) / "vtab", doc, cache, args.devices, max_batch=64)
        shutil.rmtree(data)
    ours, theirs = vtab.results, naive.results
    if len(ours) != JOBS or set(ours) != set(theirs):
        raise SystemExit(f"expected the same {JOBS} jobs both ways, got {len(ours)} and "
                         f"{len(theirs)}")
    gap = max(abs(ours[job] - theirs[job]) for job in ours)
    print(f"jobs: {len(ours)}; best val200 top-1 {max(ours.values()):.3f}; "
          f"max |result batched - result alone| {gap:.1e}")
    if gap > TOLERANCE:
        raise SystemExit(f"batched and one-by-one results differ by {gap:.1e} (> {TOLERANCE})")
    print(f"{'':<22} {'passes':>7} {'training s':>11} {'wall s':>8} {'jobs/s':>8}")
    for name, way in (("one job per claim", naive), ("siblings in one pass", vtab)):
        print(f"{name:<22} {way.passes:>7} {way.training_s:>11.1f} {way.wall_s:>8.1f} "
              f"{len(ours) / way.wall_s:>8.2f}")
    floor, gflops = arithmetic_floor(args.devices.split(","), args.epochs)
    print(f"arithmetic floor: the heads' matrix products alone take about {floor:.1f} runner-s "
          f"at {gflops:.0f} GFLOP/s (measured here, a runner's threads): at that rate, batching "
          f"alone makes training at most {naive.training_s / floor:.1f}x faster than one job per "
          "claim on these devices")
    print(f"ratio (one job per claim / batched): {naive.training_s / vtab.training_s:.1f}x "
          f"training time in jobs, {naive.wall_s / vtab.wall_s:.1f}x wall time")


if __name__ == "__main__":
    main()
