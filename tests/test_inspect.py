"""main_inspect.py: a job's worst-classified samples, the surest mistakes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtab.evaluation.metrics import SINGLE_LABEL_FIELDS, write_per_sample_csv
from vtab.inspect import main

ROWS = [  # id, split, target, prediction, correct, confidence, margin, loss
    ("a.png", "test", 1, 1, 1, 0.9, 0.8, 0.1),
    ("b.png", "test", 2, 0, 0, 0.6, 0.3, 1.9),
    ("c.png", "test", 0, 2, 0, 0.8, 0.7, 3.2),
    ("d.png", "test", 1, 0, 0, 0.5, 0.1, 0.9),
]


@pytest.mark.parametrize("place", ["outputs/p/p__x", "summarized/p/outputs/p__x"])
def test_the_surest_mistakes_come_first(tmp_path: Path, place: str,
                                        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / place).mkdir(parents=True)
    write_per_sample_csv(tmp_path / place / "test_predictions.csv", SINGLE_LABEL_FIELDS,
                         [dict(zip(SINGLE_LABEL_FIELDS, row, strict=True)) for row in ROWS])
    assert main(["p__x", "--work_area", str(tmp_path), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{place}/test_predictions.csv: 3 of 4 wrong"
    assert lines[1].split() == ["id", "target", "prediction", "confidence", "margin", "loss"]
    assert [line.split()[0] for line in lines[2:]] == ["c.png", "b.png"]  # by loss


def test_an_unknown_job_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["nope", "--work_area", str(tmp_path)]) == 2
    assert "no per-sample tables of nope" in capsys.readouterr().out
