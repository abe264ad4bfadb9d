"""A hostile work area: whoever can write a yaml into it can make runners compute, but never
read, write, move or delete a file outside it, make two jobs share an id, or erase a crash.

Each group of docs/PROTOCOL.md's threat model has its cases here; the YAML and image bombs are
in tests/test_hostile_inputs_files.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, drain, queue, toy_pipeline
from vtab import status, yamlio
from vtab.errors import ConfigError
from vtab.evaluation import probe
from vtab.launch import local as launch_local
from vtab.outcome import RunOutcome
from vtab.pipeline import StageContext, register_kind
from vtab.runner import BLOCKED_EXIT, CRASHED_EXIT
from vtab.schema import Section
from vtab.workarea import CRASHED, FINISHED, SUMMARIZED, WAITING, WorkArea


def _sleep_job(**extra: Any) -> dict[str, Any]:
    return {"current_stage": "run", "config": {"sleep": {"result": 0.5}},
            "stages": {"run": {"hyperparams": {"kind": "sleep"}}}, **extra}


def _outside(tmp_path: Path) -> Path:
    """A file outside the work area that no job may touch; returns it."""
    victim = tmp_path / "victim" / "conf.yaml"
    victim.parent.mkdir()
    victim.write_text("precious: true\n")
    return victim


def _crash_of(area: WorkArea, stem: str) -> dict[str, Any]:
    return yamlio.load_mapping(area.folder(CRASHED) / f"{stem}.yaml")["error"]


# -- files outside the work area --------------------------------------------------------------


@pytest.mark.parametrize(("keys", "bad_key"), [
    ({"parent": "../../victim/conf"}, "parent"),
    ({"pipeline": "../../escape_target"}, "pipeline"),
    ({"id": "../x"}, "id"),
    ({"forks": {"s": ["ok", "../../victim/conf"]}}, "forks.s[1]"),
    ({"waiting_for": {"stage": "run", "children": ["/etc/passwd"]}}, "waiting_for.children[0]"),
    ({"finished_in": "../../victim"}, "finished_in"),
])
def test_ids_a_job_carries_never_lead_out_of_the_area(area: WorkArea, tmp_path: Path,
                                                      keys: dict[str, Any], bad_key: str) -> None:
    victim = _outside(tmp_path)
    doc = _sleep_job(id="hand", pipeline="hand", parent=None) | keys
    queue(area, doc, "hand.yaml")
    assert drain(area) == CRASHED_EXIT
    error = _crash_of(area, "hand")
    assert error["key"] == bad_key and "hand.yaml" in error["message"]
    assert victim.read_text() == "precious: true\n"  # not moved, not written
    assert {p.name for p in tmp_path.iterdir()} == {"victim", "work"}  # nothing new outside


def test_a_planted_finished_job_cannot_lead_summarize_out_of_the_area(area: WorkArea,
                                                                      tmp_path: Path) -> None:
    victim = _outside(tmp_path)
    # Written by hand into finished/, as if a child of the pipeline: its forks point outside.
    yamlio.write_mapping(area.folder(FINISHED) / "child.yaml",
                         {"id": "child", "pipeline": "root", "result": 0.5,
                          "forks": {"s": ["../../victim/conf"]}})
    queue(area, {"id": "root", "pipeline": "root", "parent": None, "current_stage": "sum",
                 "forks": {"d": ["child"]}, "stages": {"sum": {"processor": "summarize"}}},
          "root.yaml")
    assert drain(area) == CRASHED_EXIT
    assert "'../../victim/conf' is not a valid job id" in _crash_of(area, "root")["message"]
    assert victim.read_text() == "precious: true\n"
    assert {p.name for p in tmp_path.iterdir()} == {"victim", "work"}


def test_a_job_file_that_is_a_link_is_never_followed(area: WorkArea, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "executions.log"
    target = tmp_path / "elsewhere.yaml"
    yamlio.write_mapping(target, _sleep_job(config={"sleep": {"log": str(log)}}))
    (area.root / "link.yaml").symlink_to(target)
    (area.root / "dangling.yaml").symlink_to(tmp_path / "nothing.yaml")
    (area.root / "folder.yaml").mkdir()
    os.mkfifo(area.root / "fifo.yaml")
    assert drain(area) == 0  # nothing to do: none of them is a job
    assert not log.exists()  # the link's target was never run, nor read as a job
    assert (area.root / "link.yaml").is_symlink() and target.exists()
    assert status.main(["--work_area", str(area.root)]) == 0
    out = capsys.readouterr().out
    for line in ("link.yaml: a symbolic link", "dangling.yaml: a symbolic link",
                 "folder.yaml: a folder", "fifo.yaml: not a plain file"):
        assert line in out


@pytest.mark.parametrize(("name", "why"), [
    ("@nightly.yaml", "its name is not a job id"),
    ("job@1a2b3c4d.yaml", "a claim file moved out of running/"),
    ("x" * 240 + ".yaml", "its name is not a job id"),
])
def test_a_file_whose_name_is_no_job_id_is_left_alone_and_shown(
        area: WorkArea, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
        why: str) -> None:
    log = tmp_path / "executions.log"
    (area.root / name).write_text(yamlio.dump(_sleep_job(config={"sleep": {"log": str(log)}})))
    assert drain(area, storage_failures=1) == 0  # no storage trouble, no crash, no run
    assert not log.exists() and (area.root / name).exists()
    assert area.listing(CRASHED) == [] and list(area.folder(CRASHED).iterdir()) == []
    status.main(["--work_area", str(area.root)])
    assert f"{name}: {why}" in capsys.readouterr().out


# -- identity ---------------------------------------------------------------------------------


def _named(name: str, result: float, datasets: tuple[str, ...] = ("a",)) -> dict[str, Any]:
    doc = toy_pipeline(datasets=datasets)
    doc["name"] = name
    doc["stages"]["tune"]["grid"]["sleep.result"] = [result]
    return doc


def test_two_pipelines_queued_at_once_under_one_name_do_not_mix(area: WorkArea) -> None:
    queue(area, _named("same", 0.25, datasets=("a", "b", "c")), "first.yaml")
    queue(area, _named("same", 0.75, datasets=("a", "b", "c")), "second.yaml")
    runners = subprocess.run(
        [sys.executable, "main_runner.py", "--work_area", str(area.root), "--devices",
         "cpu,cpu,cpu", "--poll_interval", "0.02", "--no_progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert runners.returncode == CRASHED_EXIT, runners.stdout + runners.stderr
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "same" / "summary.yaml")
    results = {entry["result"] for entry in summary["datasets"].values()}
    assert len(results) == 1  # one pipeline's numbers only
    loser = "second" if results == {0.25} else "first"
    error = _crash_of(area, loser)
    assert error["key"] == "name" and "already names another pipeline" in error["message"]
    jobs = list((area.folder(SUMMARIZED) / "same" / "jobs").glob("*.yaml"))
    assert len(jobs) == 1 + 3 * 6  # the root, and per dataset its job, 2 tuning and 3 final runs


def test_a_pipeline_cannot_take_another_pipelines_root_as_its_child(area: WorkArea) -> None:
    queue(area, _named("a__x", 0.25), "ax.yaml")
    assert drain(area) == 0
    before = (area.folder(SUMMARIZED) / "a__x" / "summary.yaml").read_bytes()
    doc = _named("a", 0.75, datasets=("x", "y"))
    queue(area, doc, "a.yaml")
    assert drain(area) == CRASHED_EXIT
    error = _crash_of(area, "a")
    assert error["key"] == "stages.datasets.grid"
    assert "would fork 'a__x', which already names the pipeline 'a__x'" in error["message"]
    assert "nothing was forked" in error["message"]
    assert not (area.root / "a__y.yaml").exists()  # refused before any child was queued
    assert (area.folder(SUMMARIZED) / "a__x" / "summary.yaml").read_bytes() == before


def test_a_name_is_freed_only_by_a_pipeline_that_crashed_before_forking(area: WorkArea,
                                                                           tmp_path: Path) -> None:
    def failing(result: float) -> dict[str, Any]:  # its log is a folder: its run fails
        job = _sleep_job(name="p", config={"sleep": {"result": result, "log": str(tmp_path)}})
        return job

    queue(area, failing(0.1), "p.yaml")
    assert drain(area, max_attempts=1) == CRASHED_EXIT
    first = (area.folder(CRASHED) / "p.yaml").read_bytes()
    # Fixed and queued again under the same name: the first never forked, so the name is free.
    queue(area, failing(0.2), "p.yaml")
    assert drain(area, max_attempts=1) == CRASHED_EXIT
    assert (area.folder(CRASHED) / "p.yaml").read_bytes() == first  # never overwritten
    assert yamlio.load_mapping(area.folder(CRASHED) / "p+2.yaml")["config"]["sleep"][
        "result"] == 0.2
    queue(area, _sleep_job(name="p", config={"sleep": {"result": 0.3}}), "p.yaml")
    assert drain(area) == 0  # a third try finishes
    # A finished pipeline keeps its name: another one under it is refused, results kept.
    queue(area, _sleep_job(name="p", config={"sleep": {"result": 0.9}}), "again.yaml")
    assert drain(area) == CRASHED_EXIT
    assert yamlio.load_mapping(area.folder(FINISHED) / "p.yaml")["result"] == 0.3
    error = _crash_of(area, "again")
    assert error["key"] == "name" and "already names another pipeline" in error["message"]


def test_children_whose_parent_was_deleted_are_not_called_drained(area: WorkArea) -> None:
    queue(area, toy_pipeline(datasets=("a",)))
    assert drain(area, max_jobs=2) == 0  # the root and the dataset job forked and wait
    for waiting in area.listing(WAITING):
        waiting.unlink()  # deleted by hand
    assert drain(area) == BLOCKED_EXIT  # not 0: the pipeline cannot be finished
    assert area.listing(FINISHED)  # the children ran


# -- files in flight --------------------------------------------------------------------------


def _copy_slowly(path: Path, text: str, cut: int, pause: float) -> threading.Thread:
    """Write `text` to `path` as a slow `cp` would: `cut` characters, a pause, the rest."""
    handle = open(path, "w")  # noqa: SIM115 (written on from a thread)
    handle.write(text[:cut])
    handle.flush()

    def finish() -> None:
        time.sleep(pause)
        handle.write(text[cut:])
        handle.close()

    writer = threading.Thread(target=finish)
    writer.start()
    return writer


def test_a_pipeline_still_being_copied_never_runs_cut_short(area: WorkArea) -> None:
    doc = toy_pipeline(datasets=("a",))
    doc["stages"]["final"]["grid"]["seed"] = [0, 1, 2, 3]
    text = yamlio.dump(doc).removesuffix("...\n")  # as a person writes it: no end marker
    cut = text.index("      - 2\n")  # a valid pipeline with 2 of its 4 final seeds
    assert yamlio.parse_mapping(text[:cut].encode(), "cut")["stages"]["final"]["grid"] == {
        "seed": [0, 1]}
    writer = _copy_slowly(area.root / "toy.yaml", text, cut, pause=1.5)
    assert drain(area, settle_time=3.0) == 0
    writer.join()
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "toy" / "summary.yaml")
    assert set(summary["datasets"]["a"]["seeds"]) == {0, 1, 2, 3}


def test_a_file_ending_with_the_end_marker_runs_at_once(area: WorkArea) -> None:
    (area.root / "job.yaml").write_text(yamlio.dump(_sleep_job(name="job")))  # ends with ...
    started = time.monotonic()
    assert drain(area, settle_time=60.0) == 0
    assert time.monotonic() - started < 10
    assert (area.folder(FINISHED) / "job.yaml").exists()


# -- settings ---------------------------------------------------------------------------------


def test_runners_of_one_area_judge_leases_alike(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    area = WorkArea(tmp_path / "work")
    assert area.settings({"lease_timeout": 60.0}).lease_timeout == 60.0  # the first runner's
    code = launch_local.main(["--work_area", str(area.root), "--devices", "cpu",
                        "--lease_timeout", "1"])
    assert code == 2
    assert "--lease_timeout: this work area's lease_timeout is 60" in capsys.readouterr().err
    assert area.settings().lease_timeout == 60.0  # a runner without the option takes the area's


@pytest.mark.parametrize("plain_file", ["", "running"])
def test_a_work_area_that_is_not_a_folder_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], plain_file: str) -> None:
    root = tmp_path / "work"
    if plain_file:
        root.mkdir()
    (root / plain_file if plain_file else root).write_text("not a folder\n")
    assert launch_local.main(["--work_area", str(root), "--devices", "cpu"]) == 2
    assert "is not a folder" in capsys.readouterr().err


# -- lesser cases -----------------------------------------------------------------------------


class _OutputsConfig(Section):
    taken_over: bool = False


@register_kind("test_outputs", _OutputsConfig)
def _writes_outputs(config: _OutputsConfig, ctx: StageContext) -> RunOutcome:
    """Writes an output file; with `taken_over`, another runner then takes the job over."""
    ctx.outputs_dir().mkdir(parents=True)
    (ctx.outputs_dir() / "predictions.csv").write_text("id,target\n")
    if config.taken_over:
        mine = ctx.staging.with_name(ctx.staging.name.removesuffix(".outputs") + ".yaml")
        mine.rename(mine.with_name(mine.name.split("@")[0] + "@ffffffff.yaml"))
    return RunOutcome({"result": 1.0})


@pytest.mark.parametrize("taken_over", [False, True])
def test_outputs_are_published_only_by_the_runner_that_holds_the_job(
        area: WorkArea, taken_over: bool) -> None:
    queue(area, {"current_stage": "run", "stages": {"run": {"hyperparams": {
        "kind": "test_outputs", "taken_over": taken_over}}}}, "job.yaml")
    drain(area, idle_limit=1.0)
    published = area.root / "outputs" / "job" / "job" / "predictions.csv"
    assert published.exists() is not taken_over
    assert not list(area.folder("running").glob("*.outputs"))  # nothing left staged


def test_sparse_labels_get_no_top5_and_say_how_many_classes_trained(
        area: WorkArea, digits_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split in ("train800", "val200"):
        lines = (digits_root / "digits" / f"{split}.txt").read_text().splitlines()
        kept = [line for line in lines if line.split()[1] in ("0", "5", "9")]
        for line in kept:  # the images of labels 0, 5 and 9 only
            image = root / "sparse" / line.split()[0]
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(digits_root / "digits" / line.split()[0], image)
        (root / "sparse" / f"{split}.txt").write_text("\n".join(kept) + "\n")
    config = {"dataset": "sparse", "data": {"root": str(root)},
              "backbone": {"name": "resnet18"}, "features": {"image_size": 16},
              "optim": {"lr": 0.1, "epochs": 1}}
    result = probe.run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False)
    assert (result["num_classes"], result["classes_in_train"]) == (10, 3)
    assert "top5" not in result["metrics"]  # it would be near 1 with three real classes
    with pytest.raises(ConfigError, match="has 3 \\(labels 0, 5, 9\\)"):
        probe.run_linear_probe({**config, "metric": "top5"}, cache_dir=tmp_path / "cache",
                               progress=False)


# -- the review's variants --------------------------------------------------------------------


@pytest.mark.parametrize("linked", ["outputs/toy", "summarized/toy", "crashed", "meta/ids"])
def test_a_folder_swapped_for_a_link_never_leads_out(area: WorkArea, tmp_path: Path,
                                                     linked: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    target = area.root / linked
    if target.exists():
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(victim)
    queue(area, toy_pipeline(datasets=("a",)))
    drain(area, idle_limit=2.0)
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]  # nothing written, moved
    assert (victim / "precious.txt").read_text() == "keep me\n"


def test_a_runner_stops_when_a_folder_of_the_area_becomes_a_link(area: WorkArea,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    area.folder("finished").rmdir()
    area.folder("finished").symlink_to(tmp_path / "victim")
    queue(area, _sleep_job(), "job.yaml")
    with pytest.raises(Exception, match="symbolic link"):
        WorkArea(area.root)
    assert drain(area) == 2  # its sweep finds it before any job could go there
    assert list((tmp_path / "victim").iterdir()) == []


def test_a_fifo_planted_as_a_reservation_does_not_hang_the_runner(area: WorkArea) -> None:
    os.mkfifo(area.root / "meta" / "ids" / "job")
    queue(area, _sleep_job(), "job.yaml")
    assert drain(area) == CRASHED_EXIT  # at once, not blocked on the FIFO
    assert "cannot be read" in _crash_of(area, "job")["message"]


def test_a_sleep_log_outside_the_allowed_folder_is_refused(area: WorkArea,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("VTAB_SLEEP_LOG_DIR", str(tmp_path / "logs"))
    queue(area, _sleep_job(config={"sleep": {"log": str(tmp_path / "elsewhere.log")}}),
          "job.yaml")
    assert drain(area) == CRASHED_EXIT
    assert _crash_of(area, "job")["key"] == "sleep.log"
    assert not (tmp_path / "elsewhere.log").exists()


def test_module_backbones_run_only_from_trusted_modules(area: WorkArea, digits_root: Path) -> None:
    config = {"dataset": "digits", "data": {"root": str(digits_root)},
              "backbone": {"name": "sys:exit", "source": "module"},
              "optim": {"lr": 0.1, "epochs": 1}}
    queue(area, {"current_stage": "run", "config": config,
                 "stages": {"run": {"hyperparams": {"kind": "linear_probe"}}}}, "job.yaml")
    assert drain(area) == CRASHED_EXIT  # the runner lived on to say so
    error = _crash_of(area, "job")
    assert error["key"] == "backbone.name" and "does not trust" in error["message"]


def test_pipelines_with_stages_never_reached_or_negative_counts_are_refused(
        area: WorkArea) -> None:
    unreached = _sleep_job(name="u")
    unreached["stages"]["spare"] = {"grid": {"seed": list(range(1000))}, "child_stage": "run"}
    queue(area, unreached, "u.yaml")
    queue(area, _sleep_job(name="n", attempts=-4), "n.yaml")
    assert drain(area) == CRASHED_EXIT
    assert _crash_of(area, "u")["key"] == "stages.spare"
    assert _crash_of(area, "n")["key"] == "attempts"
    assert len(area.queued()) == 0 and not list(area.root.glob("u__*"))


def test_a_name_reserved_by_a_claim_that_died_before_writing_is_taken_back(
        area: WorkArea) -> None:
    from vtab.claims import fingerprint as _fingerprint
    from vtab.pipeline import prepare_root

    doc = _sleep_job(name="p")
    root = prepare_root(doc, "p")
    area.reserve("p", {"pipeline": "p", "fingerprint": _fingerprint(root),
                       "instance": "deadbeef"})  # that claim is gone: its runner died
    queue(area, doc, "p.yaml")
    assert drain(area) == 0
    assert (area.folder(FINISHED) / "p.yaml").exists()
