"""``bn_linear``: BatchNorm without affine parameters, then linear (MAE's linear probe, VISSL's
``eval_mlp``). The BatchNorm standardises with batch statistics while training and with its
running averages when scoring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vtab.evaluation.heads.base import FitSettings, Fitted, HeadInput, register_head
from vtab.evaluation.heads.trainer import gradient_heads, linear_init


def build(dim: int, classes: int, generator: torch.Generator, noise: torch.Generator) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                         linear_init(dim, classes, generator))


@register_head("bn_linear")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return gradient_heads(build, config, inputs, settings)
