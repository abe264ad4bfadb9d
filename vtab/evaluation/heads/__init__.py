"""Heads on frozen features, one module per kind (see docs/HEADS.md); importing the package
registers them all."""

from vtab.evaluation.heads import bn_linear, knn, linear, logreg, mlp, svm  # noqa: F401
from vtab.evaluation.heads.base import (
    FeatureNorm,
    FitSettings,
    Fitted,
    HeadInput,
    fit_heads,
    known_heads,
    register_head,
)

__all__ = ["FeatureNorm", "FitSettings", "Fitted", "HeadInput", "fit_heads", "known_heads",
           "register_head"]
