"""``svm``: one-vs-rest linear SVMs on L2-normalised features, the VOC07 protocol of VISSL and
VirTex: for each class, the cost is chosen among ``costs`` by the mean average precision of a
k-fold cross-validation on the training set, then the class's SVM is trained on all of it.

Each SVM minimises liblinear's L2-regularised squared-hinge objective (scikit-learn's
``LinearSVC`` defaults, the bias regularised as a weight on a constant feature 1):
0.5 (|w|^2 + b^2) + C * sum_i max(0, 1 - y_i (w.x_i + b))^2, here by L-BFGS, all classes at
once (the objective is a sum over classes). Examples marked difficult for a class are left out
of that class's training and cross-validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vtab.evaluation.heads.base import FitSettings, Fitted, HeadInput, multi_hot, register_head
from vtab.evaluation.heads.convex import Solution, minimise
from vtab.evaluation.metrics import average_precision

FOLD_SEED = 0  # folds are a fixed function of the training set: the fit has no seed


def _signs_and_weights(data: HeadInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example and class: +1/-1, and 1 where the example counts for the class."""
    present = multi_hot(data.targets, data.num_classes)
    counted = (torch.ones_like(present) if data.targets.ndim == 1
               else (data.targets >= 0).double())
    return present * 2 - 1, counted


def train_svms(x: torch.Tensor, signs: torch.Tensor, counted: torch.Tensor,
               costs: torch.Tensor, max_iter: int) -> Solution:
    """One SVM per column of `signs`, column c with cost costs[c]; x is float64 [N, D]."""

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        margins = (1 - signs * torch.addmm(bias, x, weight)).clamp_min(0)
        hinge = (margins.square() * counted).sum(0)
        return (0.5 * (weight.square().sum(0) + bias.square()) + costs * hinge).sum() / len(x)

    return minimise(objective, x.shape[1], signs.shape[1], x.device, max_iter)


def _folds(n: int, folds: int) -> torch.Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(FOLD_SEED))
    fold = torch.empty(n, dtype=torch.long)
    fold[order] = torch.arange(n) % folds
    return fold


def choose_costs(x: torch.Tensor, signs: torch.Tensor, counted: torch.Tensor,
                 costs: Sequence[float], folds: int, max_iter: int) -> torch.Tensor:
    """Each class's cost with the best mean cross-validated AP (the first of equals); folds
    where a class has no positive are left out of its mean."""
    fold = _folds(len(x), folds).to(x.device)
    table = []
    for cost in costs:
        per_class = torch.zeros(signs.shape[1], dtype=torch.float64)
        seen = torch.zeros(signs.shape[1], dtype=torch.float64)
        for k in range(folds):
            train, held = fold != k, fold == k
            solution = train_svms(x[train], signs[train], counted[train],
                                  torch.full((signs.shape[1],), cost, dtype=torch.float64,
                                             device=x.device), max_iter)
            scores = torch.addmm(solution.bias, x[held], solution.weight).cpu()
            for c in range(signs.shape[1]):
                kept = counted[held, c].cpu() > 0
                ap = average_precision(scores[kept, c], signs[held, c].cpu()[kept] > 0)
                if ap == ap:  # not NaN: the fold has a positive
                    per_class[c] += ap
                    seen[c] += 1
        table.append((per_class / seen.clamp_min(1)).tolist())
    best = torch.tensor(table).argmax(0)  # argmax keeps the first of equal values
    return torch.tensor([costs[i] for i in best.tolist()], dtype=torch.float64)


def fit_one(config, data: HeadInput, device: str) -> Fitted:
    dev = torch.device(device)
    x = F.normalize(data.x.to(dev, torch.float64), dim=1)
    signs, counted = (t.to(dev) for t in _signs_and_weights(data))
    chosen = choose_costs(x, signs, counted, config.costs, config.folds, config.max_iter)
    solution = train_svms(x, signs, counted, chosen.to(dev), config.max_iter)
    weight, bias = solution.weight.float(), solution.bias.float()

    def score(features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, F.normalize(features.to(dev).float(), dim=1), weight)

    return Fitted(score, "margins", info={"costs": chosen.tolist(),
                                          "converged": solution.converged})


@register_head("svm")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return [{"": fit_one(config, data, settings.device)} for data in inputs]
