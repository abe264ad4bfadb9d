"""``mlp``: hidden layers (each: linear, activation, dropout), then a linear output layer."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vtab.evaluation.heads.trainer import linear_init, register_gradient_head

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class SeededDropout(nn.Module):
    """Dropout drawing its masks from the head's own generator, so that a head trained beside
    others gets the masks it gets alone (nn.Dropout draws from the global generator)."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)


def _hidden_layer(dim: int, out: int, generator: torch.Generator) -> nn.Linear:
    """PyTorch's default initialisation of a linear layer, from `generator`."""
    layer = nn.Linear(dim, out)
    bound = 1 / math.sqrt(dim)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(out, dim, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(out, generator=generator) * 2 * bound - bound)
    return layer


def build(config, dim: int, classes: int, generator: torch.Generator,
          noise: torch.Generator) -> nn.Module:
    layers: list[nn.Module] = []
    for width in config.hidden:
        layers += [_hidden_layer(dim, width, generator), ACTIVATIONS[config.activation](),
                   SeededDropout(config.dropout, noise)]
        dim = width
    return nn.Sequential(*layers, linear_init(dim, classes, generator))


register_gradient_head("mlp", lambda config: functools.partial(build, config))
