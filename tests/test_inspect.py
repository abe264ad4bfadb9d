"""main_inspect.py: a job's worst-classified samples, the surest mistakes first."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
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


def test_a_projection_of_a_finished_job(digits_root: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import drain_shipped

    area, code = drain_shipped(tmp_path / "work", "debug/debug.yaml", digits_root, monkeypatch,
                               epochs=3)
    assert code == 0
    job = "debug__digits__final__seed=0"
    out_name = str(tmp_path / "p.lr0.1")
    assert main([job, "--work_area", str(area.root), "--projection", out_name]) == 0
    out = capsys.readouterr().out  # a dotted name keeps its dots
    assert "test_predictions.csv" in out and f"wrote {tmp_path / 'p.lr0.1.png'}" in out
    with (tmp_path / "p.lr0.1.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 797 and list(rows[0]) == ["id", "x", "y", "target", "prediction",
                                                  "correct"]
    assert (tmp_path / "p.lr0.1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The projection against a hand-made PCA (numpy's SVD of the centred training features),
    # up to the sign of each component.
    from vtab import yamlio
    from vtab.evaluation.store import FeatureCache

    keys = yamlio.load_mapping(area.summarized_jobs("debug") / f"{job}.yaml")["report"]["features"]
    store = FeatureCache(area.root / "cache" / "features")
    train, test = (store.load(keys[role]["keys"]["output"]).float().double().numpy()
                   for role in ("train", "eval"))
    mean = train.mean(0)
    components = np.linalg.svd(train - mean, full_matrices=False)[2][:2]
    expected = (test - mean) @ components.T
    ours = np.array([[float(row["x"]), float(row["y"])] for row in rows])
    signs = np.sign((ours * expected).sum(0))
    np.testing.assert_allclose(ours, expected * signs, rtol=1e-3, atol=1e-3)
    correct = [row["correct"] == "1" for row in rows]
    assert 0 < sum(correct) < len(rows)  # some of each, marked


def test_a_table_without_a_correct_column_has_it_computed_or_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "outputs" / "p" / "p__x"
    folder.mkdir(parents=True)
    (folder / "test_predictions.csv").write_text("id,target,prediction,loss\n"
                                                 "a.png,1,1,0.1\nb.png,2,0,1.9\n")
    assert main(["p__x", "--work_area", str(tmp_path)]) == 0
    assert "test_predictions.csv: 1 of 2 wrong" in capsys.readouterr().out
    (folder / "test_predictions.csv").write_text("id,score\na.png,0.5\n")
    assert main(["p__x", "--work_area", str(tmp_path)]) == 2
    assert "test_predictions.csv has no correct column" in capsys.readouterr().out


def test_a_job_of_several_variants_projects_the_one_named(digits_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import drain, queue
    from tests.test_evaluation import probe_config
    from vtab.workarea import WorkArea

    config = probe_config(digits_root, **{"head": {"kind": "knn", "k": [5, 10]}})
    del config["optim"], config["seed"]
    area = WorkArea(tmp_path / "work")
    queue(area, {"name": "k", "current_stage": "run", "config": config,
                 "stages": {"run": {"hyperparams": {"kind": "linear_probe"}}}})
    assert drain(area) == 0
    out = str(tmp_path / "proj")
    assert main(["k", "--work_area", str(area.root), "--projection", out]) == 2
    assert "reports the variants 'k=5', 'k=10': name one with --variant" in \
        capsys.readouterr().out
    assert main(["k", "--work_area", str(area.root), "--projection", out,
                 "--variant", "k=10"]) == 0
    with (tmp_path / "proj.csv").open() as handle:
        marks = [row["correct"] for row in csv.DictReader(handle)]
    with (area.root / "outputs" / "k" / "k" / "val200_k_10_predictions.csv").open() as handle:
        assert marks == [row["correct"] for row in csv.DictReader(handle)]


def test_umap_without_umap_learn_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from vtab.errors import VtabError
    from vtab.evaluation.projection import project

    real = builtins.__import__

    def without_umap(name: str, *args: object, **kwargs: object) -> object:
        if name == "umap":
            raise ImportError("No module named 'umap'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_umap)
    points = np.zeros((4, 3))
    with pytest.raises(VtabError, match="needs umap-learn, which is not installed: pip install "
                                        "umap-learn"):
        project(points, points, "umap")
