"""Forwards per image: a pipeline drained by a runner, against one feature pass per job.

vtab caches features per (backbone, transform, split) and builds train800val200 from the cached
rows of train800 and val200, so each image goes through the backbone once for the whole
protocol. The naive way is what per-job evaluation tools do: every training job of the same
pipeline extracts its own features into an empty cache. Both run sequentially on the CPU, in
the same run, on the embedded digits dataset; the vtab time includes starting the runner.
CPU seconds are printed beside wall seconds: they vary less when other work shares the machine.
The default pipeline is the debug one; pipelines/heads/layers.yaml sweeps three layers (every
tuning job trains a head on each, all three from one forward pass).

    python bench/forwards_per_image.py [--pipeline pipelines/heads/layers.yaml]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vtab import yamlio  # noqa: E402
from vtab.evaluation.data import SPLITS, read_split_file  # noqa: E402
from vtab.evaluation.digits import write_digits  # noqa: E402
from vtab.evaluation.probe import run_linear_probe  # noqa: E402
from vtab.results import one_per_pass  # noqa: E402

DEBUG_PIPELINE = REPO / "pipelines" / "debug" / "debug.yaml"
KIND = "linear_probe"
TOLERANCE = 1e-6
T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    wall_s: float
    cpu_s: float


def cpu_seconds(children: bool) -> float:
    if children:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished, waited-for children
        return usage.ru_utime + usage.ru_stime
    return time.process_time()  # all threads of this process


def timed(work: Callable[[], T], *, in_child: bool) -> tuple[Cost, T]:
    """Wall and CPU seconds of `work`; CPU of child processes when it runs in one."""
    wall, cpu = time.perf_counter(), cpu_seconds(in_child)
    result = work()
    return Cost(time.perf_counter() - wall, cpu_seconds(in_child) - cpu), result


def distinct_images(dataset: Path) -> int:
    return len({path for split in SPLITS for path, _ in read_split_file(dataset / f"{split}.txt")})


def forwarded(output: Mapping[str, Any]) -> int:
    return sum(role["forwarded"] for role in output["features"].values())


def results(output: Mapping[str, Any]) -> list[float]:
    """A job's result, or the result of each of its variants (layers)."""
    if "variants" in output:
        return [variant["result"] for variant in output["variants"].values()]
    return [output["result"]]


def training_jobs(area: Path, pipeline: str) -> list[dict[str, Any]]:
    """The finished linear-probe jobs of the pipeline, in a fixed order."""
    jobs = []
    for path in sorted((area / "summarized" / pipeline / "jobs").glob("*.yaml")):
        doc = yamlio.load_mapping(path)
        if (doc.get("run_config") or {}).get("kind") == KIND:
            jobs.append(doc)
    return jobs


def config_of(job: Mapping[str, Any]) -> dict[str, Any]:
    """The config the job's kind ran with, as the job recorded it."""
    return {k: v for k, v in job["run_config"].items() if k != "kind"}


def run_vtab(area: Path, pipeline: Path, threads: int) -> None:
    area.mkdir()
    shutil.copy(pipeline, area / pipeline.name)
    # One runner, so that jobs run one after the other as the naive way's do.
    subprocess.run([sys.executable, str(REPO / "main_runner.py"), "--work_area", str(area),
                    "--devices", "cpu", "--threads", str(threads), "--no_progress",
                    "--poll_interval", "0.05"],
                   check=True, capture_output=True)


def run_naive(jobs: list[dict[str, Any]], scratch: Path) -> list[dict[str, Any]]:
    # An empty cache per job: nothing is shared between jobs.
    return [run_linear_probe(config_of(job), cache_dir=scratch / f"cache{index}",
                             progress=False) for index, job in enumerate(jobs)]


def report(jobs: list[dict[str, Any]], naive: list[dict[str, Any]], images: int,
           vtab: Cost, baseline: Cost) -> None:
    """Print the figures; exit non-zero if a job's top-1 differs between the two ways."""
    ours = sum(forwarded(job) for job in one_per_pass(jobs))  # a pass forwards for its jobs
    theirs = sum(forwarded(out) for out in naive)
    print(f"training jobs: {len(jobs)}, distinct images: {images}")
    print(f"{'':<6} {'forwards':>9} {'per image':>10} {'wall s':>8} {'cpu s':>8}")
    for name, count, cost in (("vtab", ours, vtab), ("naive", theirs, baseline)):
        print(f"{name:<6} {count:>9} {count / images:>10.2f} {cost.wall_s:>8.1f} "
              f"{cost.cpu_s:>8.1f}")
    gap = max(abs(a - b) for job, out in zip(jobs, naive, strict=True)
              for a, b in zip(results(job), results(out), strict=True))
    print(f"max |top-1 vtab - top-1 naive| over jobs and layers: {gap:.2e}")
    if gap > TOLERANCE:  # shared features must not change what the protocol measures
        raise SystemExit(f"vtab and naive top-1 differ by {gap:.2e} (> {TOLERANCE:g})")
    print(f"ratio (naive / vtab): {theirs / ours:.1f}x forwards, "
          f"{baseline.wall_s / vtab.wall_s:.1f}x wall time, "
          f"{baseline.cpu_s / vtab.cpu_s:.1f}x cpu time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30,
                        help="head training epochs (VTAB_DEBUG_EPOCHS) for both ways")
    parser.add_argument("--pipeline", type=Path, default=DEBUG_PIPELINE,
                        help="a pipeline on the digits dataset (default: the debug pipeline)")
    args = parser.parse_args()
    pipeline = args.pipeline.resolve()
    name = yamlio.load_mapping(pipeline)["name"]
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores")
    threads = os.cpu_count() or 1  # every core, the same for both ways
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        images = distinct_images(write_digits(data))
        os.environ.update(VTAB1K_ROOT=str(data), VTAB_DEBUG_EPOCHS=str(args.epochs))
        area = Path(tmp) / "work"
        vtab, _ = timed(lambda: run_vtab(area, pipeline, threads), in_child=True)
        jobs = training_jobs(area, name)
        if not jobs:
            raise SystemExit(f"the pipeline {name} finished no training jobs")
        baseline, naive = timed(lambda: run_naive(jobs, Path(tmp) / "naive"), in_child=False)
    report(jobs, naive, images, vtab, baseline)


if __name__ == "__main__":
    main()
