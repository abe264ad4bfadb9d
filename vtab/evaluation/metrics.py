"""Classification metrics and per-sample outputs (which images fail, and how confidently)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vtab.fsutil import atomic_write

PER_SAMPLE_FIELDS = ("id", "target", "prediction", "confidence", "margin", "loss")


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, *,
                           top5: bool | None = None) -> dict[str, float]:
    """Fractions in [0, 1]; top5 when asked (by default: when there are more than 5 classes).

    balanced_accuracy averages recall over the classes present in `targets`; macro_f1 averages
    F1 over the classes present in targets or predictions (scikit-learn's convention).
    """
    targets = targets.long()
    predictions = logits.argmax(1)
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
        best5 = logits.topk(5, dim=1).indices
        metrics["top5"] = (best5 == targets[:, None]).any(1).double().mean().item()
    return metrics


def per_sample_outputs(logits: torch.Tensor, targets: torch.Tensor,
                       ids: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per sample: id, target, prediction, confidence, margin (top-1 minus top-2
    probability) and cross-entropy loss."""
    logits = logits.float()
    probs = logits.softmax(1)
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    margins = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
    losses = F.cross_entropy(logits, targets.long(), reduction="none")
    columns = zip(ids, targets.tolist(), probs.argmax(1).tolist(), top[:, 0].tolist(),
                  margins.tolist(), losses.tolist(), strict=True)
    return [dict(zip(PER_SAMPLE_FIELDS, row, strict=True)) for row in columns]


def write_per_sample_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_SAMPLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())
