"""``logreg``: logistic regression fitted by L-BFGS to convergence (CLIP's linear probe, DINOv2's
``log_regression.py``), with scikit-learn's objective: the loss summed over examples plus
|W|^2 / (2 c), the bias not penalised. Multinomial for single-label tasks, one sigmoid per class
for multi-label ones (difficult labels left out)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vtab.evaluation.heads.base import FeatureNorm, FitSettings, Fitted, HeadInput, register_head
from vtab.evaluation.heads.convex import minimise


def fit_one(config, data: HeadInput, device: str) -> Fitted:
    norm = FeatureNorm.fit(config.feature_norm, data.x)
    dev = torch.device(device)
    x = norm(data.x).to(dev, torch.float64)
    targets = data.targets.to(dev)
    n = len(x)

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Divided by n: the same minimum, gradients of a scale L-BFGS's tolerances suit.
        losses = data.loss(torch.addmm(bias, x, weight), targets)
        return (losses.sum() + weight.square().sum() / (2 * config.c)) / n

    solution = minimise(objective, x.shape[1], data.num_classes, dev, config.max_iter)
    weight, bias = solution.weight.float(), solution.bias.float()

    def score(features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, norm(features.to(dev)), weight)

    return Fitted(score, "logits", info={"iterations": solution.iterations,
                                         "gradient_max": solution.gradient_max,
                                         "converged": solution.converged})


@register_head("logreg")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return [{"": fit_one(config, data, settings.device)} for data in inputs]
