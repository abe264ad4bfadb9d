"""Thousands of tiny jobs, many runner processes, one work area: nothing lost, nothing twice.

Sizes: VTAB_CONTENTION_JOBS (default 2000) and VTAB_CONTENTION_RUNNERS (default 16).
`drain_tiny_jobs` is the whole check; tests/test_network_fs.py runs it on a FUSE mount too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO
from vtab import yamlio
from vtab.workarea import CRASHED, FINISHED, RUNNING, WAITING, WorkArea

JOBS = int(os.environ.get("VTAB_CONTENTION_JOBS", "2000"))
RUNNERS = int(os.environ.get("VTAB_CONTENTION_RUNNERS", "16"))


def drain_tiny_jobs(area: WorkArea, log: Path, jobs: int, runners: int) -> None:
    """Queue `jobs` sleep jobs, drain them with `runners` processes, check each ran once.

    `log` is the execution log the jobs append to; it may live outside the work area.
    """
    for index in range(jobs):
        yamlio.write_mapping(area.root / f"tiny{index:05d}.yaml", {
            "current_stage": "run", "config": {"sleep": {"seconds": 0, "log": str(log)}},
            "stages": {"run": {"hyperparams": {"kind": "sleep"}}}})
    drained = subprocess.run(
        [sys.executable, "main_runner.py", "--work_area", str(area.root), "--devices",
         ",".join(["cpu"] * runners), "--poll_interval", "0.05", "--no_progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert drained.returncode == 0, drained.stdout[-2000:] + drained.stderr[-2000:]

    executions = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(executions) == jobs
    assert max(executions.values()) == 1  # no job body ran to completion twice
    finished = area.listing(FINISHED)
    assert sorted(p.stem for p in finished) == [f"tiny{i:05d}" for i in range(jobs)]
    for folder in (RUNNING, WAITING, CRASHED):
        assert area.listing(folder) == [], folder
    assert area.queued() == []
    workers = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(workers) > 1  # the runners really competed


@pytest.mark.slow
def test_many_runners_drain_thousands_of_jobs_exactly_once(area: WorkArea,
                                                           tmp_path: Path) -> None:
    drain_tiny_jobs(area, tmp_path / "executions.log", JOBS, RUNNERS)
