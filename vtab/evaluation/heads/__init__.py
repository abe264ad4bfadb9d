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
from vtab.evaluation.heads.trainer import fit_heads_together

__all__ = ["FeatureNorm", "FitSettings", "Fitted", "HeadInput", "fit_heads", "fit_heads_together",
           "known_heads", "register_head"]
