"""Metrics by task type, and per-sample outputs (which images fail, and how confidently).

A task type (single-label, multi-label) chooses the training loss, the metrics and the format
of the targets: int64 class indices [N] for single-label; int8 [N, C] for multi-label, with
1 = present, 0 = absent and -1 = "difficult" (VOC07: left out of the loss and of AP).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vtab.fsutil import atomic_write

SINGLE_LABEL_FIELDS = ("id", "split", "target", "prediction", "correct", "confidence", "margin",
                       "loss")
MULTI_LABEL_FIELDS = ("id", "split", "targets", "difficult", "predicted", "correct",
                      "top_scores")


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, num_classes: int, *,
                           top5: bool | None = None) -> dict[str, float]:
    """Fractions in [0, 1]; top5 when asked (by default: when there are more than 5 classes).

    balanced_accuracy averages recall over the classes present in `targets`; macro_f1 averages
    F1 over the classes present in targets or predictions (scikit-learn's convention).
    """
    targets = targets.long()
    predictions = scores.argmax(1)
    correct = predictions == targets
    true_pos = torch.bincount(targets[correct], minlength=num_classes).double()
    support = torch.bincount(targets, minlength=num_classes).double()
    predicted = torch.bincount(predictions, minlength=num_classes).double()
    present = support > 0
    seen = present | (predicted > 0)
    metrics = {
        "top1": correct.double().mean().item(),
        "balanced_accuracy": (true_pos[present] / support[present]).mean().item(),
        "macro_f1": (2 * true_pos[seen] / (support[seen] + predicted[seen])).mean().item(),
    }
    if (num_classes > 5) if top5 is None else top5:
        best5 = scores.topk(5, dim=1).indices
        metrics["top5"] = (best5 == targets[:, None]).any(1).double().mean().item()
    return metrics


def per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor,
                       num_classes: int) -> list[float | None]:
    """Recall of each class; None for a class without evaluation examples."""
    targets = targets.long()
    correct = scores.argmax(1) == targets
    hits = torch.bincount(targets[correct], minlength=num_classes).tolist()
    support = torch.bincount(targets, minlength=num_classes).tolist()
    return [h / s if s else None for h, s in zip(hits, support, strict=True)]


def _devkit_curve(scores: torch.Tensor,
                  positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(precision, recall) after each example in order of decreasing score (a stable sort), as
    the VOC devkit takes them; None without positives."""
    total = int(positive.sum())
    if total == 0:
        return None
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    true_pos = positive[order].double().cumsum(0)
    return true_pos / torch.arange(1, len(order) + 1, dtype=torch.float64), true_pos / total


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The area under the precision-recall curve as scikit-learn's average_precision_score
    computes it: sum over thresholds of (R_n - R_{n-1}) P_n, equal scores forming one
    threshold. NaN when there is no positive."""
    total = int(positive.sum())
    if total == 0:
        return math.nan
    ranked = torch.sort(scores.double(), descending=True, stable=True)
    hits = positive[ranked.indices].double()
    # The last example of each run of equal scores closes a threshold.
    values = ranked.values
    last = torch.ones_like(values, dtype=torch.bool)
    last[:-1] = values[1:] != values[:-1]
    true_pos = hits.cumsum(0)[last]
    seen = torch.arange(1, len(values) + 1, dtype=torch.float64)[last]
    precision = true_pos / seen
    recall = true_pos / total
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


def voc07_average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """PASCAL VOC 2007's 11-point AP: the mean over recall levels 0, 0.1, ..., 1 of the best
    precision at that recall or above (0 when not reached), precision and recall taken after
    each example in order of decreasing score, as the VOC devkit does. NaN without positives."""
    curve = _devkit_curve(scores, positive)
    if curve is None:
        return math.nan
    precision, recall = curve
    points = []
    for level in torch.linspace(0, 1, 11, dtype=torch.float64):
        reached = precision[recall >= level - 1e-12]
        points.append(float(reached.max()) if len(reached) else 0.0)
    return sum(points) / 11


def interpolated_average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The all-points interpolated AP of the VOC devkit since 2010 (VISSL's ``calculate_ap``):
    the area under the precision envelope (the best precision at each recall or above), over
    precision and recall taken after each example in order of decreasing score. NaN without
    positives."""
    curve = _devkit_curve(scores, positive)
    if curve is None:
        return math.nan
    precision, recall = curve
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * envelope).sum())


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> tuple[
        dict[str, float], list[float | None]]:
    """(mAP three ways, per-class AP) averaged over the classes with a positive evaluation
    example (scikit-learn's macro average would count the others as 0); the examples marked
    difficult for a class are left out of that class's AP. ``map`` is scikit-learn's AP,
    ``map_voc07`` VOC07's 11-point AP, ``map_interpolated`` the all-points interpolated AP."""
    ways = {"map": average_precision, "map_voc07": voc07_average_precision,
            "map_interpolated": interpolated_average_precision}
    per_class: dict[str, list[float]] = {name: [] for name in ways}
    for c in range(targets.shape[1]):
        kept = targets[:, c] >= 0
        positive = targets[kept, c] == 1
        for name, way in ways.items():
            per_class[name].append(way(scores[kept, c], positive))
    present = [not math.isnan(ap) for ap in per_class["map"]]
    if not any(present):
        raise ValueError("no class has a positive evaluation example: mAP is undefined")
    metrics = {name: sum(ap for ap, there in zip(values, present, strict=True) if there) /
               sum(present) for name, values in per_class.items()}
    return metrics, [None if math.isnan(ap) else ap for ap in per_class["map"]]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # scalars, each in [0, 1]
    per_class: dict[str, list[float | None]]  # one value per class, None where undefined


