"""Linear heads on cached features, many trained together in one pass (as DINOv2 does).

Every head has its own seed (initialisation and data order), its own optimizer parameter group
(learning rate, weight decay) and its own loss term, and the loss is the sum of the per-head
losses, so heads never interact: training them together gives the weights that training each
alone gives, for the price of one pass over the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vtab.evaluation.schemas import FEATURE_NORMS, OPTIMIZERS

INIT_STD = 0.01  # DINOv2's linear head initialisation


@dataclass(frozen=True)
class HeadSpec:
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only


@dataclass(frozen=True)
class FeatureNorm:
    """A normalisation fitted on training features and applied unchanged to evaluation ones."""

    kind: str = "none"
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @classmethod
    def fit(cls, kind: str, x: torch.Tensor) -> FeatureNorm:
        if kind not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {kind!r}")
        if kind != "standardize":
            return cls(kind)
        std = x.std(0, unbiased=False)
        # A constant training feature keeps scale 1: dividing by ~0 would make any variation of
        # it at evaluation time dominate the logits.
        return cls(kind, x.mean(0), std.masked_fill(std < 1e-6, 1.0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "l2":
            return F.normalize(x, dim=1)
        if self.kind == "standardize":
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


@dataclass(frozen=True)
class TrainedHead:
    spec: HeadSpec
    weight: torch.Tensor  # [D, C], on the CPU
    bias: torch.Tensor  # [C]
    norm: FeatureNorm


def predict(head: TrainedHead, x: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] of `head` for raw (unnormalised) features `x`."""
    z = head.norm(x.float())
    return z @ head.weight.to(z.device) + head.bias.to(z.device)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay towards 0, evaluated per step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizers(specs: Sequence[HeadSpec], weights: list[nn.Parameter],
                biases: list[nn.Parameter]) -> list[torch.optim.Optimizer]:
    """One optimizer per kind in use, with one parameter group per head."""
    groups: dict[str, list[dict]] = {}
    for spec, weight, bias in zip(specs, weights, biases, strict=True):
        if spec.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {spec.optimizer!r}")
        group = {"params": [weight, bias], "lr": spec.lr, "base_lr": spec.lr,
                 "weight_decay": spec.weight_decay}
        if spec.optimizer == "sgd":
            group["momentum"] = spec.momentum
        groups.setdefault(spec.optimizer, []).append(group)
    factories = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    return [factories[kind](kind_groups) for kind, kind_groups in groups.items()]


def train_linear_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       specs: Sequence[HeadSpec], *, epochs: int, batch_size: int,
                       warmup_epochs: int = 0, feature_norm: str = "standardize",
                       device: str = "cpu", progress: bool = False) -> list[TrainedHead]:
    """Train one linear head per spec on features `x` [N, D] and labels `y` [N]."""
    if not specs:
        raise ValueError("train_linear_heads needs at least one HeadSpec")
    norm = FeatureNorm.fit(feature_norm, x.float())
    dev = torch.device(device)
    inputs, targets = norm(x.float()).to(dev), y.long().to(dev)
    n, dim = inputs.shape
    generators = [torch.Generator().manual_seed(spec.seed) for spec in specs]
    weights = [nn.Parameter((torch.randn(dim, num_classes, generator=g) * INIT_STD).to(dev))
               for g in generators]
    biases = [nn.Parameter(torch.zeros(num_classes, device=dev)) for _ in specs]
    optimizers = _optimizers(specs, weights, biases)
    steps_per_epoch = math.ceil(n / batch_size)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    for _ in tqdm(range(epochs), desc="linear heads", disable=not progress, leave=False):
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(dev)
        for start in range(0, n, batch_size):
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(step, warmup, total)
            index = order[:, start:start + batch_size]  # [H, B]: each head its own batch
            logits = torch.baddbmm(torch.stack(biases).unsqueeze(1), inputs[index],
                                   torch.stack(weights))
            losses = F.cross_entropy(logits.flatten(0, 1), targets[index].flatten(),
                                     reduction="none").view(index.shape)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            losses.mean(1).sum().backward()
            for optimizer in optimizers:
                optimizer.step()
            step += 1
    return [TrainedHead(spec, w.detach().cpu(), b.detach().cpu(), norm)
            for spec, w, b in zip(specs, weights, biases, strict=True)]
