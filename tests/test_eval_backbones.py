"""Backbone registry: sources, deterministic random weights, checkpoints, classifier removal."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from vtab.errors import ConfigError
from vtab.evaluation.backbones import create_backbone, resolve_backbone
from vtab.evaluation.schemas import BackboneConfig
from vtab.schema import validate


def section(name: Any, weights: str = "none", source: str = "torchvision") -> dict[str, Any]:
    return {"name": name, "weights": weights, "source": source}


def backbone_config(name: str, weights: str = "none",
                    source: str = "torchvision") -> BackboneConfig:
    return validate(BackboneConfig, section(name, weights, source), prefix="backbone")


def test_random_weights_are_deterministic_and_frozen() -> None:
    torch.manual_seed(1)
    first = create_backbone(backbone_config("resnet18"))
    torch.manual_seed(2)  # the caller's RNG state must not matter, and is left alone
    state = torch.random.get_rng_state()
    second = create_backbone(backbone_config("resnet18"))
    assert torch.equal(torch.random.get_rng_state(), state)
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    assert (first.feature_dim, first.weights_id, first.default_image_size) == (
        512, "random-seed0", 224)
    assert not first.model.training
    assert not any(p.requires_grad for p in first.model.parameters())
    assert first.model(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_vit_returns_the_cls_token() -> None:
    backbone = create_backbone(backbone_config("vit_b_32"))
    model = backbone.model
    images = torch.randn(2, 3, 224, 224)
    tokens = model._process_input(images)
    tokens = torch.cat([model.class_token.expand(2, -1, -1), tokens], dim=1)
    expected = model.encoder(tokens)[:, 0]  # the encoder ends with the final LayerNorm
    assert backbone.feature_dim == 768
    torch.testing.assert_close(model(images), expected)


def save_resnet18(path: Path, seed: int, wrap: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(num_classes=7).state_dict()  # classifier keys included
    torch.save(wrap({f"module.{k}": v for k, v in state.items()}), path)
    return state


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    saved = save_resnet18(path, seed=5, wrap=lambda state: {"state_dict": state, "epoch": 3})
    backbone = create_backbone(backbone_config("resnet18", str(path)))
    loaded = backbone.model.state_dict()
    assert torch.equal(loaded["conv1.weight"], saved["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], saved["layer4.1.bn2.running_var"])
    assert (backbone.missing_keys, backbone.unexpected_keys) == (0, 0)  # fc.* ignored
    assert backbone.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_with_no_matching_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="no parameter of") as caught:
        create_backbone(backbone_config("resnet18", str(path)))
    assert caught.value.key == "backbone.weights"


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_garbage_checkpoint_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        create_backbone(backbone_config("resnet18", str(path)))
    assert caught.value.key == "backbone.weights"
    assert str(path) in str(caught.value)


def test_missing_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        resolve_backbone(backbone_config("resnet18", str(tmp_path / "nope.pt")))
    assert caught.value.key == "backbone.weights"


@pytest.mark.parametrize("weights", ["IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "DEFAULT"])
def test_torchvision_weights_names_resolve_without_download(weights: str) -> None:
    spec = resolve_backbone(backbone_config("resnet50", weights))
    assert spec.weights_id == "ResNet50_Weights.IMAGENET1K_V2"
    assert spec.pretrained and spec.default_image_size == 224


@pytest.mark.parametrize(("config", "key", "hint"), [
    (section("resnet181"), "backbone.name", "resnet18"),
    (section("resnet50", "IMAGENET9K"), "backbone.weights", "IMAGENET1K_V1"),
    (section("resnet18", source="hub"), "backbone.source", "torchvision"),
    (section("no_colon", source="module"), "backbone.name", "package.module:function"),
    ({"name": 18}, "backbone.name", "expected a string"),
    ({"name": "resnet18", "weigths": "none"}, "backbone.weigths", "did you mean 'weights'"),
])
def test_bad_backbone_config(config: dict, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_backbone(validate(BackboneConfig, config, prefix="backbone"))
    assert caught.value.key == key
    assert hint in str(caught.value)


def test_module_source() -> None:
    resnet = create_backbone(backbone_config("torchvision.models:resnet18", source="module"))
    assert resnet.feature_dim == 512
    # No classifier to find: the size is measured with a forward pass.
    flat = create_backbone(backbone_config("torch.nn:Flatten", source="module"))
    assert flat.feature_dim == 3 * 224 * 224


class TinyTimmModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 10)

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(6, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stem(x)).flatten(1))


def test_timm_source_with_a_stand_in_library(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[bool] = []

    def create_model(name: str, pretrained: bool) -> nn.Module:
        created.append(pretrained)
        return TinyTimmModel()

    cfg = types.SimpleNamespace(input_size=(3, 96, 96))
    fake = types.SimpleNamespace(
        __version__="9.9", is_model=lambda name: name == "tiny", list_models=lambda: ["tiny"],
        create_model=create_model,
        models=types.SimpleNamespace(get_pretrained_cfg=lambda name: cfg))
    monkeypatch.setitem(sys.modules, "timm", fake)

    backbone = create_backbone(backbone_config("tiny", "pretrained", source="timm"))
    assert created == [True]
    assert (backbone.feature_dim, backbone.default_image_size) == (6, 96)
    assert backbone.weights_id == "timm:tiny@9.9"
    with pytest.raises(ConfigError, match="tiny"):
        resolve_backbone(backbone_config("tinyy", source="timm"))


def test_timm_source_without_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match="timm is not installed") as caught:
        resolve_backbone(backbone_config("vit_small_patch16_224", source="timm"))
    assert caught.value.key == "backbone.source"
