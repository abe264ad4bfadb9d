"""``svm``: one-vs-rest linear SVMs on L2-normalised features, the VOC07 protocol of VISSL and
VirTex: for each class, the cost is chosen among ``costs`` by the mean average precision of a
k-fold cross-validation on the training set (folds stratified per class, unshuffled, as
scikit-learn's ``cross_val_score`` makes them), then the class's SVM is trained on all of it.

Each SVM minimises liblinear's L2-regularised squared-hinge objective (scikit-learn's
``LinearSVC`` defaults, the bias regularised as a weight on a constant feature 1), with the
positive examples' loss weighted by ``positive_weight`` (``class_weight={1: w, -1: 1}``):
0.5 (|w|^2 + b^2) + C * sum_i weight_i * max(0, 1 - y_i (w.x_i + b))^2, here by L-BFGS, all
classes at once (the objective is a sum over classes; a fold is a per-class mask). Examples
marked difficult for a class are left out of that class's training and cross-validation, or
count as negatives there (``train_difficult_as``); evaluation always leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vtab.evaluation.heads.base import FitSettings, Fitted, HeadInput, multi_hot, register_head
from vtab.evaluation.heads.convex import Solution, minimise
from vtab.evaluation.metrics import average_precision


def _signs_and_weights(data: HeadInput, positive_weight: float,
                       difficult_as: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example and class: +1/-1, and the weight of its loss term (0: left out)."""
    present = multi_hot(data.targets, data.num_classes)
    counted = torch.ones_like(present)
    if data.targets.ndim == 2 and difficult_as == "ignored":
        counted = (data.targets >= 0).double()
    return present * 2 - 1, counted * torch.where(present > 0, positive_weight, 1.0)


def train_svms(x: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor,
               costs: torch.Tensor, max_iter: int) -> Solution:
    """One SVM per column of `signs`, column c with cost costs[c]; x is float64 [N, D]."""

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        margins = (1 - signs * torch.addmm(bias, x, weight)).clamp_min(0)
        hinge = (margins.square() * weights).sum(0)
        return (0.5 * (weight.square().sum(0) + bias.square()) + costs * hinge).sum() / len(x)

    return minimise(objective, x.shape[1], signs.shape[1], x.device, max_iter)


def stratified_folds(positive: torch.Tensor, folds: int) -> torch.Tensor:
    """Each example's fold, as scikit-learn's StratifiedKFold(folds) without shuffling assigns
    them: labels are numbered in order of first appearance, and the examples of each label, in
    order, fill the folds in contiguous runs whose sizes deal the labels out evenly."""
    labels = positive.long()
    if len(labels) and labels[0] == 1:  # the label seen first is number 0
        labels = 1 - labels
    ordered = torch.sort(labels).values
    allocation = torch.stack([torch.bincount(ordered[i::folds], minlength=2)
                              for i in range(folds)])  # [folds, 2]
    fold = torch.empty_like(labels)
    for label in (0, 1):
        fold[labels == label] = torch.arange(folds).repeat_interleave(allocation[:, label])
    return fold


def choose_costs(x: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor,
                 costs: Sequence[float], folds: int, max_iter: int) -> tuple[torch.Tensor, int]:
    """Each class's cost with the best mean cross-validated AP (the first of equals), and how
    many fits did not converge. A class's folds are drawn over the examples that count for it;
    folds without a positive are left out of its mean."""
    classes = signs.shape[1]
    fold = torch.full(signs.shape, -1, dtype=torch.long)
    for c in range(classes):
        kept = (weights[:, c] > 0).cpu()
        fold[kept, c] = stratified_folds(signs[:, c].cpu()[kept] > 0, folds)
    fold = fold.to(x.device)
    table, unconverged = [], 0
    for cost in costs:
        total = torch.zeros(classes, dtype=torch.float64)
        seen = torch.zeros(classes, dtype=torch.float64)
        for k in range(folds):
            solution = train_svms(x, signs, weights * (fold != k),
                                  torch.full((classes,), cost, dtype=torch.float64,
                                             device=x.device), max_iter)
            unconverged += not solution.converged
            scores = torch.addmm(solution.bias, x, solution.weight).cpu()
            for c in range(classes):
                held = (fold[:, c] == k).cpu()
                ap = average_precision(scores[held, c], signs[:, c].cpu()[held] > 0)
                if ap == ap:  # not NaN: the fold has a positive
                    total[c] += ap
                    seen[c] += 1
        table.append((total / seen.clamp_min(1)).tolist())
    best = torch.tensor(table).argmax(0)  # argmax keeps the first of equal values
    return torch.tensor([costs[i] for i in best.tolist()], dtype=torch.float64), unconverged


def fit_one(config, data: HeadInput, device: str) -> Fitted:
    dev = torch.device(device)
    x = F.normalize(data.x.to(dev, torch.float64), dim=1)
    signs, weights = (t.to(dev) for t in _signs_and_weights(data, config.positive_weight,
                                                            config.train_difficult_as))
    chosen, unconverged = choose_costs(x, signs, weights, config.costs, config.folds,
                                       config.max_iter)
    solution = train_svms(x, signs, weights, chosen.to(dev), config.max_iter)
    weight, bias = solution.weight.float(), solution.bias.float()

    def score(features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, F.normalize(features.to(dev).float(), dim=1), weight)

    return Fitted(score, "margins", info={
        "costs": chosen.tolist(), "gradient_max": solution.gradient_max,
        "converged": solution.converged and unconverged == 0,
        "cross_validation_fits_not_converged": unconverged})


@register_head("svm")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return [{"": fit_one(config, data, settings.device)} for data in inputs]
