"""Each head on the debug pipeline's features of digits (a random ResNet-18 at 32 px), against
what scikit-learn reaches on the very same features: none may be more than 2 points below its
reference (logreg, the same model, within 0.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC

from vtab.evaluation.backbones import build_backbone, resolve_backbone, source_of
from vtab.evaluation.data import open_split, targets
from vtab.evaluation.features import TransformSpec, extract_features
from vtab.evaluation.heads import FitSettings, HeadInput, fit_heads
from vtab.evaluation.heads.base import FeatureNorm
from vtab.evaluation.schemas import (
    AdamWOptimizer,
    BackboneConfig,
    BnLinearHead,
    KnnHead,
    LayerConfig,
    LinearHead,
    LogregHead,
    MlpHead,
    SgdOptimizer,
    SvmHead,
)


@pytest.fixture(scope="module")
def digits(digits_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    spec = resolve_backbone(BackboneConfig(name="resnet18"))
    model = build_backbone(spec).model
    out = {}
    for name in ("train800val200", "test"):
        split = open_split(digits_root, "digits", name, key="data.train_split")
        found = extract_features(model, [LayerConfig()], source_of(spec), split,
                                 TransformSpec(32), batch_size=256)
        out[name] = (found["output"].features, targets(split, 10))
    return out


def accuracy(predicted, expected: torch.Tensor) -> float:
    return (torch.as_tensor(predicted) == expected).double().mean().item()


def ours(section, digits, optim=None, variant: str = "") -> float:
    x, y = digits["train800val200"]
    test_x, test_y = digits["test"]
    (fitted,) = fit_heads(section, [HeadInput(x, y, 10, "single_label")],
                          FitSettings(seed=0, device="cpu", optim=optim))
    return accuracy(fitted[variant].scores(test_x).argmax(1), test_y)


def standardized(digits) -> tuple:
    x, y = digits["train800val200"]
    test_x, test_y = digits["test"]
    norm = FeatureNorm.fit("standardize", x)
    return norm(x).double().numpy(), y.numpy(), norm(test_x).double().numpy(), test_y


def logistic_reference(digits) -> float:
    x, y, test_x, test_y = standardized(digits)
    reference = LogisticRegression(C=1.0, tol=1e-8, max_iter=20_000)
    return accuracy(reference.fit(x, y).predict(test_x), test_y)


SGD = SgdOptimizer(lr=0.01, epochs=30, batch_size=64)


@pytest.mark.slow
@pytest.mark.parametrize(("section", "optim"), [
    (LinearHead(), SGD), (BnLinearHead(), SGD), (LinearHead(), AdamWOptimizer(lr=1e-3, epochs=30)),
])
def test_linear_heads_reach_logistic_regression(digits, section, optim) -> None:
    assert ours(section, digits, optim) >= logistic_reference(digits) - 0.02


@pytest.mark.slow
def test_logreg_is_scikit_learns_logistic_regression(digits) -> None:
    assert abs(ours(LogregHead(c=1.0), digits) - logistic_reference(digits)) <= 0.005


@pytest.mark.slow
def test_mlp_reaches_scikit_learns_mlp(digits) -> None:
    x, y, test_x, test_y = standardized(digits)
    reference = MLPClassifier(hidden_layer_sizes=(256,), max_iter=500, random_state=0)
    expected = accuracy(reference.fit(x, y).predict(test_x), test_y)
    assert ours(MlpHead(hidden=[256]), digits, SgdOptimizer(lr=0.1, epochs=30)) >= expected - 0.02


@pytest.mark.slow
def test_svm_reaches_linear_svc(digits) -> None:
    x, y = digits["train800val200"]
    test_x, test_y = digits["test"]
    unit = F.normalize(x.double(), dim=1).numpy()
    expected = max(accuracy(LinearSVC(C=c, max_iter=20_000).fit(unit, y.numpy()).predict(
        F.normalize(test_x.double(), dim=1).numpy()), test_y) for c in (0.1, 1.0, 10.0))
    assert ours(SvmHead(costs=[0.1, 1.0, 10.0]), digits) >= expected - 0.02


@pytest.mark.slow
@pytest.mark.parametrize("k", [5, 20])
def test_knn_reaches_scikit_learns_neighbours(digits, k: int) -> None:
    x, y = digits["train800val200"]
    test_x, test_y = digits["test"]
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    expected = accuracy(reference.fit(x.numpy(), y.numpy()).predict(test_x.numpy()), test_y)
    assert ours(KnnHead(k=[k]), digits, variant=f"k={k}") >= expected - 0.02
    assert ours(KnnHead(k=[k], votes="uniform"), digits, variant=f"k={k}") == expected
