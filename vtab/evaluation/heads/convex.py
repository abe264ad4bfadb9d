"""Convex objectives minimised by full-batch L-BFGS to convergence, in float64 on the job's
device: what logistic regression and the linear SVM share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GRADIENT_TOLERANCE = 1e-7  # stop when the largest gradient entry is below this (per example)
# Converged: the largest gradient entry at the solution is below this. L-BFGS also stops when
# the objective stops changing or it runs out of evaluations; only the gradient tells.
CONVERGED_GRADIENT = 1e-5


@dataclass(frozen=True)
class Solution:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    iterations: int
    gradient_max: float  # the largest gradient entry at the solution
    converged: bool


def minimise(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dim: int,
             classes: int, device: torch.device, max_iter: int) -> Solution:
    """argmin over (W [D, C], b [C]) of `objective(W, b)`, from zeros."""
    weight = torch.zeros(dim, classes, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, max_eval=max_iter * 2,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective(weight, bias)
        value.backward()
        return value

    optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    closure()
    gradient = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    return Solution(weight.detach(), bias.detach(), iterations, gradient,
                    gradient <= CONVERGED_GRADIENT)