class SingleLabel:
    name = "single_label"

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy [N]."""
        return F.cross_entropy(logits, targets, reduction="none")

    @staticmethod
    def evaluate(scores: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 trained_classes: int) -> Evaluation:
        metrics = classification_metrics(scores, targets, num_classes,
                                         top5=trained_classes > 5)
        return Evaluation(metrics, {"accuracy": per_class_accuracy(scores, targets,
                                                                   num_classes)})

    @staticmethod
    def per_sample(scores: torch.Tensor, targets: torch.Tensor, ids: Sequence[Any],
                   output: str, split: str = "") -> tuple[tuple[str, ...], list[dict[str, Any]]]:
        """One row per example: its split, target, prediction, whether that is correct (1 or
        0), confidence (its probability), margin (top-1 minus top-2 probability) and
        cross-entropy loss; the last three only for heads whose scores are logits or
        probabilities."""
        scores = scores.float()
        probs = scores.softmax(1) if output == "logits" else scores
        predictions = scores.argmax(1).tolist()
        correct = [int(p == t) for p, t in zip(predictions, targets.tolist(), strict=True)]
        splits = [split] * len(ids)
        if output == "margins":
            blank = [""] * len(ids)
            columns = zip(ids, splits, targets.tolist(), predictions, correct, blank, blank,
                          blank, strict=True)
        else:
            top = probs.topk(min(2, probs.shape[1]), dim=1).values
            margins = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
            picked = probs.gather(1, targets.long()[:, None])[:, 0].clamp_min(1e-12)
            losses = -picked.log()
            columns = zip(ids, splits, targets.tolist(), predictions, correct,
                          top[:, 0].tolist(), margins.tolist(), losses.tolist(), strict=True)
        return SINGLE_LABEL_FIELDS, [dict(zip(SINGLE_LABEL_FIELDS, row, strict=True))
                                     for row in columns]


class MultiLabel:
    name = "multi_label"

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example binary cross-entropy summed over classes [N], difficult labels left
        out."""
        kept = (targets >= 0).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets.clamp_min(0).to(logits.dtype),
                                                 reduction="none")
        return (bce * kept).sum(1)

    @staticmethod
    def evaluate(scores: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 trained_classes: int) -> Evaluation:
        metrics, per_class = multilabel_metrics(scores, targets)
        return Evaluation(metrics, {"ap": per_class})

    @staticmethod
    def per_sample(scores: torch.Tensor, targets: torch.Tensor, ids: Sequence[Any],
                   output: str, split: str = "") -> tuple[tuple[str, ...], list[dict[str, Any]]]:
        """One row per example: its split, classes, difficult ones, the classes predicted
        present (logit or margin above 0, probability above 0.5), whether those are exactly
        its classes (1 or 0; difficult ones may go either way) and the three best scores."""
        threshold = 0.5 if output == "probabilities" else 0.0
        rows = []
        for identifier, score, target in zip(ids, scores.float(), targets, strict=True):
            best = score.topk(min(3, len(score)))
            predicted = score > threshold
            counted = target >= 0
            rows.append({
                "id": identifier, "split": split,
                "targets": _classes(target == 1), "difficult": _classes(target < 0),
                "predicted": _classes(predicted),
                "correct": int(bool((predicted[counted] == (target[counted] == 1)).all())),
                "top_scores": " ".join(f"{c}:{v:.4g}" for v, c in
                                       zip(best.values.tolist(), best.indices.tolist(),
                                           strict=True))})
        return MULTI_LABEL_FIELDS, rows


def _classes(mask: torch.Tensor) -> str:
    return ",".join(map(str, mask.nonzero().flatten().tolist()))


TASKS: dict[str, type[SingleLabel] | type[MultiLabel]] = {
    SingleLabel.name: SingleLabel, MultiLabel.name: MultiLabel}


def write_per_sample_csv(path: Path, fields: Sequence[str],
                         rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())
