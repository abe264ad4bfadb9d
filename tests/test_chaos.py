"""Chaos: runners SIGKILLed at random moments while a whole pipeline drains.

Runners also kill themselves at random protocol steps (VTAB_CRASH_PROBABILITY), which lands
kills in the middle of claims, writes, moves, releases and summaries. The summary must come out
exactly as in an undisturbed run, every job must exist exactly once, no stage may be recorded
twice in a job's history, and nothing may be left in running/.

Sizes: VTAB_CHAOS_SEEDS (default 3 killer seeds), VTAB_CHAOS_KILLS (default 10 kills per run),
VTAB_CHAOS_CRASH_PROBABILITY (default 0.01 per protocol step).
`check_random_kills` is the whole check; tests/test_network_fs.py runs it on a FUSE mount too.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, drain, queue, toy_pipeline
from vtab import yamlio
from vtab.errors import VtabError
from vtab.workarea import CRASHED, FINISHED, RUNNING, SUMMARIZED, WAITING, WorkArea

SEEDS = int(os.environ.get("VTAB_CHAOS_SEEDS", "3"))
KILLS = int(os.environ.get("VTAB_CHAOS_KILLS", "10"))
CRASH_PROBABILITY = os.environ.get("VTAB_CHAOS_CRASH_PROBABILITY", "0.01")
RUNNERS = 4
FIRST_KILL_LOOKS = 400  # looks for a runner holding a job before the first kill takes any
DATASETS = ("a", "b", "c")


@dataclass(frozen=True)
class ChaosOutcome:
    """What one chaos run did, for reports: the checks themselves are assertions."""

    kills: int  # SIGKILLs sent from outside
    restarts: int  # runners that ended badly and were replaced (outside kills and crash points)
    recovered: int  # expired leases recorded in the jobs
    executions: int  # job bodies run to completion
    jobs: int  # distinct jobs whose bodies ran
    # Bodies run again although the runner that ran them before lived on: it lost its lease
    # while alive (a stall), not by dying. 0 unless runners stall for over --lease_timeout.
    repeated_by_live_runners: int

    def __str__(self) -> str:
        return (f"kills={self.kills} restarts={self.restarts} recovered={self.recovered} "
                f"executions={self.executions} jobs={self.jobs} "
                f"repeated={self.executions - self.jobs} "
                f"repeated_by_live_runners={self.repeated_by_live_runners}")


def _summary(area: WorkArea) -> dict[str, Any]:
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "summary.yaml")
    summary.pop("finished_at")
    return summary


def _start(area: WorkArea, crash_probability: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VTAB_CRASH_PROBABILITY": crash_probability}
    return subprocess.Popen(
        [sys.executable, "main_runner.py", "--work_area", str(area.root), "--devices", "cpu",
         "--lease_timeout", "1", "--poll_interval", "0.05", "--max_attempts", "50",
         "--no_progress"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def _holders(area: WorkArea) -> set[int]:
    """Process ids of the runners that hold a claim right now (from the leases)."""
    pids = set()
    for path in area.listing(RUNNING):
        with contextlib.suppress(OSError, VtabError, KeyError, TypeError):
            pids.add(yamlio.load_mapping(path)["lease"]["pid"])
    return pids


def _run_with_chaos(area: WorkArea, seed: int, kills: int,
                    crash_probability: str) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Keep RUNNERS runners alive, SIGKILL one at random moments.

    Returns the kills made and every runner started, all of them ended.
    """
    rng = random.Random(seed)
    runners = [_start(area, crash_probability) for _ in range(RUNNERS)]
    started = list(runners)
    killed = 0
    deadline = time.monotonic() + 300
    summary = area.folder(SUMMARIZED) / "toy" / "summary.yaml"
    looks = 0
    while not summary.exists():
        assert time.monotonic() < deadline, "the pipeline did not finish under chaos"
        # Until the first kill, look often: it should land on a runner that holds a job.
        time.sleep(0.005 if killed == 0 else rng.uniform(0.02, 0.3))
        looks += 1
        live = [r for r in runners if r.poll() is None]
        holding = [r for r in live if r.pid in _holders(area)]
        if killed < kills and live and (holding or killed > 0 or looks > FIRST_KILL_LOOKS):
            # The first kill and half of the others aim at a runner holding a job, so that
            # some surely land mid-job (and a lease must be recovered).
            aim = holding and (killed == 0 or rng.random() < 0.5)
            victim = rng.choice(holding if aim else live)
            victim.send_signal(signal.SIGKILL)
            killed += 1
        # Replace every runner that died (killed from outside or by a crash point).
        for index, runner in enumerate(runners):
            if runner.poll() is not None and runner.returncode != 0:
                runners[index] = _start(area, crash_probability)
                started.append(runners[index])
    for runner in runners:
        runner.wait(timeout=60)
    return killed, started


