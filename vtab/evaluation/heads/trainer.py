"""The batched trainer of the heads trained by gradient descent: many heads in one pass.

Every head has its own module, input (a layer's features), seed (initialisation, data order,
dropout), optimizer parameter group (learning rate, weight decay) and loss term, and the loss
is the sum of the per-head losses, so heads never interact: training them together gives the
weights that training each alone gives, for the price of one pass over the data (as DINOv2's
linear evaluation trains its grid of heads).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vtab.evaluation.heads.base import (
    FeatureNorm,
    FitSettings,
    Fitted,
    HeadInput,
    fit_heads,
    register_head,
)

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
Scorer = Callable[[torch.Tensor], torch.Tensor]  # raw features -> scores, current weights
# Called after each epoch with: the epoch (from 1), each head's mean training loss over it,
# each head's learning rate at its last step, and a scorer of each head as it stands. Nothing
# it does changes the training (no random numbers are drawn, the weights are not touched).
EpochHook = Callable[[int, list[float], list[float], list[Scorer]], None]
# Online mode: the raw training features of each distinct input (in the order heads first name
# them) for an epoch from 2 on, new augmentations of the same images; epoch 1 trains on the
# inputs' own `x`, which every normalisation is fitted on.
EpochFeatures = Callable[[int], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class GradientHead:
    """One head to train: its module, its input, its normalisation and its settings."""

    build: ModuleFactory
    data: HeadInput
    spec: HeadSpec
    feature_norm: str = "none"
    linear: bool = False  # build makes one `linear_init` layer: it can be a block of a wide one


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


def _batches(n: int, batch_size: int) -> list[int]:
    """Where each mini-batch of an epoch starts. A last batch of a single example is skipped:
    BatchNorm cannot train on one example, and every kind skips it alike so that kinds stay
    comparable."""
    return [start for start in range(0, n, batch_size) if n - start > 1 or n == 1]


def _sources(heads: Sequence[GradientHead]) -> list[HeadInput]:
    """The distinct inputs of `heads`, in the order they first appear."""
    return list({id(head.data): head.data for head in heads}.values())


def train_heads(heads: Sequence[GradientHead], schedule: Schedule, *, device: str = "cpu",
                progress: bool = False, on_epoch: EpochHook | None = None,
                epoch_features: EpochFeatures | None = None) -> list[Fitted]:
    """Train every head on its own input; all inputs must have the same number of rows.
    With `epoch_features`, each epoch from the second trains on the features it returns."""
    if not heads:
        raise ValueError("train_heads needs at least one head")
    sizes = {len(head.data.x) for head in heads}
    if len(sizes) != 1:
        raise ValueError(f"the heads' inputs differ in length: {sorted(sizes)}")
    (n,) = sizes
    dev = torch.device(device)
    if len(heads) > 1 and _one_wide_layer(heads):
        return _train_wide(heads, schedule, dev, progress, on_epoch, epoch_features)
    # One normalised copy (and one on the device) per input and normalisation, however many
    # heads of a batch train on it.
    prepared: dict[tuple[int, str], tuple[FeatureNorm, torch.Tensor, torch.Tensor]] = {}
    for head in heads:
        if (id(head.data), head.feature_norm) not in prepared:
            norm = FeatureNorm.fit(head.feature_norm, head.data.x)
            prepared[id(head.data), head.feature_norm] = (
                norm, norm(head.data.x).to(dev), head.data.targets.to(dev))
    norms, inputs, targets = (list(column) for column in zip(
        *(prepared[id(head.data), head.feature_norm] for head in heads), strict=True))
    source_of = {id(data): index for index, data in enumerate(_sources(heads))}

    def refresh(epoch: int) -> None:  # online mode: this epoch's features, normalised alike
        fresh = epoch_features(epoch)
        normalised = {key: norm(fresh[source_of[key[0]]]).to(dev)
                      for key, (norm, _, _) in prepared.items()}
        inputs[:] = [normalised[id(head.data), head.feature_norm] for head in heads]
    orders = [torch.Generator().manual_seed(head.spec.seed) for head in heads]
    modules = []
    for head, order, x in zip(heads, orders, inputs, strict=True):
        noise = torch.Generator(dev).manual_seed(head.spec.seed)
        modules.append(head.build(x.shape[1], head.data.num_classes, order, noise).to(dev))
    optimizers = _optimizers([head.spec for head in heads], modules)
    starts = _batches(n, schedule.batch_size)
    steps_per_epoch = len(starts)
    total = schedule.epochs * steps_per_epoch
    warmup = schedule.warmup_epochs * steps_per_epoch
    step = 0
    for module in modules:
        module.train()
    for epoch in tqdm(range(1, schedule.epochs + 1), desc=f"{len(heads)} head(s)",
                      disable=not progress, leave=False):
        if epoch_features is not None and epoch > 1:
            refresh(epoch)
        epoch_orders = [torch.randperm(n, generator=g).to(dev) for g in orders]
        epoch_loss = torch.zeros(len(heads), device=dev)
        for start in starts:
            factor = lr_factor(step, warmup, total)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            terms = [head.data.loss(module(x[index]), y[index]).mean()
                     for head, module, x, y, index in
                     zip(heads, modules, inputs, targets,
                         (order[start:start + schedule.batch_size] for order in epoch_orders),
                         strict=True)]
            sum(terms).backward()
            for optimizer in optimizers:
                optimizer.step()
            epoch_loss += torch.stack(terms).detach()
            step += 1
        if on_epoch is not None:
            normalised = _Normalised(dev)  # each input normalised once, whatever the heads
            on_epoch(epoch, (epoch_loss / len(starts)).tolist(),
                     [head.spec.lr * factor for head in heads],
                     [_scorer(module, norm, normalised) for module, norm in zip(modules, norms,
                                                                                strict=True)])
    return [_fitted(module.eval(), norm, dev) for module, norm in zip(modules, norms, strict=True)]


class _Normalised:
    """Features normalised and on the device, kept for one epoch's scorers: heads of one input
    and normalisation score the same copy (an evaluation split can be large)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.kept = device, {}

    def __call__(self, norm: FeatureNorm, x: torch.Tensor) -> torch.Tensor:
        key = (id(norm), id(x))
        if key not in self.kept:
            self.kept[key] = (norm(x.to(self.device)), norm, x)  # holds them: ids stay theirs
        return self.kept[key][0]


