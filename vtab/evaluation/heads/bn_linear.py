"""``bn_linear``: BatchNorm without affine parameters, then linear (MAE's linear probe, VISSL's
``eval_mlp``). The BatchNorm standardises with batch statistics while training and with its
running averages when scoring."""

from __future__ import annotations

import torch
from torch import nn

from vtab.evaluation.heads.trainer import linear_init, register_gradient_head


def build(dim: int, classes: int, generator: torch.Generator, noise: torch.Generator) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                         linear_init(dim, classes, generator))


register_gradient_head("bn_linear", lambda config: build)
