"""A runner in this process: the whole stage machine, bad input, retries, recovery."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOY_JOBS_PER_DATASET, drain, queue, toy_pipeline
from vtab import runner as runner_module
from vtab import yamlio
from vtab.errors import RunnerEnvironmentError
from vtab.launch.local import worst_exit_code
from vtab.outcome import RunOutcome
from vtab.pipeline import KINDS, StageContext, kinds_named, register_kind
from vtab.runner import BLOCKED_EXIT, CRASHED_EXIT, Looks, Runner, RunnerSettings
from vtab.schema import Section
from vtab.workarea import CRASHED, FINISHED, RUNNING, SUMMARIZED, WAITING, Claim, WorkArea

CALLS: dict[str, int] = {}


class FlakyConfig(Section):
    fail_times: int = 0


@register_kind("test_flaky", FlakyConfig)
def _flaky(config: FlakyConfig, ctx: StageContext) -> RunOutcome:
    """Fails the first `fail_times` calls per job id, then succeeds."""
    CALLS[ctx.job["id"]] = CALLS.get(ctx.job["id"], 0) + 1
    if CALLS[ctx.job["id"]] <= config.fail_times:
        raise RuntimeError(f"flaky failure {CALLS[ctx.job['id']]}")
    return RunOutcome({"result": 1.0})


def _single(kind: str, **config: Any) -> dict[str, Any]:
    return {"current_stage": "run", "config": config,
            "stages": {"run": {"hyperparams": {"kind": kind}}}}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_pipeline_drains_and_is_summarized(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    queue(area, toy_pipeline(log))
    assert drain(area) == 0
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "summary.yaml")
    assert set(summary["datasets"]) == {"a", "b"}
    entry = summary["datasets"]["a"]
    assert entry["selected"] == {"sleep.result": 0.75}
    assert entry["result"] == pytest.approx(0.75) and entry["std"] == 0.0
    assert entry["seeds"] == {0: 0.75, 1: 0.75, 2: 0.75}
    jobs = sorted(p.stem for p in (area.folder(SUMMARIZED) / "toy" / "jobs").iterdir())
    assert len(jobs) == 1 + 2 * TOY_JOBS_PER_DATASET
    executed = [line.split()[0] for line in _lines(log)]
    assert sorted(executed) == sorted(j for j in jobs if "__tune__" in j or "__final__" in j)
    for folder in (RUNNING, WAITING, FINISHED, CRASHED):
        assert area.listing(folder) == [], folder
    assert area.queued() == []
    root = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "jobs" / "toy.yaml")
    assert [h["stage"] for h in root["history"]] == ["datasets", "summarize"]
    leaf = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "jobs" /
                               "toy__a__final__seed=1.yaml")
    assert leaf["result"] == 0.75 and leaf["result_stage"] == "train_test"
    assert {"host", "code_version", "runner", "python"} <= set(leaf["provenance"])
    assert "total_s" in leaf["report"]["timings"]


def test_requeuing_a_finished_pipeline_does_not_train_again(area: WorkArea,
                                                            tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    queue(area, toy_pipeline(log, datasets=("a",)))
    assert drain(area) == 0
    runs = len(_lines(log))
    queue(area, toy_pipeline(log, datasets=("a",)))
    assert drain(area) == 0
    assert len(_lines(log)) == runs
    assert (area.folder(SUMMARIZED) / "toy" / "summary.yaml").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty"),
    (b"\x00\xff\xfe binary", "not UTF-8"),
    (b"- a\n- b\n", "top level is a list"),
    (b"a: [1, 2\n", "invalid YAML"),
    (b"!!python/object/apply:os.system ['echo hi']\n", "refused YAML construct"),
])
def test_unreadable_files_are_kept_and_explained(area: WorkArea, content: bytes,
                                                 message: str) -> None:
    (area.root / "broken.yaml").write_bytes(content)
    queue(area, toy_pipeline(datasets=("a",)))
    assert drain(area) == CRASHED_EXIT
    assert (area.folder(CRASHED) / "broken.yaml").read_bytes() == content
    report = (area.folder(CRASHED) / "broken.error.txt").read_text()
    assert message in report and "broken.yaml" in report
    assert (area.folder(SUMMARIZED) / "toy" / "summary.yaml").exists()  # the runner went on


@pytest.mark.parametrize(("doc", "key", "message"), [
    (_single("no_such_kind"), "stages.run.hyperparams.kind", "unknown job kind"),
    (_single("sleep", sleep={"second": 1}), "sleep.second", "did you mean 'seconds'"),
    (_single("sleep", dataset="a", optim={"lr": 0.1}), "optim", "read by job kind 'linear_probe'"),
    (_single("sleep", sleep={"seconds": "long"}), "sleep.seconds", "expected a number"),
    (_single("sleep", sleep={"seconds": -1}), "sleep.seconds", "at least 0"),
    ({"current_stage": "a", "stages": {"a": {"processor": "aggregate", "next_stage": "a"}}},
     "stages.a", "cycle"),
    ({"name": "../../etc", **_single("sleep")}, "name", "cannot name a pipeline"),
])
def test_bad_jobs_crash_with_file_and_key(area: WorkArea, doc: dict[str, Any], key: str,
                                          message: str) -> None:
    queue(area, doc, "bad.yaml")
    assert drain(area) == CRASHED_EXIT
    (crashed,) = area.listing(CRASHED)
    error = yamlio.load_mapping(crashed)["error"]
    assert error["key"] == key
    assert message in error["message"] and "bad.yaml" in error["message"]
    assert error["attempt"] == 1  # bad input is not retried
    assert {"type", "traceback", "host", "runner", "at", "stage"} <= set(error)


def test_unexpected_errors_are_retried_then_crashed(area: WorkArea) -> None:
    queue(area, {"name": "flaky1", **_single("test_flaky", fail_times=1)}, "flaky1.yaml")
    queue(area, {"name": "flaky9", **_single("test_flaky", fail_times=9)}, "flaky9.yaml")
    assert drain(area, max_attempts=3) == CRASHED_EXIT
    done = yamlio.load_mapping(area.folder(FINISHED) / "flaky1.yaml")
    assert done["result"] == 1.0 and len(done["errors"]) == 1
    crashed = yamlio.load_mapping(area.folder(CRASHED) / "flaky9.yaml")
    assert crashed["error"]["message"] == "flaky failure 3"
    assert crashed["error"]["attempt"] == 3 and "after 3 attempts" in crashed["error"]["note"]
    assert [e["message"] for e in crashed["errors"]] == [f"flaky failure {i}" for i in (1, 2)]
    # Moving it back by hand retries it with fresh attempts.
    (area.folder(CRASHED) / "flaky9.yaml").rename(area.root / "flaky9.yaml")
    CALLS["flaky9"] = 100
    assert drain(area) == 0
    retried = yamlio.load_mapping(area.folder(FINISHED) / "flaky9.yaml")
    assert retried["result"] == 1.0
    assert retried["previous_errors"][0]["message"] == "flaky failure 3"


def test_a_dead_runners_claim_is_recovered(area: WorkArea, tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    job = queue(area, {"name": "orphan", **_single("sleep", sleep={"log": str(log)})},
                "orphan.yaml")
    dead = area.claim(job)  # claimed and never heartbeated again: its runner died
    assert dead is not None
    assert drain(area, lease_timeout=0.3) == 0
    done = yamlio.load_mapping(area.folder(FINISHED) / "orphan.yaml")
    assert done["errors"][0]["type"] == "LeaseExpired"
    assert _lines(log) == [line for line in _lines(log) if line.startswith("orphan ")]
    assert len(_lines(log)) == 1
    assert area.listing(RUNNING) == []


def test_waiting_on_a_crashed_child_does_not_keep_runners_forever(area: WorkArea,
                                                                  tmp_path: Path) -> None:
    doc = toy_pipeline(datasets=("a",))
    # A log that is a folder: every tuning run fails while it runs, not when it is checked.
    doc["stages"]["train_val"] = {"hyperparams": {"kind": "sleep", "sleep.log": str(tmp_path)}}
    queue(area, doc)
    assert drain(area, idle_limit=30) == BLOCKED_EXIT
    assert len(area.listing(CRASHED)) == 6
    assert {p.stem for p in area.listing(WAITING)} == {"toy", "toy__a"}


def test_a_waiting_job_broken_by_hand_does_not_stop_the_runner(area: WorkArea) -> None:
    yamlio.write_mapping(area.folder(WAITING) / "edited.yaml",  # its "pipeline" was deleted
                         {"id": "edited", "waiting_for": {"stage": "s", "children": ["c"]}})
    queue(area, _single("sleep"), "job.yaml")
    assert drain(area) == BLOCKED_EXIT
    assert [p.name for p in area.listing(FINISHED)] == ["job.yaml"]


def test_a_job_settled_before_its_runner_died_is_only_moved(area: WorkArea,
                                                            tmp_path: Path) -> None:
    """Content is written before the move: the next holder moves it and runs nothing."""
    log = tmp_path / "executions.log"
    queue(area, toy_pipeline(log, datasets=("a",)))
    assert drain(area, lease_timeout=0.3) == 0
    runs = _lines(log)
    jobs = area.summarized_jobs("toy")
    # Put a finished leaf back as if its runner died between its last write and its move,
    # and its parent as if it died between forking and moving into waiting/.
    leaf = yamlio.load_mapping(jobs / "toy__a__final__seed=0.yaml")
    leaf["finished_in"] = "finished"
    yamlio.write_mapping(area.root / "leaf.yaml", leaf)
    assert area.claim(area.root / "leaf.yaml") is not None  # a claim nobody heartbeats
    assert drain(area, lease_timeout=0.3) == 0
    moved = yamlio.load_mapping(area.folder(FINISHED) / "toy__a__final__seed=0.yaml")
    assert moved["history"] == leaf["history"]
    assert _lines(log) == runs


def test_a_finished_job_cannot_name_a_folder_outside_the_area(area: WorkArea) -> None:
    doc = {"name": "escape", **_single("sleep")}
    queue(area, doc, "escape.yaml")
    assert drain(area) == 0
    done = yamlio.load_mapping(area.folder(FINISHED) / "escape.yaml")
    done["finished_in"] = "../../elsewhere"
    yamlio.write_mapping(area.root / "escape.yaml", done)
    (area.folder(FINISHED) / "escape.yaml").unlink()
    assert drain(area) == CRASHED_EXIT
    error = yamlio.load_mapping(area.folder(CRASHED) / "escape.yaml")["error"]
    assert error["key"] == "finished_in"


@register_kind("test_broken_install", Section)
def _broken_install(config: Section, ctx: StageContext) -> RunOutcome:
    raise RunnerEnvironmentError("operator torchvision::nms does not exist")


def test_a_runner_with_a_broken_installation_stops_and_gives_the_job_back(
        area: WorkArea) -> None:
    queue(area, {"name": "victim", **_single("test_broken_install")}, "victim.yaml")
    queue(area, {"name": "other", **_single("test_broken_install")}, "other.yaml")
    assert drain(area) == 2
    assert area.listing(CRASHED) == [] and area.listing(RUNNING) == []
    assert len(area.queued()) == 2  # neither job was crashed for the runner's fault
    assert all(yamlio.load_mapping(p).get("attempts", 0) == 0 for p in area.queued())


def test_a_name_is_reused_only_to_rerun_the_same_finished_pipeline(area: WorkArea) -> None:
    queue(area, {"name": "p", **_single("sleep", sleep={"result": 0.25})}, "first.yaml")
    assert drain(area) == 0
    queue(area, {"name": "p", **_single("sleep", sleep={"result": 0.25})}, "again.yaml")
    queue(area, {"name": "p", **_single("sleep", sleep={"result": 0.75})}, "other.yaml")
    assert drain(area) == CRASHED_EXIT
    assert yamlio.load_mapping(area.folder(FINISHED) / "p.yaml")["result"] == 0.25
    (crashed,) = area.listing(CRASHED)
    error = yamlio.load_mapping(crashed)["error"]
    assert error["key"] == "name" and "another pipeline" in error["message"]
    assert "other.yaml" in error["message"] and "finished/p.yaml" in error["message"]


def test_a_stop_signal_while_a_job_is_read_stops_before_its_first_stage(
        area: WorkArea, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "executions.log"
    queue(area, _single("sleep", sleep={"log": str(log)}), "job.yaml")
    read = WorkArea.read_bytes

    def read_then_signal(self: WorkArea, claim: Claim) -> bytes:
        os.kill(os.getpid(), signal.SIGTERM)  # lands before the stage can be interrupted
        return read(self, claim)

    monkeypatch.setattr(WorkArea, "read_bytes", read_then_signal)
    assert drain(area) == 128 + signal.SIGTERM
    assert [p.name for p in area.queued()] == ["job.yaml"]
    assert not log.exists()  # the job's body never ran


def _probe_pipeline(**config: Any) -> dict[str, Any]:
    return {"name": "p", "current_stage": "tune",
            "config": {"dataset": "digits", "backbone": {"name": "resnet18"},
                       "optim": {"lr": 0.1, "epochs": 1}, **config},
            "stages": {"tune": {"grid": {"seed": [0, 1, 2]}, "child_stage": "train"},
                       "train": {"hyperparams": {"kind": "linear_probe"}}}}


@pytest.mark.parametrize(("config", "key", "message"), [
    # The schema: checked for every planned job when the pipeline is first claimed.
    ({"data": {"root": "nowhere"}, "optim": {"lr": "fast", "epochs": 1}}, "optim.lr",
     "expected a number"),
    # Data and backbone: checked by the fork for each child it would queue.
    ({"data": {"root": "nowhere"}}, "data.root", "does not exist"),
])
def test_a_bad_config_crashes_the_pipeline_once_instead_of_every_child(
        area: WorkArea, config: dict[str, Any], key: str, message: str) -> None:
    queue(area, _probe_pipeline(**config), "p.yaml")
    assert drain(area) == CRASHED_EXIT
    assert [p.name for p in area.listing(CRASHED)] == ["p.yaml"]
    error = yamlio.load_mapping(area.folder(CRASHED) / "p.yaml")["error"]
    assert error["key"] == key and message in error["message"]
    assert "in 3 jobs, e.g. p__tune__seed=0" in error["message"]
    assert area.queued() == [] and area.listing(WAITING) == []  # no child was created


def test_a_name_reused_by_a_file_of_that_name_is_checked_too(area: WorkArea) -> None:
    queue(area, {"name": "p", **_single("sleep", sleep={"result": 0.25})}, "p.yaml")
    assert drain(area) == 0
    queue(area, {"name": "p", **_single("sleep", sleep={"result": 0.75})}, "p.yaml")
    assert drain(area) == CRASHED_EXIT
    assert yamlio.load_mapping(area.folder(FINISHED) / "p.yaml")["result"] == 0.25
    error = yamlio.load_mapping(area.folder(CRASHED) / "p.yaml")["error"]
    assert error["key"] == "name" and "finished/p.yaml" in error["message"]


@pytest.mark.parametrize(("codes", "worst"), [
    ([0, 0], 0), ([0, BLOCKED_EXIT], BLOCKED_EXIT), ([2, BLOCKED_EXIT], 2), ([BLOCKED_EXIT, 2], 2),
    ([2, 143], 143), ([0, -9], 137), ([1, 2], 1), ([0, CRASHED_EXIT], CRASHED_EXIT),
    ([CRASHED_EXIT, BLOCKED_EXIT], BLOCKED_EXIT), ([CRASHED_EXIT, 2], 2),
])
def test_the_supervisor_reports_the_worst_runner(codes: list[int], worst: int) -> None:
    assert worst_exit_code(codes) == worst


def test_an_idle_runner_imports_ahead_the_kinds_that_jobs_running_or_waiting_name(
        area: WorkArea, monkeypatch: pytest.MonkeyPatch) -> None:
    warmed: list[str] = []
    for name in ("sleep", "linear_probe"):  # linear_probe's own warm-up imports torch
        kind = KINDS.get(name)
        monkeypatch.setitem(KINDS._entries, name,
                            dataclasses.replace(kind, warm=functools.partial(warmed.append, name)))
    monkeypatch.setattr(runner_module, "WARM_LOOK_INTERVAL", 0.0)  # a look every idle poll
    claim = area.claim(queue(area, toy_pipeline()))  # forking elsewhere, say
    assert claim is not None
    drain(area, idle_limit=0.3)
    assert warmed == ["sleep"]  # once, though looked for at every poll; no job names the other
    doc = toy_pipeline()
    doc["stages"]["train_test"]["hyperparams"]["kind"] = "linear_probe"
    yamlio.write_mapping(area.folder(WAITING) / "later.yaml", {**doc, "id": "later"})
    runner = Runner(area, RunnerSettings(), "cpu", "idle")
    runner._warm_up()
    assert warmed == ["sleep", "linear_probe", "sleep"]  # a new runner: both, in name order
    runner._warm_up()
    assert len(warmed) == 3


def test_a_runner_that_ran_a_kind_does_not_warm_it_up_and_a_stage_naming_no_kind_names_the_default(
        area: WorkArea, monkeypatch: pytest.MonkeyPatch) -> None:
    warmed: list[str] = []
    for name in ("sleep", "linear_probe"):
        monkeypatch.setitem(KINDS._entries, name, dataclasses.replace(
            KINDS.get(name), warm=functools.partial(warmed.append, name)))
    monkeypatch.setattr(runner_module, "WARM_LOOK_INTERVAL", 0.0)
    held = area.claim(queue(area, toy_pipeline()))  # names sleep; held elsewhere throughout
    assert held is not None
    one_stage = {"name": "one", "current_stage": "train",
                 "config": {"sleep": {"result": 0.5}, "metric": "top1"},
                 "stages": {"train": {"hyperparams": {"kind": "sleep"}}}}
    queue(area, one_stage, "one.yaml")
    drain(area, idle_limit=0.3)
    assert warmed == []  # it ran a sleep job first: the code was there to run it
    assert yamlio.load_mapping(area.folder(FINISHED) / "one.yaml")["result"] == 0.5
    # A hyperparams stage without a kind runs the default one, and so names it.
    del one_stage["stages"]["train"]["hyperparams"]["kind"]
    assert kinds_named(one_stage) == {"linear_probe"}
    assert kinds_named(toy_pipeline(), "train_val") == {"sleep"}
    assert kinds_named(toy_pipeline(), "datasets") == set()


def test_a_look_at_an_unreadable_file_is_paid_once_per_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "planted.yaml"
    path.write_text("[not, a, mapping]\n")
    parses: list[Path] = []
    load = yamlio.load_mapping
    monkeypatch.setattr(yamlio, "load_mapping", lambda p: parses.append(p) or load(p))
    looks = Looks()
    depths = []
    for _ in range(3):
        with pytest.raises(yamlio.YamlFileError) as raised:
            looks.read(path)
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert parses == [path]
    assert depths[0] == depths[1] == depths[2]  # a cached error's traceback does not pile up
    path.write_text("id: fixed\n")  # a new version is read again
    assert looks.read(path) == {"id": "fixed"} and parses == [path, path]
