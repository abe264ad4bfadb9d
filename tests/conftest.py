"""Shared fixtures: small pipelines of `sleep` jobs and a way to drain a work area."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtab.fsutil import atomic_write
from vtab.kinds import LOG_DIR
from vtab.runner import Runner, RunnerSettings
from vtab.workarea import WorkArea

REPO = Path(__file__).resolve().parent.parent


def toy_pipeline(log: Path | None = None, seconds: float = 0.0,
                 datasets: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    """The VTAB-1K protocol's shape with `sleep` jobs whose result is a swept value."""
    sleep: dict[str, Any] = {"seconds": seconds}
    if log is not None:
        sleep["log"] = str(log)
    return {
        "name": "toy",
        "current_stage": "datasets",
        "config": {"sleep": sleep, "metric": "top1"},
        "stages": {
            "datasets": {"grid": {"dataset": list(datasets)}, "child_stage": "tune",
                         "next_stage": "summarize"},
            "tune": {"grid": {"sleep.result": [0.25, 0.75, 0.5], "seed": [0, 1]},
                     "child_stage": "train_val", "next_stage": "select"},
            "train_val": {"hyperparams": {"kind": "sleep"}},
            "select": {"processor": "select_best", "next_stage": "final"},
            "final": {"grid": {"seed": [0, 1, 2]}, "child_stage": "train_test",
                      "next_stage": "aggregate"},
            "train_test": {"hyperparams": {"kind": "sleep"}},
            "aggregate": {"processor": "aggregate"},
            "summarize": {"processor": "summarize"},
        },
    }


TOY_JOBS_PER_DATASET = 1 + 6 + 3  # the dataset job, its tuning runs, its final runs


def queue(area: WorkArea, doc: dict[str, Any], name: str = "toy.yaml") -> Path:
    path = area.root / name
    # Whole at once, and marked so (YAML's end marker): runners may be watching.
    atomic_write(path, yaml.safe_dump(doc, sort_keys=False, explicit_end=True))
    return path


def drain(area: WorkArea, **settings: Any) -> int:
    """Run one runner in this process until the area is drained."""
    defaults: dict[str, Any] = {"lease_timeout": 5.0, "settle_time": 0.0, "poll_interval": 0.05,
                                "sweep_interval": 0.05, "idle_limit": 60.0, "progress": False}
    return Runner(area, RunnerSettings(**{**defaults, **settings}), "cpu", "test-runner").run()


def drain_shipped(folder: Path, pipeline: str, data_root: Path, monkeypatch: pytest.MonkeyPatch,
                  epochs: int) -> tuple[WorkArea, int]:
    """A work area in `folder` with the shipped `pipelines/<pipeline>` queued, on the datasets
    of `data_root` and `epochs` epochs (VTAB_DEBUG_EPOCHS), drained by one runner; the area and
    the runner's exit code."""
    monkeypatch.setenv("VTAB1K_ROOT", str(data_root))
    monkeypatch.setenv("VTAB_DEBUG_EPOCHS", str(epochs))
    area = WorkArea(folder)
    shutil.copy(REPO / "pipelines" / pipeline, area.root)
    return area, drain(area)


@pytest.fixture(scope="session", autouse=True)
def sleep_logs_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Sleep jobs of the tests may append their execution logs under the session's temporary
    folder (runners started by the tests inherit this)."""
    os.environ[LOG_DIR] = str(tmp_path_factory.getbasetemp())


@pytest.fixture
def area(tmp_path: Path) -> WorkArea:
    return WorkArea(tmp_path / "work")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VTAB-1K root holding the embedded digits dataset, written once per session (read-only)."""
    from vtab.evaluation.digits import write_digits  # imports torch: only when a test asks

    root = tmp_path_factory.mktemp("vtab-1k")
    write_digits(root)
    return root
