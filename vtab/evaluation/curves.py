"""Training curves of the heads trained by gradient descent: per epoch, the training loss and the
learning rate, and the job's metric on its evaluation split at most `METRIC_POINTS` times (every
epoch up to that many epochs, else evenly, and always the last: scoring a large test split each
epoch would cost more than the training); written per job as ``curves.csv``
and, with the ``tensorboard`` package installed, as TensorBoard events in ``tensorboard/``
(one run per job: ``tensorboard --logdir work/summarized/<pipeline>`` shows a whole pipeline).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vtab.fsutil import atomic_write

log = logging.getLogger(__name__)
FIELDS = ("epoch", "layer", "loss", "lr")
NO_TENSORBOARD = ("tensorboard is not installed: training curves are written to curves.csv "
                  "only (pip install 'vtab[tensorboard]' for TensorBoard events)")
_warned: list[bool] = []
METRIC_POINTS = 20

# (scores [N, C] of the evaluation split) -> the job's metric
Metric = Callable[[torch.Tensor], float]


class Curves:
    """Rows of every job of a pass, filled by the trainer's epoch hook.

    Heads come in the order jobs x layers (the trainer's); each job has its metric's name, its
    function, and the evaluation features of each layer."""

    def __init__(self, metric_names: Sequence[str], metrics: Sequence[Metric],
                 layers: Sequence[str], evaluation: Sequence[torch.Tensor], epochs: int) -> None:
        self.metric_names, self.metrics = list(metric_names), list(metrics)
        self.layers, self.evaluation = list(layers), list(evaluation)
        self.epochs, self.every = epochs, max(1, -(-epochs // METRIC_POINTS))
        self.rows: list[list[dict[str, Any]]] = [[] for _ in metric_names]

    def record(self, epoch: int, losses: list[float], lrs: list[float],
               scorers: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        scored = epoch % self.every == 0 or epoch == self.epochs
        for head, (loss, lr, score) in enumerate(zip(losses, lrs, scorers, strict=True)):
            job, layer = divmod(head, len(self.layers))
            value = self.metrics[job](score(self.evaluation[layer])) if scored else ""
            self.rows[job].append({"epoch": epoch, "layer": self.layers[layer], "loss": loss,
                                   "lr": lr, self.metric_names[job]: value})

    def write(self, job: int, folder: Path, split: str) -> None:
        """The job's curves as ``curves.csv`` and TensorBoard events under `folder`."""
        rows, metric = self.rows[job], self.metric_names[job]
        folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=[*FIELDS, metric], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(folder / "curves.csv", text.getvalue())
        events = _summary_writer(folder / "tensorboard")
        if events is None:
            return
        several = len(self.layers) > 1
        with events:
            for row in rows:
                prefix = f"{row['layer']}/" if several else ""
                events.add_scalar(f"{prefix}loss/train", row["loss"], row["epoch"])
                events.add_scalar(f"{prefix}lr", row["lr"], row["epoch"])
                if row[metric] != "":
                    events.add_scalar(f"{prefix}{metric}/{split}", row[metric], row["epoch"])


def _summary_writer(folder: Path) -> Any:
    """A TensorBoard writer, or None (said once per process) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned:
            log.warning(NO_TENSORBOARD)
            _warned.append(True)
        return None
    return SummaryWriter(log_dir=str(folder))
