"""Heads against independent references on the same features: the batched trainer against
training each head alone, logreg against scikit-learn's LogisticRegression, svm against
LinearSVC, knn against KNeighborsClassifier and a hand-computed vote."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import LinearSVC

from vtab.evaluation.heads import (
    FitSettings,
    HeadInput,
    bn_linear,
    fit_heads,
    known_heads,
    linear,
    mlp,
)
from vtab.evaluation.heads.base import FeatureNorm
from vtab.evaluation.heads.svm import stratified_folds
from vtab.evaluation.heads.trainer import GradientHead, HeadSpec, Schedule, lr_factor, train_heads
from vtab.evaluation.schemas import (
    BnLinearHead,
    KnnHead,
    LinearHead,
    LogregHead,
    MlpHead,
    SgdOptimizer,
    SvmHead,
)

SPECS = [
    HeadSpec(lr=0.1, seed=0),
    HeadSpec(lr=0.01, weight_decay=1e-3, seed=1, momentum=0.5),
    HeadSpec(lr=3e-3, weight_decay=0.05, seed=2, optimizer="adamw"),
]
SCHEDULE = Schedule(epochs=3, batch_size=64, warmup_epochs=1)


def toy_problem(n: int, seed: int, spread: float = 1.0,
                classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs in 20 dimensions, far apart relative to `spread`."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 20, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, 20, generator=g) + 7.0, y


def single(x: torch.Tensor, y: torch.Tensor, classes: int = 3) -> HeadInput:
    return HeadInput(x, y, classes, "single_label")


def test_every_kind_is_registered() -> None:
    assert known_heads() == ["bn_linear", "knn", "linear", "logreg", "mlp", "svm"]


BUILDERS = {
    "linear": linear.build,
    "bn_linear": bn_linear.build,
    "mlp": lambda *a: mlp.build(MlpHead(hidden=[16, 8], dropout=0.3, activation="gelu"), *a),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("feature_norm", ["standardize", "l2", "none"])
def test_batched_heads_equal_heads_trained_alone(kind: str, feature_norm: str) -> None:
    x, y = toy_problem(300, seed=0, spread=3.0)  # 300 % 64 != 0: a short last batch
    other_x, _ = toy_problem(300, seed=5, spread=3.0)  # a second layer: another input
    inputs = [single(x, y), single(other_x, y), single(x, y)]
    heads = [GradientHead(BUILDERS[kind], data, spec, feature_norm)
             for data, spec in zip(inputs, SPECS, strict=True)]
    together = train_heads(heads, SCHEDULE)
    for head, batched in zip(heads, together, strict=True):
        (alone,) = train_heads([head], SCHEDULE)
        for (name, a), b in zip(batched.model.state_dict().items(),
                                alone.model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(batched.scores(x), alone.scores(x))
    # Different seeds and settings do give different heads.
    first, second = (next(iter(t.model.parameters())) for t in together[:2])
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("section", [LinearHead(), BnLinearHead(), MlpHead(hidden=[32])])
def test_gradient_heads_learn_a_separable_problem(section) -> None:
    x, y = toy_problem(400, seed=0)
    test_x, test_y = toy_problem(400, seed=1)
    optim = SgdOptimizer(lr=0.1, epochs=10, batch_size=32)
    (fitted,) = fit_heads(section, [single(x, y)], FitSettings(seed=0, device="cpu", optim=optim))
    accuracy = (fitted[""].scores(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.95


def test_normalisation_is_fitted_on_training_features() -> None:
    x, _ = toy_problem(100, seed=0)
    x[:, 3] = 5.0  # a constant feature must not be divided by ~0
    norm = FeatureNorm.fit("standardize", x)
    torch.testing.assert_close(norm.mean, x.mean(0))
    assert norm.std[3] == 1.0
    with pytest.raises(ValueError, match="feature_norm"):
        FeatureNorm.fit("whiten", x)


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, 4, 20) == 0.25
    assert lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert 0 < lr_factor(19, 4, 20) < 0.01
    assert lr_factor(0, 0, 10) == 1.0


def test_unknown_optimizer_is_refused() -> None:
    x, y = toy_problem(10, seed=0)
    head = GradientHead(linear.build, single(x, y), HeadSpec(lr=0.1, optimizer="lamb"))
    with pytest.raises(ValueError, match="optimizer"):
        train_heads([head], Schedule(1, 4))


def _fit(section, x: torch.Tensor, y: torch.Tensor, classes: int = 3):
    (fitted,) = fit_heads(section, [single(x, y, classes)], FitSettings(seed=0, device="cpu"))
    return fitted


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_logreg_matches_scikit_learn(c: float) -> None:
    """Same objective, both to convergence: accuracy within 0.5 points, probabilities within
    1e-3 (float64 L-BFGS here, lbfgs at tol 1e-10 there)."""
    x, y = toy_problem(300, seed=0, spread=6.0, classes=4)
    test_x, test_y = toy_problem(300, seed=1, spread=6.0, classes=4)
    fitted = _fit(LogregHead(c=c, feature_norm="standardize"), x, y, 4)[""]
    assert fitted.info["converged"]
    norm = FeatureNorm.fit("standardize", x)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(
        norm(x).double().numpy(), y.numpy())
    ours = fitted.scores(test_x).softmax(1).double().numpy()
    theirs = reference.predict_proba(norm(test_x).double().numpy())
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    accuracy = (ours.argmax(1) == test_y.numpy()).mean()
    assert abs(accuracy - reference.score(norm(test_x).double().numpy(), test_y.numpy())) <= 0.005


def test_multilabel_logreg_is_one_scikit_learn_model_per_class() -> None:
    x, y = toy_problem(300, seed=0, spread=6.0, classes=4)
    targets = torch.stack([y == 0, (y == 1) | (y == 2)], dim=1).to(torch.int8)
    data = HeadInput(x, targets, 2, "multi_label")
    (fitted,) = fit_heads(LogregHead(c=0.5), [data], FitSettings(seed=0, device="cpu"))
    norm = FeatureNorm.fit("standardize", x)
    for c in range(2):
        reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(
            norm(x).double().numpy(), targets[:, c].numpy())
        np.testing.assert_allclose(
            fitted[""].scores(x)[:, c].sigmoid().double().numpy(),
            reference.predict_proba(norm(x).double().numpy())[:, 1], atol=1e-3)


@pytest.mark.parametrize("cost", [0.1, 1.0, 10.0])
def test_svm_matches_linear_svc(cost: float) -> None:
    """One cost (no choice to make): liblinear's objective, intercept regularised like a weight
    (intercept_scaling 1); predictions agree on at least 99% of the examples and margins
    within 1e-3."""
    x, y = toy_problem(300, seed=0, spread=8.0, classes=4)
    fitted = _fit(SvmHead(costs=[cost]), x, y, 4)[""]
    unit = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    reference = LinearSVC(C=cost, tol=1e-8, max_iter=200_000, dual=True).fit(unit, y.numpy())
    ours = fitted.scores(x).double().numpy()
    theirs = reference.decision_function(unit)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_svm_chooses_a_cost_per_class_by_cross_validation() -> None:
    x, y = toy_problem(240, seed=0, spread=8.0, classes=3)
    fitted = _fit(SvmHead(costs=[1e-4, 1.0], folds=3), x, y)[""]
    assert len(fitted.info["costs"]) == 3
    assert set(fitted.info["costs"]) <= {1e-4, 1.0}
    # Folds are a fixed function of the data: fitting again gives the same choice.
    assert _fit(SvmHead(costs=[1e-4, 1.0], folds=3), x, y)[""].info == fitted.info


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_uniform_votes_match_scikit_learn(k: int) -> None:
    x, y = toy_problem(200, seed=0, spread=10.0, classes=5)
    test_x, _ = toy_problem(100, seed=1, spread=10.0, classes=5)
    fitted = _fit(KnnHead(k=[k], votes="uniform"), x, y, 5)
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(
        x.numpy(), y.numpy())
    assert fitted[f"k={k}"].scores(test_x).argmax(1).tolist() == \
        reference.predict(test_x.numpy()).tolist()


def test_knn_temperature_votes_by_hand() -> None:
    """Neighbours at cosine 1, 0.6 and 0 from the query: with k=2 and T=0.5 the votes are
    exp(2) for class 1 and exp(1.2) for class 0, normalised."""
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([1, 0, 0])
    fitted = _fit(KnnHead(k=[2, 3], temperature=0.5), x, y, 2)
    votes = fitted["k=2"].scores(torch.tensor([[2.0, 0.0]]))[0]
    expected = torch.tensor([np.exp(1.2), np.exp(2.0)], dtype=torch.float32)
    torch.testing.assert_close(votes, expected / expected.sum())
    assert fitted["k=3"].setting == {"head.k": [3]}


def test_knn_with_more_neighbours_than_examples_is_refused() -> None:
    x, y = toy_problem(10, seed=0)
    with pytest.raises(ValueError, match=r"head\.k"):
        _fit(KnnHead(k=[11]), x, y)


def test_fit_heads_refuses_an_unknown_kind() -> None:
    x, y = toy_problem(10, seed=0)
    with pytest.raises(ValueError, match="unknown head kind"):
        fit_heads(SimpleNamespace(kind="forest"), [single(x, y)], FitSettings(0, "cpu"))


def test_a_last_batch_of_one_example_is_skipped_alike_alone_and_batched() -> None:
    x, y = toy_problem(129, seed=0, spread=3.0)  # 129 = 2 x 64 + 1: BatchNorm cannot train on 1
    heads = [GradientHead(bn_linear.build, single(x, y), spec) for spec in SPECS]
    together = train_heads(heads, SCHEDULE)
    for head, batched in zip(heads, together, strict=True):
        (alone,) = train_heads([head], SCHEDULE)
        torch.testing.assert_close(batched.scores(x), alone.scores(x))


def test_knn_with_a_small_temperature_does_not_overflow() -> None:
    """1/T = 200: exp(similarity / T) overflows float32; the votes must still be right."""
    x, y = toy_problem(200, seed=0, spread=10.0, classes=5)
    test_x, _ = toy_problem(50, seed=1, spread=10.0, classes=5)
    votes = _fit(KnnHead(k=[10], temperature=0.005), x, y, 5)["k=10"].scores(test_x)
    similarity = torch.nn.functional.normalize(test_x.double(), dim=1) @ \
        torch.nn.functional.normalize(x.double(), dim=1).T
    nearest = similarity.topk(10, dim=1)
    weights = (nearest.values / 0.005).softmax(1)  # softmax: normalised exp, in float64
    expected = torch.zeros(50, 5, dtype=torch.float64).scatter_add_(1, y[nearest.indices],
                                                                     weights)
    assert torch.isfinite(votes).all()
    torch.testing.assert_close(votes.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positives", [7, 30, 101])
def test_folds_are_scikit_learns_stratified_folds(positives: int) -> None:
    labels = torch.zeros(150, dtype=torch.bool)
    labels[torch.randperm(150, generator=torch.Generator().manual_seed(positives))[
        :positives]] = True
    ours = stratified_folds(labels, 3)
    for k, (_, held) in enumerate(StratifiedKFold(3).split(np.zeros(150), labels.numpy())):
        assert sorted(held.tolist()) == (ours == k).nonzero().flatten().tolist()


def test_svm_cost_choice_and_class_weight_match_scikit_learn() -> None:
    """Per class, the cost with the best mean cross-validated AP of LinearSVC with
    class_weight {1: 2, -1: 1} over StratifiedKFold(3), as VISSL's svm_trainer computes it;
    the final SVMs' margins match LinearSVC's with the chosen costs."""
    x, y = toy_problem(240, seed=0, spread=12.0, classes=3)
    costs = [0.01, 1.0, 100.0]
    fitted = _fit(SvmHead(costs=costs, positive_weight=2.0), x, y)[""]
    unit = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    expected = []
    for c in range(3):
        target = (y == c).numpy().astype(int) * 2 - 1
        means = [cross_val_score(LinearSVC(C=cost, class_weight={1: 2, -1: 1}, tol=1e-8,
                                           max_iter=200_000),
                                 unit, target, cv=StratifiedKFold(3),
                                 scoring="average_precision").mean() for cost in costs]
        expected.append(costs[int(np.argmax(means))])
    assert fitted.info["costs"] == expected
    assert fitted.info["converged"]
    for c, cost in enumerate(expected):
        reference = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, tol=1e-8,
                              max_iter=200_000).fit(unit, (y == c).numpy().astype(int) * 2 - 1)
        np.testing.assert_allclose(fitted.scores(x)[:, c].double().numpy(),
                                   reference.decision_function(unit), atol=2e-3)


def test_an_unconverged_fit_says_so() -> None:
    x, y = toy_problem(200, seed=0, spread=6.0)
    fitted = _fit(LogregHead(max_iter=3, feature_norm="none"), x * 1e4, y)[""]
    assert not fitted.info["converged"] and fitted.info["gradient_max"] > 1e-5
