"""Metrics and per-sample outputs on hand-made tensors with known answers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

from vtab.evaluation.metrics import (
    MultiLabel,
    SingleLabel,
    average_precision,
    classification_metrics,
    interpolated_average_precision,
    multilabel_metrics,
    per_class_accuracy,
    voc07_average_precision,
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
    fields, rows = SingleLabel.per_sample(logits, torch.tensor([1, 2]), ["img/a.png", "img/b.png"],
                                          "logits", "val200")
    assert [(r["id"], r["split"], r["target"], r["prediction"], r["correct"]) for r in rows] == [
        ("img/a.png", "val200", 1, 0, 0), ("img/b.png", "val200", 2, 2, 1)]
    assert rows[0]["confidence"] == pytest.approx(0.6)
    assert rows[0]["margin"] == pytest.approx(0.3)
    assert rows[0]["loss"] == pytest.approx(-math.log(0.3))
    assert rows[1]["margin"] == pytest.approx(0.4)

    path = tmp_path / "predictions.csv"
    write_per_sample_csv(path, fields, rows)
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["id", "split", "target", "prediction", "correct", "confidence",
                             "margin", "loss"]
    assert read[1]["id"] == "img/b.png" and float(read[1]["loss"]) == pytest.approx(-math.log(0.6))


def test_single_label_metrics_match_scikit_learn() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 8, generator=g)
    targets = torch.randint(0, 8, (500,), generator=g)
    predicted = scores.argmax(1).numpy()
    metrics = classification_metrics(scores, targets, 8)
    assert metrics["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(targets.numpy(), predicted), abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(targets.numpy(), predicted, average="macro"), abs=1e-12)
    recall = per_class_accuracy(scores, targets, 8)
    assert sum(recall) / 8 == pytest.approx(metrics["balanced_accuracy"])


def test_per_class_accuracy_leaves_absent_classes_undefined() -> None:
    assert per_class_accuracy(one_hot_logits([0, 1, 1], 3), torch.tensor([0, 0, 1]), 3) == [
        0.5, 1.0, None]


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_scikit_learn_also_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (200,), generator=g).double()  # many equal scores
    positive = torch.rand(200, generator=g) < 0.3
    assert average_precision(scores, positive) == pytest.approx(
        average_precision_score(positive.numpy(), scores.numpy()), abs=1e-12)
    continuous = torch.randn(200, generator=g)
    assert average_precision(continuous, positive) == pytest.approx(
        average_precision_score(positive.numpy(), continuous.numpy()), abs=1e-12)


def test_voc07_eleven_points_by_hand() -> None:
    # Ranked: P N P N N. Precision after each: 1, 1/2, 2/3, 2/4, 2/5; recall 1/2, 1/2, 1, 1, 1.
    # Recall levels 0..0.5 (6 points) reach precision 1; 0.6..1 (5 points) reach 2/3.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = torch.tensor([True, False, True, False, False])
    assert voc07_average_precision(scores, positive) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # All positives first: 1; the only positive last of four: precision 1/4 at every level.
    assert voc07_average_precision(scores[:2], torch.tensor([True, False])) == 1.0
    assert voc07_average_precision(torch.tensor([4.0, 3, 2, 1]),
                                   torch.tensor([False, False, False, True])) == 0.25
    assert math.isnan(voc07_average_precision(scores, torch.zeros(5, dtype=torch.bool)))


def test_interpolated_ap_by_hand() -> None:
    # Ranked P N P N N: the precision envelope is 1 up to recall 1/2, then 2/3 up to recall 1.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = torch.tensor([True, False, True, False, False])
    assert interpolated_average_precision(scores, positive) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A positive ranked last of four: precision 1/4 over the whole recall range.
    assert interpolated_average_precision(torch.tensor([4.0, 3, 2, 1]), torch.tensor(
        [False, False, False, True])) == pytest.approx(0.25)
    assert math.isnan(interpolated_average_precision(scores, torch.zeros(5, dtype=torch.bool)))


def test_multilabel_map_leaves_out_difficult_labels_and_empty_classes() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.9, 0.4], [0.2, 0.3, 0.9]])
    targets = torch.tensor([[1, 0, 0], [-1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.int8)
    metrics, per_class = multilabel_metrics(scores, targets)
    # Class 0 without its difficult example 1: scores 0.9 (P), 0.1 (N), 0.2 (P).
    class0 = average_precision_score([1, 0, 1], [0.9, 0.1, 0.2])
    class1 = average_precision_score([0, 1, 1, 0], [0.1, 0.7, 0.9, 0.3])
    assert per_class == [pytest.approx(class0), pytest.approx(class1), None]
    assert metrics["map"] == pytest.approx((class0 + class1) / 2)
    assert 0 < metrics["map_voc07"] <= 1 and 0 < metrics["map_interpolated"] <= 1


def test_multilabel_loss_ignores_difficult_labels() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    with_difficult = MultiLabel.loss(logits, torch.tensor([[1, -1, 0]], dtype=torch.int8))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, [0, 2]], torch.tensor([[1.0, 0.0]]), reduction="sum")
    torch.testing.assert_close(with_difficult, expected.reshape(1))


def test_multilabel_per_sample_rows() -> None:
    fields, rows = MultiLabel.per_sample(torch.tensor([[2.0, -1.0, 0.5], [2.0, 1.0, -0.5]]),
                                         torch.tensor([[1, -1, 0], [1, -1, 0]], dtype=torch.int8),
                                         ["a", "b"], "logits", "test")
    assert rows[0] == {"id": "a", "split": "test", "targets": "0", "difficult": "1",
                       "predicted": "0,2", "correct": 0, "top_scores": "0:2 2:0.5 1:-1"}
    assert rows[1]["correct"] == 1  # class 0 right, 2 rightly absent, 1 difficult: either way
    assert tuple(rows[0]) == fields


