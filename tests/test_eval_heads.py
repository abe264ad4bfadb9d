"""Linear heads: batched training equals separate training; they learn what is learnable."""

from __future__ import annotations

import pytest
import torch

from vtab.evaluation.heads import HeadSpec, lr_factor, predict, train_linear_heads

SPECS = [
    HeadSpec(lr=0.1, seed=0),
    HeadSpec(lr=0.01, weight_decay=1e-3, seed=1, momentum=0.5),
    HeadSpec(lr=3e-3, weight_decay=0.05, seed=2, optimizer="adamw"),
]


def toy_problem(n: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 20 dimensions, far apart relative to `spread`."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 20, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, 20, generator=g) + 7.0, y


@pytest.mark.parametrize("feature_norm", ["standardize", "l2", "none"])
def test_batched_heads_equal_separate_heads(feature_norm: str) -> None:
    x, y = toy_problem(300, seed=0, spread=3.0)  # 300 % 64 != 0: a short last batch
    kwargs = {"epochs": 3, "batch_size": 64, "warmup_epochs": 1, "feature_norm": feature_norm}
    together = train_linear_heads(x, y, 3, SPECS, **kwargs)
    for spec, batched in zip(SPECS, together, strict=True):
        (alone,) = train_linear_heads(x, y, 3, [spec], **kwargs)
        assert batched.spec == spec
        torch.testing.assert_close(batched.weight, alone.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.bias, alone.bias, rtol=1e-5, atol=1e-6)
    # Different seeds and settings do give different heads.
    assert not torch.allclose(together[0].weight, together[1].weight)


def test_learns_a_separable_problem() -> None:
    x, y = toy_problem(400, seed=0)
    test_x, test_y = toy_problem(400, seed=1)
    heads = train_linear_heads(x, y, 3, SPECS, epochs=10, batch_size=32)
    for head in heads:
        accuracy = (predict(head, test_x).argmax(1) == test_y).float().mean().item()
        assert accuracy > 0.95, head.spec


def test_normalisation_is_fitted_on_training_features() -> None:
    x, y = toy_problem(100, seed=0)
    x[:, 3] = 5.0  # a constant feature must not be divided by ~0
    (head,) = train_linear_heads(x, y, 3, [HeadSpec(lr=0.1)], epochs=1, batch_size=50)
    torch.testing.assert_close(head.norm.mean, x.mean(0))
    assert head.norm.std[3] == 1.0
    shifted = x.clone()
    shifted[:, 3] = 6.0
    assert (predict(head, shifted) - predict(head, x)).abs().max() < 1.0


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, 4, 20) == 0.25
    assert lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert 0 < lr_factor(19, 4, 20) < 0.01
    assert lr_factor(0, 0, 10) == 1.0


def test_rejects_unknown_settings() -> None:
    x, y = toy_problem(10, seed=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_linear_heads(x, y, 3, [HeadSpec(lr=0.1, optimizer="lamb")], epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="feature_norm"):
        train_linear_heads(x, y, 3, SPECS, epochs=1, batch_size=4, feature_norm="whiten")
