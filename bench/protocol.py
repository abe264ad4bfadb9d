"""The whole VTAB-1K linear protocol, timed: 19 tasks drained through one work area by N runners.

Writes a VTAB-1K-shaped synthetic dataset (19 tasks named as VTAB-1K's, JPEG files, each task's
class count, split sizes scaled by ``--factor``: factor 1 gives train800, val200 and the test
sizes below, about 408,000 images) and runs the shipped pipeline
``pipelines/vtab1k/linear_resnet50.yaml`` on it (tune learning rate x weight decay x 2 seeds on
train800 -> val200, then 3 seeds on train800val200 -> test) with the backbone, image size and
epochs given here. The naive way, measured in the same run, is the same protocol one job per
claim (``--max_batch 1``). Reported for each: wall time and how the runners' time divides into
feature extraction, head training (and scoring) and the rest (the queue, forks, joins, starting
up and waiting: the protocol's own cost); backbone forwards per distinct image; each runner's
peak resident memory when its first and its last training job ended (from the jobs'
provenance).

    python bench/protocol.py                                  # CPU: resnet18 at 32 px, factor 0.02
    python bench/protocol.py --factor 1 --backbone vit_b_16 --image_size 224 --epochs 100 \\
        --devices 0,0,0,0 --batch_size 1024                    # the H200 target: under 5 minutes

The test sizes are those of the VTAB benchmark's test splits (Zhai et al., "A Large-scale Study
of Representation Learning with the Visual Task Adaptation Benchmark", arXiv:1910.04867), as the
VTAB-1K copies distribute them; images are random colours (the task is not learnable: this
measures time, not accuracy).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vtab import yamlio  # noqa: E402
from vtab.fsutil import atomic_write  # noqa: E402
from vtab.results import one_per_pass  # noqa: E402
from vtab.vtab1k import VTAB1K_DATASETS  # noqa: E402

PIPELINE = REPO / "pipelines" / "vtab1k" / "linear_resnet50.yaml"
# task: (classes, test images)
TASKS = {
    "caltech101": (102, 6084), "cifar": (100, 10000), "dtd": (47, 1880),
    "oxford_flowers102": (102, 6149), "oxford_iiit_pet": (37, 3669), "svhn": (10, 26032),
    "sun397": (397, 21750), "patch_camelyon": (2, 32768), "eurosat": (10, 5400),
    "resisc45": (45, 6300), "diabetic_retinopathy": (5, 42670), "clevr_count": (8, 15000),
    "clevr_dist": (6, 15000), "dmlab": (6, 22735), "kitti": (4, 711),
    "dsprites_loc": (16, 73728), "dsprites_ori": (16, 73728), "smallnorb_azi": (18, 12150),
    "smallnorb_ele": (9, 12150),
}


def jpeg(rng: np.random.Generator, size: int) -> bytes:
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tasks(root: Path, factor: float, size: int) -> int:
    """The 19 task folders; returns the number of distinct images."""
    rng = np.random.default_rng(0)
    total = 0
    for task, (classes, test) in TASKS.items():
        folder = root / task
        sizes = {"train800": 800, "val200": 200, "test": test}
        lines: dict[str, list[str]] = {}
        for split, count in sizes.items():
            (folder / "images" / split).mkdir(parents=True)
            lines[split] = []
            for index in range(max(2, round(count * factor))):
                relative = f"images/{split}/{index:06d}.jpg"
                atomic_write(folder / relative, jpeg(rng, size), durable=False)
                lines[split].append(f"{relative} {index % classes}\n")
                total += 1
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, content in lines.items():
            (folder / f"{split}.txt").write_text("".join(content))
    return total


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    doc = yamlio.load_mapping(PIPELINE)
    assert list(doc["stages"]["datasets"]["grid"]["dataset"]) == list(VTAB1K_DATASETS)
    doc["name"] = "protocol"
    doc["config"]["backbone"] = {"name": args.backbone, "weights": "none"}
    doc["config"]["features"] = {"image_size": args.image_size, "batch_size": args.batch_size}
    doc["config"]["optim"].update(epochs=args.epochs, warmup_epochs=min(5, args.epochs - 1))
    return doc


@dataclass(frozen=True)
class Run:
    wall_s: float
    extraction_s: float
    training_s: float
    forwards: int
    passes: int
    jobs: int
    peaks_mib: dict[str, tuple[int, int, int]]  # runner: peak at its first job, its last, jobs


def training_jobs(area: Path) -> Iterator[dict[str, Any]]:
    for path in area.rglob("*.yaml"):
        if "__" in path.name and "/running/" not in str(path):
            job = yamlio.load_mapping(path)
            if (job.get("run_config") or {}).get("kind") == "linear_probe":
                yield job


def drain(area: Path, doc: dict[str, Any], args: argparse.Namespace, max_batch: int) -> Run:
    area.mkdir()
    atomic_write(area / "protocol.yaml", yamlio.dump(doc) + "...\n")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "main_runner.py"), "--work_area", str(area),
         "--devices", args.devices, "--max_batch", str(max_batch), "--no_progress",
         "--num_workers", str(args.num_workers)],
        capture_output=True, text=True, env={**os.environ, "VTAB1K_ROOT": str(args.data)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the runners exited with {done.returncode}:\n{done.stderr[-3000:]}")
    jobs = list(training_jobs(area))
    passes = one_per_pass(jobs)
    timings = [job["report"]["timings"] for job in passes]
    return Run(wall, sum(t["features_s"] for t in timings),
               sum(t["train_s"] + t["eval_s"] for t in timings),
               sum(role["forwarded"] for job in passes
                   for role in job["report"]["features"].values()),
               len(passes), len(jobs), peaks(jobs))


def peaks(jobs: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """Each runner's peak resident memory when its first and its last training job ended (a
    process's peak only grows, so they are the least and the greatest), and its number of
    training jobs."""
    seen: dict[str, list[int]] = {}
    for job in jobs:
        seen.setdefault(job["provenance"]["runner"], []).append(
            job["provenance"]["runner_peak_memory_mib"])
    return {runner: (min(mib), max(mib), len(mib)) for runner, mib in seen.items()}


def report(name: str, run: Run, runners: int, images: int) -> None:
    runner_s = run.wall_s * runners
    rest = runner_s - run.extraction_s - run.training_s
    print(f"{name}: {run.jobs} training jobs in {run.passes} passes, wall {run.wall_s:.1f} s "
          f"({runners} runners: {runner_s:.0f} runner-s)")
    for part, seconds in (("extraction", run.extraction_s), ("heads", run.training_s),
                          ("queue, forks, start, idle", rest)):
        print(f"  {part:<26} {seconds:>8.1f} runner-s {100 * seconds / runner_s:>5.1f}%")
    memory = ", ".join(f"{first} and {last} MiB ({jobs} jobs)"
                       for first, last, jobs in sorted(run.peaks_mib.values()))
    print(f"  forwards per image {run.forwards / images:.2f}; peak memory per runner at its "
          f"first job and its last: {memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=0.02)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256, help="extraction batch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--no_naive", action="store_true", help="skip the one-job-per-claim run")
    args = parser.parse_args()
    runners = len(args.devices.split(","))
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores; factor {args.factor}, "
          f"{args.backbone} at {args.image_size} px, {args.epochs} epochs, devices "
          f"{args.devices}")
    with tempfile.TemporaryDirectory() as tmp:
        args.data = Path(tmp) / "vtab-1k"
        started = time.perf_counter()
        images = write_tasks(args.data, args.factor, max(args.image_size, 32))
        print(f"dataset: {images} images written in {time.perf_counter() - started:.0f} s")
        doc = pipeline(args)
        ours = drain(Path(tmp) / "vtab", doc, args, max_batch=64)
        report("vtab", ours, runners, images)
        if args.no_naive:
            return
        naive = drain(Path(tmp) / "naive", doc, args, max_batch=1)
        report("one job per claim", naive, runners, images)
    print(f"ratio (one job per claim / vtab): {naive.wall_s / ours.wall_s:.1f}x wall time")


if __name__ == "__main__":
    main()
