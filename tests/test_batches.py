"""Sibling jobs trained in one pass: results as alone, and every job ends on its own."""

from __future__ import annotations

import csv
import signal
import subprocess
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import drain, queue
from tests.test_evaluation import probe_config
from tests.test_processes import start_runner, wait_for
from vtab import yamlio
from vtab.errors import RunnerEnvironmentError
from vtab.outcome import RunOutcome
from vtab.pipeline import StageContext, register_kind
from vtab.runner import BLOCKED_EXIT, CANNOT_RUN_EXIT
from vtab.schema import Section
from vtab.workarea import CRASHED, FINISHED, RUNNING, WorkArea

RESULTS = [0.25, 0.5, 0.75]
SEEDS = [0, 1]


def batch_pipeline(log: Path, grid: dict[str, list[Any]] | None = None,
                   **sleep: Any) -> dict[str, Any]:
    """A grid of sleep jobs that may run in one pass (``sleep.batch``)."""
    return {"name": "b", "current_stage": "tune",
            "config": {"sleep": {"batch": True, "log": str(log), **sleep}},
            "stages": {"tune": {"grid": grid or {"sleep.result": RESULTS, "seed": SEEDS},
                                "child_stage": "run"},
                       "run": {"hyperparams": {"kind": "sleep"}}}}


def children(area: WorkArea, folder: str) -> dict[str, dict[str, Any]]:
    found = {path.stem: yamlio.load_mapping(path) for path in area.folder(folder).rglob("*.yaml")}
    return {name: job for name, job in found.items() if "__" in name}


def runs(log: Path) -> Counter[str]:
    return Counter(line.split()[0] for line in log.read_text().splitlines())


@pytest.mark.parametrize(("max_batch", "passes"), [(64, 1), (4, 2), (1, 6)])
def test_siblings_run_in_passes_of_at_most_max_batch(area: WorkArea, tmp_path: Path,
                                                     max_batch: int, passes: int) -> None:
    log = tmp_path / "runs.log"
    queue(area, batch_pipeline(log))
    assert drain(area, max_batch=max_batch) == 0
    done = children(area, FINISHED)
    assert len(done) == 6 and set(runs(log).values()) == {1}  # each job ran once
    assert sorted(job["result"] for job in done.values()) == sorted(RESULTS * 2)
    groups = {tuple(job["report"].get("batch", {"jobs": [job["id"]]})["jobs"])
              for job in done.values()}
    assert len(groups) == passes and max(map(len, groups)) <= max_batch
    for job in done.values():
        assert job["run_config"]["sleep"]["result"] == job["result"]  # its own config ran
        ran = job["history"][-1]
        in_pass = job["report"].get("batch", {"jobs": [job["id"]]})["jobs"]
        assert ran.get("jobs_in_pass", 1) == len(in_pass)
        assert "lease" not in job and job["attempts"] == 0


def test_a_job_that_fails_in_a_batch_fails_alone(area: WorkArea, tmp_path: Path) -> None:
    log, folder = tmp_path / "runs.log", tmp_path / "a_folder"
    folder.mkdir()  # a log that is a folder: the job fails while it runs, not when checked
    queue(area, batch_pipeline(log, grid={"sleep.log": [str(log), str(folder)],
                                          "seed": [0, 1, 2]}))
    assert drain(area) == BLOCKED_EXIT  # the parent waits on the crashed children
    done, crashed = children(area, FINISHED), children(area, CRASHED)
    assert len(done) == 3 and len(crashed) == 3
    assert all(job["config"]["sleep"]["log"] == str(log) for job in done.values())
    assert set(runs(log)) == set(done) and set(runs(log).values()) == {1}
    for job in crashed.values():
        assert job["error"]["type"] == "IsADirectoryError"
        assert job["attempts"] == 3 and len(job["errors"]) == 2  # retried alone, then crashed


def batch_running(area: WorkArea, log: Path, seconds: float) -> subprocess.Popen[str]:
    """A runner process holding all six jobs of a batch, their leases written."""
    queue(area, batch_pipeline(log, seconds=seconds))
    runner = start_runner(area, "--devices", "cpu")
    wait_for(lambda: len(area.listing(RUNNING)) == 6)
    wait_for(lambda: all("lease" in yamlio.load_mapping(p) for p in area.listing(RUNNING)))
    return runner


