"""The debug pipeline end to end: two runner processes, real features and heads, the table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, drain
from vtab import yamlio
from vtab.evaluation.digits import write_digits
from vtab.results import one_per_pass
from vtab.runner import BLOCKED_EXIT
from vtab.workarea import CRASHED, FINISHED, RUNNING, SUMMARIZED, WAITING, WorkArea


@pytest.mark.slow
def test_two_runners_drain_the_debug_pipeline(tmp_path: Path) -> None:
    data = tmp_path / "vtab-1k"
    write_digits(data)
    area = WorkArea(tmp_path / "work")
    shutil.copy(REPO / "pipelines" / "debug" / "debug.yaml", area.root)
    env = {**os.environ, "VTAB1K_ROOT": str(data), "VTAB_DEBUG_EPOCHS": "10"}
    runner = subprocess.run(
        [sys.executable, "main_runner.py", "--work_area", str(area.root), "--devices", "cpu,cpu",
         "--no_progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert runner.returncode == 0, runner.stdout + runner.stderr
    for folder in (RUNNING, WAITING, FINISHED, CRASHED):
        assert area.listing(folder) == [], folder

    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "debug" / "summary.yaml")
    digits = summary["datasets"]["digits"]
    assert 0.5 < digits["result"] <= 1.0  # ten classes: chance is 0.1
    assert set(digits["seeds"]) == {0, 1, 2}
    assert digits["selected"]["optim.lr"] in (0.1, 0.01)
    assert len(digits["tuning"]) == 2
    jobs = area.summarized_jobs("debug")
    assert len(list(jobs.glob("*.yaml"))) == 9
    final = yamlio.load_mapping(jobs / "debug__digits__final__seed=0.yaml")
    assert final["config"]["data"]["root"] == str(data)  # resolved at expansion and recorded
    assert final["env"]["VTAB1K_ROOT"] == str(data)
    assert final["config"]["optim"]["lr"] == digits["selected"]["optim.lr"]
    assert final["metrics"]["top1"] == final["result"]
    assert final["report"]["num_eval"] == 797
    assert "backbone" not in final  # the kind's report stays under report: config.backbone is
    assert final["report"]["backbone"]["weights_id"] == "random-seed0"  # the only one on top
    outputs = area.folder(SUMMARIZED) / "debug" / "outputs" / final["id"]
    assert final["artefacts"] == sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*")
                                        if p.is_file())
    assert {"curves.csv", "test_predictions.csv"} < set(final["artefacts"])
    assert final["provenance"]["device"] == "cpu"
    # What ran, exactly: every key the kind read, defaults filled in (the image size is the
    # pipeline's; the backbone's own would be 224), and nothing else.
    assert final["run_config"]["features"] == {
        "image_size": 32, "batch_size": 128, "precision": "fp32",  # what auto is on the CPU
        "layers": [{"name": "output", "pool": "none"}],  # the backbone's own pooled output
        "storage": "fp32", "mode": "offline"}
    assert final["run_config"]["optim"]["warmup_epochs"] == 0  # a default, filled in
    assert set(final["run_config"]) == {"kind", "dataset", "data", "backbone", "features",
                                        "head", "optim", "seed", "metric"}
    assert (summary["metric"], summary["split"]) == ("top1", "test")
    assert digits["evaluated_on"] == {"split": "test", "metric": "top1"}
    assert digits["selected_on"] == {"split": "val200", "metric": "top1"}
    # The backbone ran once per split for seven heads: train800 and train800val200 on the
    # training side, val200 and test on the evaluation side, each extracted by one pass only
    # (sibling jobs trained in one pass share its features).
    heads = [yamlio.load_mapping(p) for p in jobs.glob("*__*__*.yaml")]
    assert len(heads) == 7
    passes = one_per_pass(heads)
    assert sum(not job["report"]["features"]["train"]["cached"] for job in passes) == 2
    assert sum(not job["report"]["features"]["eval"]["cached"] for job in passes) == 2

    table = subprocess.run(
        [sys.executable, "main_parse_results.py", "--root", str(area.folder(SUMMARIZED))],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "digits" in table.stdout
    assert "mean±std over seeds of top1 on test." in table.stdout
    assert "selected hyperparameters (chosen by the best mean top1 on val200):" in table.stdout
    assert f"{100 * digits['result']:.1f}" in table.stdout


def test_a_missing_data_root_crashes_the_dataset_job_before_its_runs_are_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTAB1K_ROOT", str(tmp_path / "nowhere"))
    area = WorkArea(tmp_path / "work")
    shutil.copy(REPO / "pipelines" / "debug" / "debug.yaml", area.root)
    assert drain(area) == BLOCKED_EXIT
    (crashed,) = area.listing(CRASHED)  # the dataset's job, when it would fork the tuning runs
    assert crashed.stem == "debug__digits"
    error = yamlio.load_mapping(crashed)["error"]
    assert error["key"] == "data.root"
    assert crashed.name in error["message"] and "nowhere" in error["message"]
    assert "in 4 jobs" in error["message"]
    assert {p.stem for p in area.listing(WAITING)} == {"debug"}
