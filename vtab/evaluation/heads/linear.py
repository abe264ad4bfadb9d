"""``linear``: one linear layer on the (normalised) features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vtab.evaluation.heads.base import FitSettings, Fitted, HeadInput, register_head
from vtab.evaluation.heads.trainer import gradient_heads, linear_init


def build(dim: int, classes: int, generator: torch.Generator, noise: torch.Generator) -> nn.Module:
    return linear_init(dim, classes, generator)


@register_head("linear")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return gradient_heads(build, config, inputs, settings)
