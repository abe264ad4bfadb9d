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
from vtab import runner, status, yamlio
from vtab.errors import ConfigError
from vtab.evaluation import probe
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


def test_a_crashed_root_and_its_refused_namesake_both_keep_their_records(area: WorkArea) -> None:
    root = _sleep_job(name="p")
    root["stages"]["run"]["hyperparams"]["sleep.log"] = "/nonexistent-folder/log"
    queue(area, root, "p.yaml")
    assert drain(area, max_attempts=1) == CRASHED_EXIT
    first = (area.folder(CRASHED) / "p.yaml").read_bytes()
    queue(area, _sleep_job(name="p", config={"sleep": {"result": 0.9}}), "p.yaml")
    assert drain(area) == CRASHED_EXIT
    assert (area.folder(CRASHED) / "p.yaml").read_bytes() == first  # the crashed root, intact
    error = yamlio.load_mapping(area.folder(CRASHED) / "p+2.yaml")["error"]
    assert error["key"] == "name" and "another pipeline" in error["message"]
    assert "crashed/p.yaml" in error["message"]


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
    code = runner.main(["--work_area", str(area.root), "--devices", "cpu",
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
    assert runner.main(["--work_area", str(root), "--devices", "cpu"]) == 2
    assert "is not a folder: a work area needs the folders" in capsys.readouterr().err


# -- lesser cases -----------------------------------------------------------------------------


class _OutputsConfig(Section):
    taken_over: bool = False


@register_kind("test_outputs", _OutputsConfig)
def _writes_outputs(config: _OutputsConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes an output file; with `taken_over`, another runner then takes the job over."""
    ctx.outputs_dir().mkdir(parents=True)
    (ctx.outputs_dir() / "predictions.csv").write_text("id,target\n")
    if config.taken_over:
        mine = ctx.staging.with_name(ctx.staging.name.removesuffix(".outputs") + ".yaml")
        mine.rename(mine.with_name(mine.name.split("@")[0] + "@ffffffff.yaml"))
    return {"result": 1.0}


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
