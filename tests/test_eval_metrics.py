"""Metrics and per-sample outputs on hand-made tensors with known answers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from vtab.evaluation.metrics import (
    classification_metrics,
    per_sample_outputs,
    write_per_sample_csv,
)


def one_hot_logits(predictions: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_three_classes() -> None:
    # targets 0 0 1 2, predictions 0 1 1 1
    metrics = classification_metrics(one_hot_logits([0, 1, 1, 1], 3), torch.tensor([0, 0, 1, 2]), 3)
    assert set(metrics) == {"top1", "balanced_accuracy", "macro_f1"}  # no top5 with 3 classes
    assert metrics["top1"] == 0.5
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # per-class F1 = 2TP / (2TP + FP + FN): 2/3, 2/4, 0
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert all(isinstance(v, float) for v in metrics.values())


def test_absent_classes_and_top5() -> None:
    # 7 classes; class 6 neither occurs nor is predicted, class 5 is predicted but absent.
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 0],  # target 0: top1 hit
        [9.0, 8, 7, 6, 5, 4, 0],  # target 4: top5 hit
        [0.0, 1, 1, -1, 1, 9, 8],  # target 3: top5 miss, predicted 5
        [0.0, 9, 0, 0, 0, 0, 0],  # target 1: hit
    ])
    metrics = classification_metrics(logits, torch.tensor([0, 4, 3, 1]), 7)
    assert metrics["top1"] == 0.5
    assert metrics["top5"] == 0.75
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 4)  # over classes 0, 1, 3, 4
    # F1 over classes 0, 1, 3, 4, 5: class 0 has TP 1, FP 1 -> 2/3; class 1 -> 1; others 0
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1) / 5)


def test_per_sample_outputs_and_csv(tmp_path: Path) -> None:
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]).log()
    rows = per_sample_outputs(logits, torch.tensor([1, 2]), ["img/a.png", "img/b.png"])
    assert [(r["id"], r["target"], r["prediction"]) for r in rows] == [
        ("img/a.png", 1, 0), ("img/b.png", 2, 2)]
    assert rows[0]["confidence"] == pytest.approx(0.6)
    assert rows[0]["margin"] == pytest.approx(0.3)
    assert rows[0]["loss"] == pytest.approx(-math.log(0.3))
    assert rows[1]["margin"] == pytest.approx(0.4)

    path = tmp_path / "predictions.csv"
    write_per_sample_csv(path, rows)
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["id", "target", "prediction", "confidence", "margin", "loss"]
    assert read[1]["id"] == "img/b.png" and float(read[1]["loss"]) == pytest.approx(-math.log(0.6))
