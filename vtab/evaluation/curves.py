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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vtab.events import write_scalars
from vtab.fsutil import atomic_write

FIELDS = ("epoch", "layer", "loss", "lr")
NO_TENSORBOARD = ("tensorboard is not installed: training curves are written to curves.csv "
                  "only (pip install 'vtab[tensorboard]' for TensorBoard events)")
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
        write_scalars(folder / "tensorboard", self._scalars(rows, metric, split), NO_TENSORBOARD)

    def _scalars(self, rows: list[dict[str, Any]], metric: str,
                 split: str) -> Iterator[tuple[str, float, int]]:
        several = len(self.layers) > 1
        for row in rows:
            prefix = f"{row['layer']}/" if several else ""
            yield f"{prefix}loss/train", row["loss"], row["epoch"]
            yield f"{prefix}lr", row["lr"], row["epoch"]
            if row[metric] != "":
                yield f"{prefix}{metric}/{split}", row[metric], row["epoch"]
