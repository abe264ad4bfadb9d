"""Queue overhead: jobs per second drained by runners, against one interpreter per job.

Every job is a no-op (`sleep` with 0 seconds), so the figure is the cost of the work-area
protocol itself: claim, two atomic writes, a move. The naive way starts a new Python
interpreter for every job (`main_runner.py --max_jobs 1`), as a queue that isolates each job
in its own process would. Both drain the same kind of queue with the same number of parallel
workers, in the same run.

    python bench/queue_throughput.py --jobs 2000 --runners 16 --naive_jobs 200
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vtab import yamlio  # noqa: E402
from vtab.workarea import FINISHED, WorkArea  # noqa: E402


def fill(area: WorkArea, jobs: int) -> None:
    for index in range(jobs):
        yamlio.write_mapping(area.root / f"noop{index:06d}.yaml", {
            "current_stage": "run", "config": {"sleep": {"seconds": 0}},
            "stages": {"run": {"hyperparams": {"kind": "sleep"}}}})


def runner_command(area: WorkArea, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "main_runner.py"), "--work_area", str(area.root),
            "--poll_interval", "0.05", "--no_progress", *args]


def drain_with_runners(area: WorkArea, runners: int) -> float:
    started = time.perf_counter()
    subprocess.run(runner_command(area, "--devices", ",".join(["cpu"] * runners)),
                   check=True, capture_output=True)
    return time.perf_counter() - started


def drain_one_interpreter_per_job(area: WorkArea, workers: int) -> float:
    def worker() -> None:
        while area.queued():
            subprocess.run(runner_command(area, "--devices", "cpu", "--max_jobs", "1"),
                           check=True, capture_output=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return time.perf_counter() - started


def measure(name: str, jobs: int, workers: int,
            drain: Callable[[WorkArea, int], float]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        area = WorkArea(Path(tmp) / "work")
        fill(area, jobs)
        seconds = drain(area, workers)
        done = len(area.listing(FINISHED))
        if done != jobs:
            raise SystemExit(f"{name}: {done} of {jobs} jobs finished")
    rate = jobs / seconds
    print(f"{name:<28} {jobs:>6} jobs  {workers:>3} workers  {seconds:7.2f} s  "
          f"{rate:8.1f} jobs/s  {1000 * seconds / jobs * workers:7.1f} ms per job per worker")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs for the runners")
    parser.add_argument("--naive_jobs", type=int, default=200,
                        help="jobs for one-interpreter-per-job (it is slow)")
    parser.add_argument("--runners", type=int, default=16, help="parallel workers for both")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores")
    ours = measure("runners (vtab)", args.jobs, args.runners, drain_with_runners)
    naive = measure("one interpreter per job", args.naive_jobs, args.runners,
                    drain_one_interpreter_per_job)
    print(f"ratio: runners drain {ours / naive:.1f}x as many jobs per second")


if __name__ == "__main__":
    main()
