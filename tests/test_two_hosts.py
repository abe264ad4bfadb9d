"""Runners of different hosts on one work area; leases judged by heartbeat progress.

A skewed clock on another host is simulated by a holder that stamps its claim file with
times years away from ours: as long as the stamp keeps changing, the lease holds; when it
stops changing, the job is taken over after the lease timeout of the observer's own clock.
(All runners here share one machine: the protocol uses the filesystem only, so separate
network namespaces would change nothing it relies on.)
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import queue
from tests.test_processes import start_runner, wait_for
from vtab import yamlio
from vtab.workarea import FINISHED, RUNNING, WorkArea

YEAR_NS = 365 * 24 * 3600 * 10**9


def test_runners_of_two_hosts_never_share_a_job(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    for index in range(300):
        queue(area, {"current_stage": "run",
                     "config": {"sleep": {"seconds": 0.002, "log": str(log)}},
                     "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, f"j{index:03d}.yaml")
    runners = [start_runner(area, "--devices", "cpu,cpu", "--host_id", host)
               for host in ("alpha", "beta")]
    for runner in runners:
        output, _ = runner.communicate(timeout=300)
        assert runner.returncode == 0, output
    executions = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(executions) == 300 and set(executions.values()) == {1}
    provenance = [yamlio.load_mapping(p)["provenance"] for p in area.listing(FINISHED)]
    assert all(info["host"] == info["runner"].split(":")[0] for info in provenance)
    assert {info["host"] for info in provenance} == {"alpha", "beta"}


@pytest.mark.parametrize("skew_years", [-10, 10])
def test_a_lease_is_judged_by_progress_not_by_clocks(area: WorkArea, tmp_path: Path,
                                                     skew_years: int) -> None:
    log = tmp_path / "executions.log"
    queue(area, {"name": "held", "current_stage": "run",
                 "config": {"sleep": {"seconds": 0, "log": str(log)}},
                 "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, "held.yaml")
    claim = area.claim(area.root / "held.yaml")  # held by a "host" whose clock is skewed
    assert claim is not None
    beating = threading.Event()
    beating.set()

    def skewed_heartbeat() -> None:
        stamp = time.time_ns() + skew_years * YEAR_NS
        while beating.is_set():
            stamp += 10**6
            os.utime(claim.path, ns=(stamp, stamp))
            time.sleep(0.1)

    holder = threading.Thread(target=skewed_heartbeat)
    holder.start()
    try:
        observer = start_runner(area, "--devices", "cpu", "--host_id", "observer",
                                "--lease_timeout", "1")
        time.sleep(3.0)  # three lease timeouts: a clock comparison would have taken it
        assert area.listing(RUNNING) == [claim.path]
        assert not log.exists()
    finally:
        beating.clear()
        holder.join()
    stopped = time.monotonic()
    wait_for(lambda: (area.folder(FINISHED) / "held.yaml").exists(), timeout=30)
    assert time.monotonic() - stopped < 5  # taken over soon after the beats stopped
    output, _ = observer.communicate(timeout=30)
    assert observer.returncode == 0, output
    assert len(log.read_text().splitlines()) == 1
