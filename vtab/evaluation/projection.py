"""2-D projections of evaluation features, fitted on the training features: where a head's
mistakes lie among the classes (3LC's idea, offline; drawn by `vtab.plots.scatter_png`)."""

from __future__ import annotations

import numpy as np

from vtab.errors import VtabError

METHODS = ("pca", "umap")


def project(train: np.ndarray, evaluation: np.ndarray, method: str = "pca",
            seed: int = 0) -> np.ndarray:
    """`evaluation` [N, D] in two dimensions, by a projection fitted on `train` [M, D]."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit(train).transform(evaluation)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise VtabError("--method umap needs umap-learn, which is not installed: "
                            "pip install umap-learn (or use --method pca)") from None
        return umap.UMAP(n_components=2, random_state=seed).fit(train).transform(evaluation)
    raise VtabError(f"unknown projection method {method!r}; known: {', '.join(METHODS)}")
