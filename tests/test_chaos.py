"""Chaos: runners SIGKILLed at random moments while a whole pipeline drains.

Runners also kill themselves at random protocol steps (VTAB_CRASH_PROBABILITY), which lands
kills in the middle of claims, writes, moves, releases and summaries. The summary must come out
exactly as in an undisturbed run, every job must exist exactly once, no stage may be recorded
twice in a job's history, and nothing may be left in running/.

Sizes: VTAB_CHAOS_SEEDS (default 3 killer seeds), VTAB_CHAOS_KILLS (default 10 kills per run),
VTAB_CHAOS_CRASH_PROBABILITY (default 0.01 per protocol step).
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
DATASETS = ("a", "b", "c")


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


def _run_with_chaos(area: WorkArea, seed: int) -> int:
    """Keep RUNNERS runners alive, SIGKILL one at random moments; return the kills made."""
    rng = random.Random(seed)
    runners = [_start(area, CRASH_PROBABILITY) for _ in range(RUNNERS)]
    kills = 0
    deadline = time.monotonic() + 300
    summary = area.folder(SUMMARIZED) / "toy" / "summary.yaml"
    while not summary.exists():
        assert time.monotonic() < deadline, "the pipeline did not finish under chaos"
        time.sleep(rng.uniform(0.02, 0.3))
        live = [r for r in runners if r.poll() is None]
        holding = [r for r in live if r.pid in _holders(area)]
        if kills < KILLS and live:
            # Half the kills aim at a runner holding a job, so that some surely land mid-job.
            victim = rng.choice(holding if holding and rng.random() < 0.5 else live)
            victim.send_signal(signal.SIGKILL)
            kills += 1
        # Replace every runner that died (killed from outside or by a crash point).
        runners = [r if r.poll() is None or r.returncode == 0 else _start(area, CRASH_PROBABILITY)
                   for r in runners]
    for runner in runners:
        runner.wait(timeout=60)
    return kills


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_kills_do_not_change_the_outcome(tmp_path: Path, seed: int) -> None:
    calm = WorkArea(tmp_path / "calm")
    queue(calm, toy_pipeline(seconds=0.01, datasets=DATASETS))
    assert drain(calm) == 0

    area = WorkArea(tmp_path / "chaos")
    log = tmp_path / "executions.log"
    queue(area, toy_pipeline(log, seconds=0.01, datasets=DATASETS))
    kills = _run_with_chaos(area, seed)
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
    assert kills > 0
