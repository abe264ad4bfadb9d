"""SLURM: the sbatch script rendered and checked as text; the environment a runner resolves
under SLURM; and, against a real slurmctld (tools/slurm-cluster up, as .ci/run does), runners
submitted with main_sbatch_runner.py draining pipelines, surviving scancel, giving work back
before the time limit and requeueing, and one runner per granted GPU.

The cluster's GPUs are fake (gres on device files): runners log the GPUs SLURM granted them
and, with VTAB_GPUS_AS_CPU=1, run on the CPU. Without a cluster the integration tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, queue, toy_pipeline
from vtab import yamlio
from vtab.errors import ConfigError
from vtab.launch import slurm
from vtab.launch.environment import GPUS_AS_CPU, discover
from vtab.workarea import FINISHED, RUNNING, SUMMARIZED, WorkArea


def rendered(*args: str, config: dict | None = None) -> str:
    """The script main_sbatch_runner.py would submit for `args`, over `config`."""
    parser = slurm.build_parser()
    options, runner_args = parser.parse_known_args(list(args))
    overrides = {k: v for k, v in vars(options).items()
                 if k not in ("work_area", "config", "dry_run")}
    settings = slurm.resolve(config or {}, overrides, "test")
    return slurm.render(settings, runner_args, workdir="/home/u/exp", python="/opt/py/bin/python",
                        work_area="/shared/work", stamp="20261201-120000")


def sbatch(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_the_script_asks_slurm_for_what_the_command_line_says() -> None:
    text = rendered("--gpus", "1", "--time", "04:00:00", "--array", "16", "--account", "A",
                    "--qos", "Q", "--partition", "P", "--cpus_per_gpu", "8", "--mem", "64G",
                    "--requeue", "--max_attempts", "5")
    assert sbatch(text) == [
        "#SBATCH --job-name=vtab-20261201-120000", "#SBATCH --account=A",
        "#SBATCH --partition=P", "#SBATCH --qos=Q", "#SBATCH --time=04:00:00",
        "#SBATCH --mem=64G", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
        "#SBATCH --output=slurm/vtab-%A_%a.out", "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-gpu=8", "#SBATCH --array=0-15", "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    assert "cd /home/u/exp\n" in text
    runner = f"/opt/py/bin/python {REPO / 'main_runner.py'} --work_area /shared/work " \
             "--idle_limit 300 --max_attempts 5 &"
    assert runner in text  # unknown arguments go to the runners
    assert "if [ $code -eq 138 ] && [ \"${SLURM_RESTART_COUNT:-0}\" -lt 10 ] && " \
           "/opt/py/bin/python -m vtab.launch.slurm --pending /shared/work; then" in text
    assert "$$" not in text and "${SLURM_RESTART_COUNT:-0}" in text


def test_a_cpu_only_job_asks_for_no_gpu_and_runs_cpu_runners() -> None:
    text = rendered("--gpus", "0", "--cpus", "4", "--devices", "cpu,cpu")
    assert not any("gres" in line for line in sbatch(text))
    assert "#SBATCH --cpus-per-task=4" in sbatch(text)
    assert "--devices cpu,cpu" in text and "--requeue" not in text
    assert "--devices cpu" in rendered("--gpus", "0")  # CPU runners unless told otherwise


def test_config_file_values_and_command_line_overrides(tmp_path: Path) -> None:
    config = {"account": "proj", "partition": "gpu", "time": "1-00:00:00", "gpus": 4,
              "setup": ["module load cuda/12.4", "source /home/u/venv/bin/activate"],
              "extra_sbatch": ["--constraint=a100"], "signal_seconds": 0, "array": 3}
    text = rendered("--gpus", "2", "--partition", "debug", config=config)
    lines = sbatch(text)
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --account=proj" in lines
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH --constraint=a100" in lines
    assert not any("--signal" in line for line in lines)
    assert "module load cuda/12.4\nsource /home/u/venv/bin/activate\n" in text


@pytest.mark.parametrize(("config", "key", "message"), [
    ({"acount": "x"}, "acount", "did you mean 'account'?"),
    ({"time": "four hours"}, "time", "is not a SLURM time"),
    ({"gpus": -1}, "gpus", "must be at least 0"),
    ({"array": 0}, "array", "must be at least 1"),
])
def test_bad_settings_are_refused_by_key(config: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        slurm.resolve(config, {}, "sbatch_config.yaml")
    assert caught.value.key == key and message in str(caught.value)


def test_a_template_of_ones_own_and_its_mistakes(tmp_path: Path) -> None:
    mine = tmp_path / "mine.template"
    mine.write_text("#!/bin/sh\n${sbatch_lines}\nsrun ${python} ${runner} ${runner_args}\n")
    text = rendered(config={"template": str(mine)})
    assert text.startswith("#!/bin/sh\n#SBATCH --nodes=1") and "srun /opt/py/bin/python" in text
    mine.write_text("${sbatch_lines}\n${nodes}\n")
    with pytest.raises(ConfigError, match="KeyError 'nodes'"):
        rendered(config={"template": str(mine)})


def test_dry_run_prints_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a dry run does not need one
    assert slurm.main(["--gpus", "1", "--dry_run", "--work_area", "w"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and f"--work_area {tmp_path / 'w'}" in out
    assert not (tmp_path / "slurm").exists()


def test_without_sbatch_or_when_sbatch_refuses_nothing_is_submitted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert slurm.main(["--gpus", "1"]) == 1
    assert "sbatch is not on PATH" in capsys.readouterr().err
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.write_text("#!/bin/sh\necho 'sbatch: error: Invalid account or account/partition "
                    "combination specified' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert slurm.main(["--gpus", "1", "--account", "nope"]) == 1
    err = capsys.readouterr().err
    assert "sbatch refused" in err and "Invalid account" in err  # SLURM's own words


def test_the_environment_under_slurm() -> None:
    env = {"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "3",
           "CUDA_VISIBLE_DEVICES": "2,5", "SLURM_JOB_CPUS_PER_NODE": "1(x2)"}
    found = discover(env)
    assert (found.scheduler, found.slurm_job, found.granted_gpus) == ("slurm", "4240_3",
                                                                      ("2", "5"))
    assert found.host_id.endswith("-slurm4240_3") and found.cpus == 1
    assert found.default_devices() == "0,1"  # indices within what SLURM granted
    assert found.data_workers(2) == 0  # one CPU: no room for loader processes
    big = discover({**env, "SLURM_CPUS_PER_TASK": "16"})
    assert big.cpus == min(16, len(os.sched_getaffinity(0)))
    assert big.data_workers(2) == min(8, max(0, big.cpus // 2 - 1))
    no_gpu = discover({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"})
    assert no_gpu.default_devices() == "cpu" and no_gpu.host_id.endswith("-slurm7")
    assert discover({}).scheduler == "local"


# -- against a real SLURM ------------------------------------------------------------------


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                          timeout=20)
    return done.returncode == 0 and any(s in done.stdout for s in ("idle", "mixed", "alloc"))


def _need_cluster() -> None:
    if _cluster_answers():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("no SLURM cluster answers: .ci/run brings one up with tools/slurm-cluster")
    pytest.skip("no SLURM cluster answers (root: tools/slurm-cluster up)")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _need_cluster()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(GPUS_AS_CPU, "1")
    return tmp_path


def submit(*args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "main_sbatch_runner.py"), *args,
                           "--no_progress"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.match(r"submitted job (\d+)", done.stdout).group(1)


def squeue(job: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True,
                          text=True)
    return done.stdout.split("\n")[:-1] if done.returncode == 0 else []


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def logs(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted((folder / "slurm").glob("*.out")))


@pytest.mark.slow
def test_a_job_array_drains_the_debug_pipeline_as_a_local_run_does(
        cluster: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTAB1K_ROOT", str(digits_root))
    monkeypatch.setenv("VTAB_DEBUG_EPOCHS", "3")
    results = {}
    for where in ("local", "slurm"):
        area = WorkArea(cluster / where)
        shutil.copy(REPO / "pipelines" / "debug" / "debug.yaml", area.root)
        if where == "local":
            subprocess.run([sys.executable, str(REPO / "main_runner.py"), "--work_area",
                            str(area.root), "--devices", "cpu", "--no_progress"], check=True,
                           capture_output=True, timeout=600)
        else:
            job = submit("--gpus", "1", "--array", "3", "--time", "00:15:00", "--work_area",
                         str(area.root))
            wait_until(lambda job=job: not squeue(job), 600, "the array to end")
        summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "debug" / "summary.yaml")
        results[where] = summary["datasets"]["digits"]["result"]
    assert results["slurm"] == results["local"]
    said = logs(cluster)
    assert said.count("GPUs granted: ") == 3 and "VTAB_GPUS_AS_CPU is set" in said


@pytest.mark.slow
def test_a_cancelled_job_loses_nothing(cluster: Path) -> None:
    area = WorkArea(cluster / "work")
    queue(area, toy_pipeline(seconds=3.0, datasets=("a",)))
    first = submit("--gpus", "1", "--work_area", str(area.root), "--lease_timeout", "3",
                   "--settle_time", "0")
    wait_until(lambda: area.listing(RUNNING) and area.listing(FINISHED), 120,
               "a job finished and another in hand")
    subprocess.run(["scancel", first], check=True)  # SLURM sends TERM, then KILL
    wait_until(lambda: not squeue(first), 60, "the cancelled job to end")
    # The script passed the TERM on: the job in hand went straight back to the queue (had the
    # runner been killed outright, its lease would have brought it back after 3 s).
    assert area.listing(RUNNING) == [] and area.queued()
    assert "returned to the queue (this runner stops)" in logs(cluster)
    second = submit("--gpus", "1", "--work_area", str(area.root))
    wait_until(lambda: not squeue(second), 300, "the second job to end")
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "summary.yaml")
    assert summary["datasets"]["a"]["result"] == 0.75
    assert area.listing(RUNNING) == []


@pytest.mark.slow
def test_the_time_limit_signal_gives_work_back_and_requeues(cluster: Path) -> None:
    """SLURM's warning signal (here sent by hand with scancel --batch, as SLURM sends it for
    --signal=B:USR1@N: its own timing is only accurate to a minute): the job in hand goes back
    to the queue at once, the SLURM job requeues itself and its second run finishes the work."""
    area = WorkArea(cluster / "work")
    queue(area, toy_pipeline(seconds=2.0, datasets=("a",)))
    job = submit("--gpus", "1", "--time", "00:10:00", "--signal_seconds", "60", "--requeue",
                 "--work_area", str(area.root))
    wait_until(lambda: area.listing(RUNNING) and area.listing(FINISHED), 120, "work in hand")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: "stopped by signal 10" in logs(cluster), 60, "the runner to stop")
    # SLURM holds a requeued job back for its credentials' lifetime (tools/slurm-cluster
    # sets 20 s; 120 s by default).
    wait_until(lambda: (area.folder(SUMMARIZED) / "toy" / "summary.yaml").exists(), 600,
               "the requeued job to finish the work")
    said = logs(cluster)
    assert said.count("main_runner: SLURM job") == 2  # two runs of one SLURM job, one log
    assert "returned to the queue (this runner stops)" in said
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert re.search(r"Restarts=[1-9]", shown.stdout), shown.stdout


@pytest.mark.slow
def test_a_two_gpu_allocation_runs_a_runner_on_each_granted_gpu(cluster: Path) -> None:
    area = WorkArea(cluster / "work")
    queue(area, toy_pipeline(seconds=0.5, datasets=("a", "b")))
    job = submit("--gpus", "2", "--work_area", str(area.root))
    wait_until(lambda: not squeue(job), 300, "the job to end")
    said = logs(cluster)
    granted = said.split("GPUs granted: ")[1].split(";")[0].split(",")
    assert len(granted) == 2 and "devices 0,1" in said
    for index, physical in enumerate(granted):
        assert f"GPU {index} (physical {physical}) resolved" in said
    runners = {line.split("[")[1].split("]")[0] for line in said.splitlines()
               if "work area drained" in line}
    assert len(runners) == 2 and all(f"-slurm{job}:" in r for r in runners)
    assert (area.folder(SUMMARIZED) / "toy" / "summary.yaml").exists()