def test_a_stop_signal_gives_every_job_of_a_batch_back(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    runner = batch_running(area, log, seconds=60)
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=30)
    assert runner.returncode == 128 + signal.SIGTERM, output
    assert "in one pass" in output
    queued = [yamlio.load_mapping(path) for path in area.queued()]
    assert len(queued) == 6 and not log.exists()
    assert all(job["attempts"] == 0 and "lease" not in job for job in queued)


def test_a_claim_lost_in_a_batch_is_dropped_alone(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    runner = batch_running(area, log, seconds=3)
    deleted = area.listing(RUNNING)[0]
    deleted.unlink()  # by hand, while the batch runs
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == BLOCKED_EXIT, output
    (lost,) = children(area, CRASHED).values()
    assert deleted.name.startswith(lost["id"] + "@")
    assert "was deleted while this runner held it" in lost["error"]["message"]
    assert len(children(area, FINISHED)) == 5
    assert set(runs(log).values()) == {1}  # its body ran in the pass; its claim ended alone


def test_a_runner_killed_in_a_batch_loses_nothing(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    queue(area, batch_pipeline(log, seconds=60))
    runner = start_runner(area, "--devices", "cpu", "--lease_timeout", "1")
    wait_for(lambda: len(area.listing(RUNNING)) == 6)
    runner.kill()
    runner.communicate(timeout=30)
    assert drain(area, lease_timeout=1.0, settle_time=10.0) == 0
    done = children(area, FINISHED)
    assert len(done) == 6 and set(runs(log).values()) == {1}
    assert all(job["errors"][0]["type"] == "LeaseExpired" for job in done.values())


# -- the heads: one pass equals each job alone ---------------------------------------------------


@pytest.mark.parametrize("head", [
    {"kind": "linear"},
    {"kind": "bn_linear"},
    {"kind": "mlp", "hidden": [32], "dropout": 0.3},
])
def test_heads_trained_in_one_pass_equal_heads_trained_alone(digits_root: Path, tmp_path: Path,
                                                             head: dict[str, Any]) -> None:
    from vtab.evaluation import probe

    settings = [{"optim.lr": lr, "optim.weight_decay": wd, "optim.momentum": momentum}
                for lr in (0.1, 0.01) for wd in (0.0, 1e-3) for momentum in (0.9, 0.0)]
    configs = [probe_config(digits_root, head=head, **{"optim.epochs": 3, "seed": 1, **one})
               for one in settings]
    cache = tmp_path / "cache"
    together = probe.run_linear_probes(configs, cache_dir=cache, progress=False,
                                       outputs_dirs=[tmp_path / f"batch{i}"
                                                     for i in range(len(configs))])
    assert probe.batch_key(configs[0]) == probe.batch_key(configs[-1])
    for i, (config, batched) in enumerate(zip(configs, together, strict=True)):
        alone = probe.run_linear_probe(config, cache_dir=cache, progress=False,
                                       outputs_dir=tmp_path / f"alone{i}")
        for name, value in alone["metrics"].items():  # CPU, fp32: within 1e-5
            assert batched["metrics"][name] == pytest.approx(value, abs=1e-5), (config, name)
        for name, values in alone["per_class"].items():
            assert batched["per_class"][name] == pytest.approx(values, abs=1e-5), (config, name)
        assert (_predictions(tmp_path / f"batch{i}") == _predictions(tmp_path / f"alone{i}"))
    assert len({batched["result"] for batched in together}) > 1  # the settings differ


def test_configs_that_cannot_share_a_pass_are_refused(digits_root: Path, tmp_path: Path) -> None:
    from vtab.evaluation import probe

    for key, values in (("optim.epochs", (1, 2)), ("seed", (0, 1))):
        configs = [probe_config(digits_root, **{key: value}) for value in values]
        assert probe.batch_key(configs[0]) != probe.batch_key(configs[1])
        with pytest.raises(ValueError, match="must differ only in"):
            probe.run_linear_probes(configs, cache_dir=tmp_path, progress=False)
    svm = probe_config(digits_root, head={"kind": "svm"})
    svm.pop("optim"), svm.pop("seed")
    assert probe.batch_key(svm) is None  # not trained by gradient: runs alone


def _predictions(folder: Path) -> list[str]:
    """Each evaluation image's predicted class, from a job's per-sample table."""
    with (folder / "val200_predictions.csv").open() as table:
        return [row["prediction"] for row in csv.DictReader(table)]


def test_a_wide_layer_trains_as_separate_linear_heads() -> None:
    """The wide path against the general one (one nn.Linear and torch.optim.SGD per head), on
    random data: single-label and multi-label, with momentum, weight decay and warmup."""
    import torch

    from vtab.evaluation.heads.base import HeadInput
    from vtab.evaluation.heads.linear import build
    from vtab.evaluation.heads.trainer import GradientHead, HeadSpec, Schedule, train_heads

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(203, 24, generator=generator)
    for task, targets in (("single_label", torch.randint(0, 5, (203,), generator=generator)),
                          ("multi_label", torch.randint(-1, 2, (203, 5), generator=generator))):
        data = HeadInput(x, targets, 5, task)
        specs = [HeadSpec(lr=lr, weight_decay=wd, seed=3, momentum=momentum)
                 for lr in (0.3, 0.01) for wd in (0.0, 1e-2) for momentum in (0.9, 0.0)]
        wide = train_heads([GradientHead(build, data, spec, "standardize", linear=True)
                            for spec in specs], Schedule(7, 32, 2))
        for spec, fitted in zip(specs, wide, strict=True):
            (alone,) = train_heads([GradientHead(build, data, spec, "standardize")],
                                   Schedule(7, 32, 2))
            for ours, theirs in zip(fitted.model.parameters(), alone.model.parameters(),
                                    strict=True):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# -- the device fails ------------------------------------------------------------------------------

class DeviceConfig(Section):
    value: float = 0.0


def _device_key(config: DeviceConfig) -> str:
    return "all"


def _out_of_memory_when_batched(configs: list[DeviceConfig],
                                ctxs: list[StageContext]) -> list[RunOutcome | Exception]:
    """A device that holds one job's pass, not several."""
    if len(configs) > 1:
        raise RunnerEnvironmentError(f"the device ran out of memory ({len(configs)} jobs)")
    return [RunOutcome({"result": config.value, "metrics": {"top1": config.value}})
            for config in configs]


def _one_at_a_time(config: DeviceConfig, ctx: StageContext) -> RunOutcome:
    (output,) = _out_of_memory_when_batched([config], [ctx])
    return output


register_kind("test_small_device", DeviceConfig, batch_key=_device_key,
              run_many=_out_of_memory_when_batched)(_one_at_a_time)


def test_a_pass_the_device_cannot_hold_is_given_back_and_batches_shrink(
        area: WorkArea, caplog: pytest.LogCaptureFixture) -> None:
    queue(area, {"name": "d", "current_stage": "tune", "config": {},
                 "stages": {"tune": {"grid": {"value": [0.1, 0.2, 0.3, 0.4]},
                                     "child_stage": "run"},
                            "run": {"hyperparams": {"kind": "test_small_device"}}}})
    assert drain(area) == 0  # the runner goes on: the batch's size was the trouble
    done = children(area, FINISHED)
    assert sorted(job["result"] for job in done.values()) == [0.1, 0.2, 0.3, 0.4]
    assert all("errors" not in job and "environment_failures" not in job
               for job in done.values())  # given back uncounted, run alone at last
    assert "batches are at most 2 jobs" in caplog.text
    assert "batches are at most 1 jobs" in caplog.text


def test_a_device_failing_while_a_job_is_scored_stops_the_runner(
        area: WorkArea, digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from vtab.evaluation import probe

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(probe._Evaluation, "run", out_of_memory)
    config = probe_config(digits_root, **{"optim.epochs": 1})
    queue(area, {"name": "p", "current_stage": "run", "config": config,
                 "stages": {"run": {"hyperparams": {"kind": "linear_probe"}}}})
    assert drain(area) == CANNOT_RUN_EXIT
    (queued,) = [yamlio.load_mapping(path) for path in area.queued()]
    assert queued["attempts"] == 0 and queued["environment_failures"] == 1


def test_an_error_of_the_pass_is_recorded_once_in_each_job(area: WorkArea, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from vtab import kinds

    def broken(seconds: float) -> None:
        raise ValueError("the pass broke")

    monkeypatch.setattr(kinds, "time", types.SimpleNamespace(sleep=broken))  # kinds' own only
    queue(area, batch_pipeline(tmp_path / "runs.log"))
    assert drain(area, max_attempts=1) == BLOCKED_EXIT
    crashed = children(area, CRASHED)
    assert len(crashed) == 6
    for job in crashed.values():
        assert job["error"]["message"] == "the pass broke"
        assert job["error"]["traceback"].count("_run_stages") <= 1
