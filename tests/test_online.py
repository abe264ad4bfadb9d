"""The online mode: heads trained on features of augmented images, computed anew each epoch by
a backbone that stays frozen (eval mode: BatchNorm neither uses nor updates batch statistics)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import drain_shipped
from tests.test_evaluation import probe_config
from vtab import yamlio
from vtab.evaluation import online
from vtab.evaluation.backbones import build_backbone, resolve_backbone
from vtab.evaluation.data import open_split
from vtab.evaluation.features import TransformSpec, extract_features
from vtab.evaluation.probe import parse_config, run_linear_probe, run_linear_probes
from vtab.workarea import SUMMARIZED

NO_AUGMENTATION = {"random_resized_crop": False, "horizontal_flip": False}


def _predictions(folder: Path) -> list[dict[str, str]]:
    with open(folder / "val200_predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_with_augmentation_off_the_online_path_is_the_offline_one(digits_root: Path,
                                                                  tmp_path: Path) -> None:
    offline = run_linear_probe(probe_config(digits_root), cache_dir=tmp_path / "cache",
                               progress=False, outputs_dir=tmp_path / "offline")
    config = probe_config(digits_root, **{"features.mode": "online",
                                          "features.augment": NO_AUGMENTATION})
    found = run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False,
                             outputs_dir=tmp_path / "online")
    assert found["features"]["train"] == {"online": True, "forwarded": 800 * 5}
    # The same features each epoch as the cache holds, so the same head: equal up to the
    # rounding of float32 sums (measured: equal to the last bit on the CPU).
    assert found["result"] == pytest.approx(offline["result"], abs=1e-6)
    for ours, theirs in zip(_predictions(tmp_path / "online"), _predictions(tmp_path / "offline"),
                            strict=True):
        assert ours["prediction"] == theirs["prediction"]
        assert float(ours["confidence"]) == pytest.approx(float(theirs["confidence"]), abs=1e-5)


def test_each_epoch_augments_anew_repeatably_and_the_backbone_stays_frozen(
        digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(probe_config(digits_root, **{"features.mode": "online"}))
    spec = resolve_backbone(cfg.backbone)
    built = build_backbone(spec)
    stored = {name: value.clone() for name, value in built.model.state_dict().items()}
    monkeypatch.setattr(online, "build_backbone", lambda _: built)
    split = open_split(digits_root, "digits", "train800", key="data.train_split")
    features = online.epoch_features(cfg, spec, split, 32, device="cpu", num_workers=0,
                                     progress=False)
    (first,), (second,), (again,) = features(1), features(2), features(1)
    assert torch.equal(first, again)  # an epoch's augmentations are drawn from its seed
    assert not torch.allclose(first, second)  # and differ from epoch to epoch
    workers = online.epoch_features(cfg, spec, split, 32, device="cpu", num_workers=2,
                                    progress=False)
    assert torch.equal(workers(2)[0], second)  # whatever the runner's DataLoader workers
    assert not built.model.training
    assert not any(p.requires_grad for p in built.model.parameters())
    for name, value in built.model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, stored[name]), name
    unaugmented = extract_features(built.model, cfg.features.layers, online.source_of(spec),
                                   split, TransformSpec(32))["output"].float()
    assert not torch.allclose(first, unaugmented)


def test_the_backbone_is_built_and_traced_once_for_every_epoch(
        digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = [{"name": "layer3", "pool": "avg"}, {"name": "output"}]
    cfg = parse_config(probe_config(digits_root, **{"features.mode": "online",
                                                    "features.layers": layers,
                                                    "features.augment": NO_AUGMENTATION}))
    spec = resolve_backbone(cfg.backbone)
    source = online.source_of(spec)
    built, traced = [], []

    def build(spec: Any) -> Any:
        built.append(build_backbone(spec))
        return built[-1]

    def trace(model: torch.nn.Module, nodes: list[str]) -> torch.nn.Module:
        traced.append(nodes)
        return type(source).feature_extractor(source, model, nodes)

    monkeypatch.setattr(online, "build_backbone", build)
    monkeypatch.setattr(source, "feature_extractor", trace)
    split = open_split(digits_root, "digits", "train800", key="data.train_split")
    features = online.epoch_features(cfg, spec, split, 32, device="cpu", num_workers=0,
                                     progress=False)
    epochs = [features(epoch) for epoch in range(3)]
    assert len(built) == len(traced) == 1
    # Without augmentation every epoch is the offline extraction of both layers, exactly.
    offline = extract_features(built[0].model, cfg.features.layers, source, split,
                               TransformSpec(32))
    for found in epochs:
        for layer, features_of_layer in zip(cfg.features.layers, found, strict=True):
            assert torch.equal(features_of_layer, offline[layer.label()].float())


def test_online_siblings_trained_in_one_pass_equal_each_alone(digits_root: Path,
                                                             tmp_path: Path) -> None:
    configs = [probe_config(digits_root, **{"features.mode": "online", "optim.lr": lr,
                                            "optim.epochs": 3}) for lr in (0.1, 0.01)]
    together = run_linear_probes(configs, cache_dir=tmp_path / "cache", progress=False)
    for config, batched in zip(configs, together, strict=True):
        alone = run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False)
        assert batched["result"] == pytest.approx(alone["result"], abs=1e-5)
        assert batched["metrics"] == pytest.approx(alone["metrics"], abs=1e-5)


@pytest.mark.slow
def test_the_online_pipeline_runs_through_the_work_area(digits_root: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    area, code = drain_shipped(tmp_path / "work", "workflows/online_linear.yaml", digits_root,
                               monkeypatch, epochs=3)
    assert code == 0
    summary: dict[str, Any] = yamlio.load_mapping(
        area.folder(SUMMARIZED) / "online_linear" / "summary.yaml")
    assert summary["datasets"]["digits"]["result"] > 0.5  # ten classes: chance 0.1
    final = next(yamlio.load_mapping(path) for path in
                 area.summarized_jobs("online_linear").glob("*__final__seed=0.yaml"))
    assert final["run_config"]["features"]["augment"] == {
        "random_resized_crop": True, "scale": [0.5, 1.0], "ratio": [0.75, 4 / 3],
        "horizontal_flip": False}
    assert final["report"]["features"]["train"]["online"] is True


def test_an_export_is_offline(digits_root: Path) -> None:
    from vtab.errors import ConfigError
    from vtab.evaluation.schemas import ExportConfig
    from vtab.schema import validate

    with pytest.raises(ConfigError) as info:
        validate(ExportConfig, {"dataset": "digits", "data": {"root": str(digits_root)},
                                "backbone": {"name": "resnet18"},
                                "features": {"mode": "online"}})
    assert info.value.key == "features" and "images as they are" in info.value.message


def test_the_online_mode_with_a_null_augment_is_refused(digits_root: Path) -> None:
    from vtab.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(probe_config(digits_root, **{"features.mode": "online",
                                                  "features.augment": None}))
    assert info.value.key == "features.augment"
    assert "must be a mapping in the online mode" in info.value.message
