"""Training curves: per epoch loss, learning rate and the evaluation metric, as CSV and as
TensorBoard events; recording them changes nothing in the training."""

from __future__ import annotations

import builtins
import csv
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from tests.test_evaluation import probe_config
from vtab import events
from vtab.evaluation import curves as curves_module
from vtab.evaluation import probe


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "curves.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("head", [{"kind": "linear"}, {"kind": "mlp", "hidden": [16]}])
def test_curves_end_at_the_result_and_change_nothing(digits_root: Path, tmp_path: Path,
                                                     head: dict[str, Any]) -> None:
    configs = [probe_config(digits_root, head=head, **{"optim.lr": lr, "optim.epochs": 4})
               for lr in (0.1, 0.01)]
    cache = tmp_path / "cache"
    folders = [tmp_path / f"job{i}" for i in range(len(configs))]
    recorded = probe.run_linear_probes(configs, cache_dir=cache, progress=False,
                                       outputs_dirs=folders)
    plain = probe.run_linear_probes(configs, cache_dir=cache, progress=False)  # no curves
    for config, job, alone, folder in zip(configs, recorded, plain, folders, strict=True):
        assert job["metrics"] == alone["metrics"]  # the hook changes nothing
        rows = _rows(folder)
        assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
        assert list(rows[0]) == ["epoch", "layer", "loss", "lr", "top1"]
        # The last epoch's weights are the trained head's: its metric is the job's result.
        assert float(rows[-1]["top1"]) == pytest.approx(job["result"], abs=1e-9)
        assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
        # Cosine decay without warmup: the rate at the last step of each epoch.
        steps = math.ceil(800 / 64)
        for row in rows:
            step = int(row["epoch"]) * steps - 1
            expected = config["optim"]["lr"] * 0.5 * (1 + math.cos(math.pi * step / (4 * steps)))
            assert float(row["lr"]) == pytest.approx(expected, rel=1e-6)


def test_tensorboard_events_hold_the_curves(digits_root: Path, tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = probe_config(digits_root, **{"optim.epochs": 3})
    probe.run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False,
                           outputs_dir=tmp_path / "job")
    events = accumulator.EventAccumulator(str(tmp_path / "job" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/train", "lr", "top1/val200"}
    top1 = [event.value for event in events.Scalars("top1/val200")]
    assert top1 == pytest.approx([float(row["top1"]) for row in _rows(tmp_path / "job")])


def test_without_tensorboard_the_csv_is_written_and_said(digits_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    real = builtins.__import__

    def without_tensorboard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    monkeypatch.setattr(events, "_said", set())
    config = probe_config(digits_root, **{"optim.epochs": 2})
    with caplog.at_level(logging.WARNING):
        probe.run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False,
                               outputs_dir=tmp_path / "job")
    assert len(_rows(tmp_path / "job")) == 2
    assert not (tmp_path / "job" / "tensorboard").exists()
    assert "pip install 'vtab[tensorboard]'" in caplog.text


def test_a_long_training_scores_its_evaluation_split_at_most_twenty_times() -> None:
    import torch

    calls: list[int] = []
    recorded = curves_module.Curves(["top1"], [lambda scores: calls.append(1) or 0.5],
                                    ["output"], [torch.zeros(3, 2)], epochs=100)
    for epoch in range(1, 101):
        recorded.record(epoch, [1.0], [0.1], [lambda x: x])
    metric = [row["top1"] for row in recorded.rows[0]]
    assert len(calls) == 20 and metric[-1] == 0.5 and metric[4] == 0.5 and metric[0] == ""


def test_curves_that_cannot_be_written_leave_the_result(digits_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(curves_module.Curves, "write", disk_full)
    config = probe_config(digits_root, **{"optim.epochs": 2})
    with caplog.at_level(logging.WARNING):
        job = probe.run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False,
                                     outputs_dir=tmp_path / "job")
    assert 0 < job["result"] <= 1
    assert "training curves of" in caplog.text and "No space left" in caplog.text
