"""The batched trainer of the heads trained by gradient descent: many heads in one pass.

Every head has its own module, input (a layer's features), seed (initialisation, data order,
dropout), optimizer parameter group (learning rate, weight decay) and loss term, and the loss
is the sum of the per-head losses, so heads never interact: training them together gives the
weights that training each alone gives, for the price of one pass over the data (as DINOv2's
linear evaluation trains its grid of heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from vtab.evaluation.heads.base import FeatureNorm, Fitted, HeadInput

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
INIT_STD = 0.01  # DINOv2's linear head initialisation


@dataclass(frozen=True)
class HeadSpec:
    """The per-head optimisation settings."""

    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only


@dataclass(frozen=True)
class Schedule:
    """What all heads of one pass share."""

    epochs: int
    batch_size: int
    warmup_epochs: int = 0


# (input dim, classes, generator on the CPU for initialisation, generator on the device for
# dropout) -> the head's module.
ModuleFactory = Callable[[int, int, torch.Generator, torch.Generator], nn.Module]


@dataclass(frozen=True)
class GradientHead:
    """One head to train: its module, its input, its normalisation and its settings."""

    build: ModuleFactory
    data: HeadInput
    spec: HeadSpec
    feature_norm: str = "none"


def linear_init(dim: int, classes: int, generator: torch.Generator) -> nn.Linear:
    """A linear layer with weights N(0, INIT_STD^2) and zero bias."""
    layer = nn.Linear(dim, classes)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(dim, classes, generator=generator) * INIT_STD).T)
        layer.bias.zero_()
    return layer


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay towards 0, evaluated per step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizers(specs: Sequence[HeadSpec],
                modules: Sequence[nn.Module]) -> list[torch.optim.Optimizer]:
    """One optimizer per kind in use, with one parameter group per head."""
    groups: dict[str, list[dict]] = {}
    for spec, module in zip(specs, modules, strict=True):
        if spec.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {spec.optimizer!r}")
        group = {"params": list(module.parameters()), "lr": spec.lr, "base_lr": spec.lr,
                 "weight_decay": spec.weight_decay}
        if spec.optimizer == "sgd":
            group["momentum"] = spec.momentum
        groups.setdefault(spec.optimizer, []).append(group)
    return [OPTIMIZERS[kind](kind_groups) for kind, kind_groups in groups.items()]


def train_heads(heads: Sequence[GradientHead], schedule: Schedule, *, device: str = "cpu",
                progress: bool = False) -> list[Fitted]:
    """Train every head on its own input; all inputs must have the same number of rows."""
    if not heads:
        raise ValueError("train_heads needs at least one head")
    sizes = {len(head.data.x) for head in heads}
    if len(sizes) != 1:
        raise ValueError(f"the heads' inputs differ in length: {sorted(sizes)}")
    (n,) = sizes
    dev = torch.device(device)
    norms = [FeatureNorm.fit(head.feature_norm, head.data.x) for head in heads]
    inputs = [norm(head.data.x).to(dev) for norm, head in zip(norms, heads, strict=True)]
    targets = [head.data.targets.to(dev) for head in heads]
    orders = [torch.Generator().manual_seed(head.spec.seed) for head in heads]
    modules = []
    for head, order, x in zip(heads, orders, inputs, strict=True):
        noise = torch.Generator(dev).manual_seed(head.spec.seed)
        modules.append(head.build(x.shape[1], head.data.num_classes, order, noise).to(dev))
    optimizers = _optimizers([head.spec for head in heads], modules)
    # A last batch of a single example is skipped: BatchNorm cannot train on one example, and
    # every kind skips it alike so that kinds stay comparable.
    starts = [start for start in range(0, n, schedule.batch_size) if n - start > 1 or n == 1]
    steps_per_epoch = len(starts)
    total = schedule.epochs * steps_per_epoch
    warmup = schedule.warmup_epochs * steps_per_epoch
    step = 0
    for module in modules:
        module.train()
    for _ in tqdm(range(schedule.epochs), desc=f"{len(heads)} head(s)", disable=not progress,
                  leave=False):
        epoch_orders = [torch.randperm(n, generator=g).to(dev) for g in orders]
        for start in starts:
            factor = lr_factor(step, warmup, total)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            loss = sum(head.data.loss(module(x[index]), y[index]).mean()
                       for head, module, x, y, index in
                       zip(heads, modules, inputs, targets,
                           (order[start:start + schedule.batch_size] for order in epoch_orders),
                           strict=True))
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            step += 1
    return [_fitted(module.eval(), norm, dev) for module, norm in zip(modules, norms, strict=True)]


def _fitted(module: nn.Module, norm: FeatureNorm, device: torch.device) -> Fitted:
    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(norm(x.to(device)))
    return Fitted(score, "logits", model=module)


def gradient_heads(build: ModuleFactory, config, inputs: Sequence[HeadInput],
                   settings) -> list[dict[str, Fitted]]:
    """The fit of a kind trained by gradient descent: one head per input, all in one pass,
    with the job's optim settings."""
    optim = settings.optim
    spec = HeadSpec(lr=optim.lr, weight_decay=optim.weight_decay, seed=settings.seed,
                    optimizer=optim.name, momentum=getattr(optim, "momentum", 0.0))
    schedule = Schedule(optim.epochs, optim.batch_size, optim.warmup_epochs)
    heads = [GradientHead(build, data, spec, config.feature_norm) for data in inputs]
    trained = train_heads(heads, schedule, device=settings.device, progress=settings.progress)
    return [{"": fitted} for fitted in trained]
