"""The status view of a work area."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import drain, queue, toy_pipeline
from vtab import status
from vtab.runner import CRASHED_EXIT
from vtab.workarea import WorkArea


def _status(area: WorkArea) -> str:
    return "\n".join(status.status_lines(area))


def test_each_folder_is_counted_and_its_jobs_named(area: WorkArea, tmp_path: Path) -> None:
    doc = toy_pipeline(datasets=("a",))
    # A log that is a folder: every tuning run fails while it runs.
    doc["stages"]["train_val"] = {"hyperparams": {"kind": "sleep", "sleep.log": str(tmp_path)}}
    queue(area, doc)
    drain(area)
    queue(area, {"current_stage": "run", "stages": {"run": {"hyperparams": {"kind": "sleep"}}}},
          "later.yaml")
    claim = area.claim(area.root / "later.yaml")
    assert claim is not None
    queue(area, {"current_stage": "run", "stages": {"run": {"hyperparams": {"kind": "sleep"}}}},
          "next.yaml")
    text = _status(area)
    assert "  queued:   1\n    next\n" in text
    held = rf"    {claim.path.stem}  stage=run attempt=\? runner=\? heartbeat \d+s ago"
    assert re.search(rf"  running:  1\n{held}\n", text)
    assert "  waiting:  2\n    toy  0/1 children finished\n" in text
    assert "    toy__a  0/" in text and "crashed: toy__a__tune__" in text
    assert "  crashed:  6\n" in text and "Is a directory" in text


def test_unreadable_crashed_files_are_counted_until_retried(area: WorkArea) -> None:
    (area.root / "broken.yaml").write_text("current_stage: [unclosed\n")
    assert drain(area) == CRASHED_EXIT
    assert "    (1 unreadable files, errors in crashed/*.error.txt)" in _status(area)
    (area.folder("crashed") / "broken.yaml").rename(area.root / "broken.yaml")  # retried
    assert "unreadable files" not in _status(area)


def test_files_that_are_not_jobs_are_pointed_out(area: WorkArea) -> None:
    (area.root / "notes.yml").write_text("current_stage: run\n")
    (area.root / ".hidden").write_text("")
    text = _status(area)
    assert "  queued:   0\n    not queued (only *.yaml files are jobs): notes.yml\n" in text


def test_a_missing_work_area_is_an_error(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["--work_area", str(tmp_path / "nowhere")]) == 1
    assert "no such work area" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
