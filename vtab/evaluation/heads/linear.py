"""``linear``: one linear layer on the (normalised) features."""

from __future__ import annotations

import torch
from torch import nn

from vtab.evaluation.heads.trainer import linear_init, register_gradient_head


def build(dim: int, classes: int, generator: torch.Generator, noise: torch.Generator) -> nn.Module:
    return linear_init(dim, classes, generator)


register_gradient_head("linear", lambda config: build, linear=True)