def _scorer(module: nn.Module, norm: FeatureNorm, normalised: _Normalised) -> Scorer:
    """Scores of a module in training, as it stands (in eval mode for the call)."""
    def score(x: torch.Tensor) -> torch.Tensor:
        module.eval()
        try:
            with torch.no_grad():
                return module(normalised(norm, x))
        finally:
            module.train()
    return score


def _one_wide_layer(heads: Sequence[GradientHead]) -> bool:
    """Linear heads on one input with one seed (one initialisation, one data order) and plain
    SGD: their weights can be the column blocks of one wide layer, one matmul per step."""
    first = heads[0]
    return all(head.linear and head.data is first.data and head.spec.seed == first.spec.seed
               and head.feature_norm == first.feature_norm and head.spec.optimizer == "sgd"
               for head in heads)


def _train_wide(heads: Sequence[GradientHead], schedule: Schedule, dev: torch.device,
                progress: bool, on_epoch: EpochHook | None,
                epoch_features: EpochFeatures | None) -> list[Fitted]:
    """`train_heads` for heads that `_one_wide_layer` accepts: the same updates as each head's
    own nn.Linear and torch.optim.SGD (momentum, weight decay, learning rate per head), done
    on one [D, heads x C] weight; equal to training each alone up to float rounding."""
    first = heads[0]
    data, count = first.data, len(heads)
    norm = FeatureNorm.fit(first.feature_norm, data.x)
    x, y = norm(data.x).to(dev), data.targets.to(dev)
    n, dim, classes = len(x), x.shape[1], data.num_classes
    order = torch.Generator().manual_seed(first.spec.seed)
    init = first.build(dim, classes, order, torch.Generator(dev).manual_seed(first.spec.seed))
    weight = init.weight.detach().T.to(dev).repeat(1, count).requires_grad_()  # [D, H x C]
    bias = init.bias.detach().to(dev).repeat(count).requires_grad_()  # [H x C]

    def per_head(values: list[float]) -> torch.Tensor:  # broadcasts over [..., H, C]
        return torch.tensor(values, dtype=x.dtype, device=dev).view(count, 1)

    lrs = per_head([head.spec.lr for head in heads])
    decays = per_head([head.spec.weight_decay for head in heads])
    momenta = per_head([head.spec.momentum for head in heads])
    buffers: list[torch.Tensor | None] = [None, None]
    starts = _batches(n, schedule.batch_size)
    total, warmup = schedule.epochs * len(starts), schedule.warmup_epochs * len(starts)
    step = 0
    for epoch in tqdm(range(1, schedule.epochs + 1), desc=f"{count} head(s), one wide layer",
                      disable=not progress, leave=False):
        if epoch_features is not None and epoch > 1:
            (fresh,) = epoch_features(epoch)  # one input
            x = norm(fresh).to(dev)
        epoch_order = torch.randperm(n, generator=order).to(dev)
        epoch_loss = torch.zeros(count, device=dev)
        for start in starts:
            index = epoch_order[start:start + schedule.batch_size]
            logits = torch.addmm(bias, x[index], weight).view(len(index), count, classes)
            targets = y[index].repeat(count, *([1] * (y.ndim - 1)))
            losses = data.loss(logits.transpose(0, 1).reshape(count * len(index), classes),
                               targets)
            per_head = losses.view(count, -1).mean(1)
            grads = torch.autograd.grad(per_head.sum(), [weight, bias])
            epoch_loss += per_head.detach()
            factor = lr_factor(step, warmup, total)
            steps = lrs * -factor
            with torch.no_grad():  # one pass over the weights per operation (they are large)
                for slot, (param, grad) in enumerate(zip((weight, bias), grads, strict=True)):
                    p, g = param.view(-1, count, classes), grad.view(-1, count, classes)
                    d = g.addcmul_(p, decays)  # torch.optim.SGD: weight decay, then momentum
                    buffer = buffers[slot]
                    if buffer is not None:
                        d = torch.addcmul(d, buffer, momenta, out=buffer)
                    buffers[slot] = d
                    p.addcmul_(d, steps)
            step += 1
        if on_epoch is not None:
            normalised = _Normalised(dev)
            on_epoch(epoch, (epoch_loss / len(starts)).tolist(),
                     [head.spec.lr * factor for head in heads],
                     [_block_scorer(weight, bias, block, classes, norm, normalised)
                      for block in range(count)])
    fitted = []
    for block in range(count):
        columns = slice(block * classes, (block + 1) * classes)
        layer = nn.Linear(dim, classes).to(dev)
        with torch.no_grad():
            layer.weight.copy_(weight.detach()[:, columns].T)
            layer.bias.copy_(bias.detach()[columns])
        fitted.append(_fitted(layer.eval(), norm, dev))
    return fitted


