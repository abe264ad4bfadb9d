"""Runners of different hosts on one work area; leases judged by heartbeat progress.

A skewed clock on another host is simulated by a holder that stamps its claim file with
times years away from ours: as long as the stamp keeps changing, the lease holds; when it
stops changing, the job is taken over after the lease timeout of the observer's own clock.
Runners of two "hosts" are told apart by --host_id, and, where the machine allows, also run
in network and UTS namespaces of their own (their own hostname, no network): the protocol
uses the filesystem only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


def _own_namespaces(host: str) -> list[str]:
    """A command prefix that runs a command in new network and UTS namespaces named `host`: a
    host of its own as far as a process can tell, sharing only the filesystem."""
    prefix = ["unshare", "--net", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "-"]
    if shutil.which("unshare") is None or subprocess.run(
            [*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("creating network and UTS namespaces needs unshare and root")
    return prefix


@pytest.mark.parametrize("isolation", ["host_id", "namespaces"])
def test_runners_of_two_hosts_never_share_a_job(area: WorkArea, tmp_path: Path,
                                                isolation: str) -> None:
    log = tmp_path / "executions.log"
    for index in range(300):
        queue(area, {"current_stage": "run",
                     "config": {"sleep": {"seconds": 0.002, "log": str(log)}},
                     "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, f"j{index:03d}.yaml")
    if isolation == "host_id":
        runners = [start_runner(area, "--devices", "cpu,cpu", "--host_id", host)
                   for host in ("alpha", "beta")]
    else:  # each runner sees its own hostname and no network: the default host id differs
        runners = [start_runner(area, "--devices", "cpu,cpu", wrapper=_own_namespaces(host))
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
