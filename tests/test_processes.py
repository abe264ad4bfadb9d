"""Runner processes: several at once, stop signals, a runner killed in the middle of a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import REPO, TOY_JOBS_PER_DATASET, queue, toy_pipeline
from vtab import yamlio
from vtab.workarea import CRASHED, FINISHED, RUNNING, SUMMARIZED, WAITING, WorkArea


def start_runner(area: WorkArea, *args: str, env: dict[str, str] | None = None,
                 wrapper: Sequence[str] = ()) -> subprocess.Popen[str]:
    """`main_runner.py` in a child process (run through `wrapper`, a command prefix, if given)."""
    command = [*wrapper, sys.executable, str(REPO / "main_runner.py"), "--work_area",
               str(area.root), "--poll_interval", "0.05", "--no_progress", *args]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def long_job(area: WorkArea, log: Path, seconds: float) -> None:
    queue(area, {"name": "long", "current_stage": "run",
                 "config": {"sleep": {"seconds": seconds, "log": str(log)}},
                 "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, "long.yaml")


def test_two_runner_processes_drain_a_pipeline(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    queue(area, toy_pipeline(log, seconds=0.05, datasets=("a", "b", "c")))
    runner = start_runner(area, "--devices", "cpu,cpu")
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 0, output
    assert output.count("work area drained") == 2
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "summary.yaml")
    assert sorted(summary["datasets"]) == ["a", "b", "c"]
    runs = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(runs) == 3 * (TOY_JOBS_PER_DATASET - 1) and set(runs.values()) == {1}
    assert len({line.split()[1] for line in log.read_text().splitlines()}) == 2  # both worked
    for folder in (RUNNING, WAITING, FINISHED, CRASHED):
        assert area.listing(folder) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_returns_the_job_at_once(area: WorkArea, tmp_path: Path, sig: int) -> None:
    long_job(area, tmp_path / "executions.log", seconds=120)
    runner = start_runner(area, "--devices", "cpu")
    wait_for(lambda: area.listing(RUNNING))
    time.sleep(0.3)  # well inside the job body
    sent = time.monotonic()
    runner.send_signal(sig)
    wait_for(lambda: area.queued(), timeout=5)
    returned = time.monotonic() - sent
    output, _ = runner.communicate(timeout=10)
    assert returned < 2.0
    assert runner.returncode == 128 + sig, output  # non-zero: it had to give work back
    assert area.listing(RUNNING) == []
    job = yamlio.load_mapping(area.queued()[0])
    assert job["attempts"] == 0 and "lease" not in job
    assert not (tmp_path / "executions.log").exists()


def test_a_stop_signal_to_an_idle_runner_says_it_stopped(area: WorkArea, tmp_path: Path) -> None:
    long_job(area, tmp_path / "executions.log", seconds=1)
    held = area.claim(area.root / "long.yaml")  # held elsewhere: not drained, nothing to claim
    assert held is not None
    runner = start_runner(area, "--devices", "cpu", "--idle_limit", "60")
    time.sleep(1.5)
    assert runner.poll() is None  # still waiting for the held job
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=10)
    assert runner.returncode == 128 + signal.SIGTERM, output  # the area was not drained
    assert area.listing(RUNNING) == [held.path]


def test_a_killed_runners_job_is_finished_by_the_next_runner(area: WorkArea,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    long_job(area, log, seconds=2)
    first = start_runner(area, "--devices", "cpu", "--lease_timeout", "1")
    wait_for(lambda: area.listing(RUNNING))
    time.sleep(0.3)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=10)
    assert len(area.listing(RUNNING)) == 1  # the dead runner's claim stays until its lease ends
    second = start_runner(area, "--devices", "cpu", "--lease_timeout", "1")
    output, _ = second.communicate(timeout=60)
    assert second.returncode == 0, output
    done = yamlio.load_mapping(area.folder(FINISHED) / "long.yaml")
    assert done["errors"][0]["type"] == "LeaseExpired"
    assert len(log.read_text().splitlines()) == 1  # the killed body never completed
    assert area.listing(RUNNING) == []


FAKE_GPU = REPO / "tests" / "fake_gpu"  # a torch stand-in that reports GPUs


def _fake_gpu_env(inherited: str | None = None, gpus: int = 8) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE_GPU), str(REPO)])
    env["VTAB_FAKE_GPUS"] = str(gpus)
    if inherited is not None:
        env["CUDA_VISIBLE_DEVICES"] = inherited
    return env


@pytest.mark.parametrize(("inherited", "physical"), [
    (None, {"3": "3", "5": "5"}),
    ("9,8,7,6,5,4", {"3": "6", "5": "4"}),  # as under SLURM: indices count within the mask
])
def test_each_runner_is_pinned_to_its_device(area: WorkArea, inherited: str | None,
                                             physical: dict[str, str]) -> None:
    for index in range(30):
        queue(area, {"current_stage": "run", "config": {"sleep": {"seconds": 0.3}},
                     "stages": {"run": {"hyperparams": {"kind": "sleep"}}}},
              f"job{index:02d}.yaml")
    runner = start_runner(area, "--devices", "3,5,cpu", env=_fake_gpu_env(inherited, gpus=10))
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 0, output
    seen = set()
    for path in area.listing(FINISHED):
        info = yamlio.load_mapping(path)["provenance"]
        pinned = info["runner"].split(":")[2].split("#")[0]  # host:pid:device#index
        seen.add(pinned)
        assert info["cuda_visible_devices"] == ("" if pinned == "cpu" else physical[pinned])
        assert info["device"] == ("cpu" if pinned == "cpu" else "cuda")
    assert seen == {"3", "5", "cpu"}


@pytest.mark.parametrize(("devices", "gpus", "message"), [
    ("0,3", 2, "GPU 3 does not exist: 2 GPU(s) are visible here (0-1)"),
    ("1", 0, "--devices 1: this machine has no usable CUDA GPU"),
])
def test_a_gpu_this_machine_lacks_stops_the_runner_before_it_claims(
        area: WorkArea, devices: str, gpus: int, message: str) -> None:
    queue(area, {"current_stage": "run", "stages": {"run": {"hyperparams": {"kind": "sleep"}}}},
          "job.yaml")
    runner = start_runner(area, "--devices", devices, env=_fake_gpu_env(gpus=gpus))
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 2, output
    assert message in output and "nothing was claimed" in output
    assert [p.name for p in area.queued()] == ["job.yaml"]  # untouched
    assert area.listing(RUNNING) == [] and area.listing(CRASHED) == []


def test_a_gpu_index_outside_the_inherited_mask_is_refused(area: WorkArea) -> None:
    runner = start_runner(area, "--devices", "0,2",
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "4,5"})
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == 2
    assert "GPU index 2 is not among the CUDA_VISIBLE_DEVICES='4,5'" in output
