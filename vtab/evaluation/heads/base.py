"""The Head interface: fit on training features, score evaluation features; a registry of kinds.

A head kind is one module of this package with a function registered under its ``head.kind``
(its settings are a section of `vtab.evaluation.schemas`). It is given one `HeadInput` per
layer of the job, so that a kind trained by gradient descent can train all of them in one pass
(`trainer.py`), and returns, for each input, its `Fitted` predictors by variant: one, named
``""``, for most kinds; one per neighbour count for k-NN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vtab.evaluation.metrics import TASKS

Output = Literal["logits", "probabilities", "margins"]
PREDICT_BATCH = 65_536  # rows scored at once: bounds the memory of [rows, classes]


@dataclass(frozen=True)
class HeadInput:
    """One layer's training features, and what the head must predict."""

    x: torch.Tensor  # float32 [N, D], raw (each head normalises as its settings say)
    targets: torch.Tensor  # the task's format: int64 [N] or int8 [N, C] (metrics.py)
    num_classes: int
    task: str  # single_label or multi_label

    @property
    def loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return TASKS[self.task].loss


@dataclass(frozen=True)
class FitSettings:
    """What every kind may read besides its own section."""

    seed: int
    device: str
    optim: Any = None  # the optim section, for heads trained by gradient descent
    progress: bool = False


@dataclass
class Fitted:
    """A trained head: scores [N, C] (higher: more likely) of raw features [N, D]."""

    score: Callable[[torch.Tensor], torch.Tensor]
    output: Output  # what the scores are: logits, probabilities or SVM margins
    setting: dict[str, Any] = field(default_factory=dict)  # config keys of this variant
    info: dict[str, Any] = field(default_factory=dict)  # plain values for the job's result
    model: Any = None  # the trained module of a gradient head, for inspection

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.score(x[start:start + PREDICT_BATCH])
                          for start in range(0, len(x), PREDICT_BATCH)]).float().cpu()


FitFunction = Callable[[Any, Sequence[HeadInput], FitSettings], list[dict[str, Fitted]]]
_HEADS: dict[str, FitFunction] = {}


def register_head(kind: str) -> Callable[[FitFunction], FitFunction]:
    def add(fit: FitFunction) -> FitFunction:
        if kind in _HEADS:
            raise ValueError(f"head kind {kind!r} is registered twice")
        _HEADS[kind] = fit
        return fit
    return add


def fit_heads(config: Any, inputs: Sequence[HeadInput],
              settings: FitSettings) -> list[dict[str, Fitted]]:
    """Fit `config.kind` on each input; for each, its predictors by variant name."""
    if config.kind not in _HEADS:
        raise ValueError(f"unknown head kind {config.kind!r}; known: {', '.join(sorted(_HEADS))}")
    fitted = _HEADS[config.kind](config, inputs, settings)
    if len(fitted) != len(inputs):
        raise RuntimeError(f"head kind {config.kind} returned {len(fitted)} fits for "
                           f"{len(inputs)} inputs")
    return fitted


def known_heads() -> list[str]:
    return sorted(_HEADS)


@dataclass(frozen=True)
class FeatureNorm:
    """A normalisation fitted on training features and applied unchanged to evaluation ones."""

    kind: str = "none"
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @classmethod
    def fit(cls, kind: str, x: torch.Tensor) -> FeatureNorm:
        if kind not in ("standardize", "l2", "none"):
            raise ValueError(f"feature_norm must be standardize, l2 or none, got {kind!r}")
        if kind != "standardize":
            return cls(kind)
        x = x.float()
        std = x.std(0, unbiased=False)
        # A constant training feature keeps scale 1: dividing by ~0 would make any variation of
        # it at evaluation time dominate the scores.
        return cls(kind, x.mean(0), std.masked_fill(std < 1e-6, 1.0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kind == "l2":
            return F.normalize(x, dim=1)
        if self.kind == "standardize":
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def multi_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as float [N, C]: 1 where present, 0 elsewhere (difficult counts as absent)."""
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).double()
    return (targets == 1).double()