def check_random_kills(root: Path, log: Path, seed: int, kills: int, crash_probability: str,
                       seconds: float = 0.01) -> ChaosOutcome:
    """Drain the toy pipeline calmly in `root`/calm and under chaos in `root`/chaos; compare.

    `log` is the chaos run's execution log; it may live outside `root`. `seconds` is each job
    body's sleep: longer bodies make a kill more likely to land on a runner holding a job.
    """
    calm = WorkArea(root / "calm")
    queue(calm, toy_pipeline(seconds=seconds, datasets=DATASETS))
    assert drain(calm) == 0

    area = WorkArea(root / "chaos")
    queue(area, toy_pipeline(log, seconds=seconds, datasets=DATASETS))
    killed, started = _run_with_chaos(area, seed, kills, crash_probability)
    # A calm runner afterwards must find nothing to do but stale claims of the dead.
    final = _start(area, "0")
    assert final.wait(timeout=60) == 0

    assert _summary(area) == _summary(calm)
    for folder in (RUNNING, WAITING, FINISHED, CRASHED):
        assert area.listing(folder) == [], folder
    assert area.queued() == []
    jobs = area.summarized_jobs("toy")
    expected = {p.name for p in calm.summarized_jobs("toy").iterdir()}
    assert {p.name for p in jobs.iterdir()} == expected
    everywhere = Counter(p.name.split("@")[0].removesuffix(".yaml")
                         for p in area.root.rglob("*.yaml") if p.name != "summary.yaml")
    assert set(everywhere.values()) == {1}  # each job exists exactly once
    recovered = 0
    for path in jobs.iterdir():
        doc = yamlio.load_mapping(path)
        stages = [entry["stage"] for entry in doc["history"]]
        assert len(stages) == len(set(stages)), f"{path.name} did a stage twice: {stages}"
        recovered += sum(e["type"] == "LeaseExpired" for e in doc.get("errors", []))
    assert recovered > 0  # runners really died holding jobs
    executed = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert set(executed) == {p.stem for p in jobs.iterdir() if "__tune__" in p.stem
                             or "__final__" in p.stem}
    assert killed > 0
    died = {runner.pid for runner in started if runner.returncode != 0}
    return ChaosOutcome(killed, len(started) - RUNNERS, recovered, sum(executed.values()),
                        len(executed), _repeated_by_live_runners(log, died))


def _repeated_by_live_runners(log: Path, died: set[int]) -> int:
    """Executions by a runner not in `died` that the same job's body ran again after.

    A result that was written is never computed again, so such a runner lost its lease while
    it lived on. The log holds "<job> <pid>" lines in the order the bodies ended.
    """
    runs: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        job, pid = line.split()[:2]
        runs.setdefault(job, []).append(int(pid))
    return sum(pid not in died for pids in runs.values() for pid in pids[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_kills_do_not_change_the_outcome(tmp_path: Path, seed: int) -> None:
    check_random_kills(tmp_path, tmp_path / "executions.log", seed, KILLS, CRASH_PROBABILITY)
