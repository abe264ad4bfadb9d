"""Every pipeline in pipelines/ passes `main_status.py --plan`: each job's keys, its backbone,
layers and pooling (checked on the model), its data folders and split files. The datasets are
stand-ins: split files of the right names with a few hundred lines (images are not opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from vtab import status, yamlio

SHIPPED = sorted((REPO / "pipelines").rglob("*.yaml"))
SPLITS = ("train800", "val200", "train800val200", "test", "trainval")


def stand_in_root(root: Path, pipeline: Path) -> Path:
    """A data root with every dataset the pipeline names, each split 300 lines of 10 classes."""
    stages = yamlio.load_mapping(pipeline)["stages"].values()
    datasets = {name for stage in stages for name in stage.get("grid", {}).get("dataset", [])}
    lines = "".join(f"images/{i}.png {i % 10}\n" for i in range(300))
    for dataset in datasets:
        (root / dataset).mkdir(parents=True)
        for split in SPLITS:
            (root / dataset / f"{split}.txt").write_text(lines)
    return root


def test_every_folder_of_pipelines_is_covered() -> None:
    assert {p.parent.name for p in SHIPPED} == {"debug", "heads", "vissl", "dinov2", "vtab1k",
                                                "workflows"}


@pytest.mark.parametrize("pipeline", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_a_shipped_pipeline_plans_without_problems(
        pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = stand_in_root(tmp_path / "data", pipeline)
    for variable in ("VTAB1K_ROOT", "VOC07_ROOT"):
        monkeypatch.setenv(variable, str(root))
    checkpoints = tmp_path / "run"  # stand-ins too: a plan checks that they exist
    checkpoints.mkdir()
    for step in (0, 1000):
        (checkpoints / f"checkpoint_{step}.pth").write_bytes(b"weights")
    monkeypatch.setenv("VTAB_CHECKPOINTS", str(checkpoints))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # weights: advice, not errors
    code = status.main(["--plan", str(pipeline)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "checked the" in out