def _block_scorer(weight: torch.Tensor, bias: torch.Tensor, block: int, classes: int,
                  norm: FeatureNorm, normalised: _Normalised) -> Scorer:
    columns = slice(block * classes, (block + 1) * classes)

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.addmm(bias[columns], normalised(norm, x), weight[:, columns])
    return score


def _fitted(module: nn.Module, norm: FeatureNorm, device: torch.device) -> Fitted:
    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(norm(x.to(device)))
    return Fitted(score, "logits", model=module)


# head kind -> its module factory for a config (kinds trained by gradient descent)
_BUILDERS: dict[str, Callable[[Any], ModuleFactory]] = {}
_LINEAR: set[str] = set()


def register_gradient_head(kind: str, builder: Callable[[Any], ModuleFactory],
                           linear: bool = False) -> None:
    """Register a kind trained by gradient descent: `builder(config)` makes its modules;
    `linear`: one `linear_init` layer (heads of it on one input can train as one wide layer)."""
    _BUILDERS[kind] = builder
    if linear:
        _LINEAR.add(kind)
    register_head(kind)(functools.partial(_fit_one, kind))


def _fit_one(kind: str, config: Any, inputs: Sequence[HeadInput],
             settings: FitSettings) -> list[dict[str, Fitted]]:
    (fits,) = _gradient_heads(config, inputs, [settings])
    return fits


def fit_heads_together(config: Any, inputs: Sequence[HeadInput],
                       settings: Sequence[FitSettings], on_epoch: EpochHook | None = None,
                       epoch_features: EpochFeatures | None = None,
                       ) -> list[list[dict[str, Fitted]]]:
    """`config.kind` fitted on `inputs` once per settings (seed, optim); for each settings,
    what `fit_heads` returns. A kind trained by gradient descent trains them all in one pass:
    each head as it would train alone (its own seed, data order, learning rate); `on_epoch`
    then sees the heads in the order settings x inputs, and `epoch_features` gives the features
    of `inputs` for each epoch from the second (online mode). Other kinds have no epochs."""
    if config.kind in _BUILDERS:
        return _gradient_heads(config, inputs, settings, on_epoch, epoch_features)
    if epoch_features is not None:
        raise ValueError(f"head kind {config.kind!r} is fitted on fixed features, not per epoch")
    if len(settings) == 1:
        return [fit_heads(config, inputs, settings[0])]
    raise ValueError(f"head kind {config.kind!r} cannot train several settings in one pass")


def _gradient_heads(config: Any, inputs: Sequence[HeadInput], settings: Sequence[FitSettings],
                    on_epoch: EpochHook | None = None,
                    epoch_features: EpochFeatures | None = None,
                    ) -> list[list[dict[str, Fitted]]]:
    """One head per input and settings, all in one pass, each with its settings' optim."""
    schedules = {Schedule(s.optim.epochs, s.optim.batch_size, s.optim.warmup_epochs)
                 for s in settings}
    devices = {s.device for s in settings}
    if len(schedules) != 1 or len(devices) != 1:
        raise ValueError("heads trained in one pass share their schedule (epochs, batch size, "
                         f"warmup) and device; got {sorted(map(str, schedules | devices))}")
    build = _BUILDERS[config.kind](config)
    heads = [GradientHead(build, data, _spec(s), config.feature_norm, config.kind in _LINEAR)
             for s in settings for data in inputs]
    trained = train_heads(heads, schedules.pop(), device=devices.pop(),
                          progress=any(s.progress for s in settings), on_epoch=on_epoch,
                          epoch_features=epoch_features)
    per_input = len(inputs)
    return [[{"": fitted} for fitted in trained[i:i + per_input]]
            for i in range(0, len(trained), per_input)]


def _spec(settings: FitSettings) -> HeadSpec:
    optim = settings.optim
    return HeadSpec(lr=optim.lr, weight_decay=optim.weight_decay, seed=settings.seed,
                    optimizer=optim.name, momentum=getattr(optim, "momentum", 0.0))
