"""A linear probe: cached frozen-backbone features of two splits, a linear head, its metrics."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtab.config import choice, integer, number, typed
from vtab.errors import ConfigError
from vtab.evaluation.backbones import BackboneSpec, build_backbone, resolve_backbone
from vtab.evaluation.data import Split, num_classes, open_split, sibling_splits
from vtab.evaluation.features import (
    PRECISIONS,
    FeatureCache,
    FeatureSet,
    TransformSpec,
    cache_fields,
    extract_features,
    extract_reusing,
    resolve_precision,
)
from vtab.evaluation.heads import FEATURE_NORMS, OPTIMIZERS, HeadSpec, predict, train_linear_heads
from vtab.evaluation.metrics import (
    METRICS,
    classification_metrics,
    per_sample_outputs,
    write_per_sample_csv,
)


@dataclass(frozen=True)
class ProbeConfig:
    """The validated keys of a linear-probe job (the ``backbone.*`` ones are in BackboneSpec)."""

    dataset: str
    root: Path
    train_split: str
    eval_split: str
    image_size: int
    feature_batch_size: int
    precision: str
    feature_norm: str
    head: HeadSpec
    epochs: int
    batch_size: int
    warmup_epochs: int
    metric: str

    @classmethod
    def read(cls, config: Mapping[str, Any], default_image_size: int) -> ProbeConfig:
        choice(config, "head.kind", ("linear",), "linear")  # the only kind so far; catch typos
        epochs = integer(config, "optim.epochs", minimum=1)
        warmup_epochs = integer(config, "optim.warmup_epochs", 0, minimum=0)
        if warmup_epochs > epochs:
            raise ConfigError("optim.warmup_epochs", f"must not exceed optim.epochs ({epochs})")
        head = HeadSpec(lr=number(config, "optim.lr", positive=True),
                        weight_decay=number(config, "optim.weight_decay", 0.0, minimum=0.0),
                        seed=integer(config, "seed", 0),
                        optimizer=choice(config, "optim.name", OPTIMIZERS, "sgd"),
                        momentum=number(config, "optim.momentum", 0.9, minimum=0.0))
        return cls(
            dataset=typed(config, "dataset", str),
            root=Path(typed(config, "data.root", str)).expanduser(),
            train_split=typed(config, "data.train_split", str, "train800"),
            eval_split=typed(config, "data.eval_split", str, "val200"),
            image_size=integer(config, "features.image_size", default_image_size, minimum=1),
            feature_batch_size=integer(config, "features.batch_size", 64, minimum=1),
            precision=choice(config, "features.precision", PRECISIONS, "auto"),
            feature_norm=choice(config, "head.feature_norm", FEATURE_NORMS, "standardize"),
            head=head, epochs=epochs, warmup_epochs=warmup_epochs,
            batch_size=integer(config, "optim.batch_size", 128, minimum=1),
            metric=choice(config, "metric", METRICS, "top1"),
        )


def _features(cfg: ProbeConfig, spec: BackboneSpec, splits: dict[str, Split], cache_dir: Path,
              device: str, num_workers: int,
              progress: bool) -> tuple[dict[str, FeatureSet], dict[str, dict[str, Any]]]:
    """Features of each split through the cache; the backbone is built on the first forward only.

    A split that is not cached yet takes the rows of its images from cached sibling splits
    (train800val200 from train800 and val200), so an image is forwarded once per protocol.
    """
    cache = FeatureCache(cache_dir)
    transform = TransformSpec(cfg.image_size)
    precision = resolve_precision(cfg.precision, device)
    backbone = functools.cache(functools.partial(build_backbone, spec))

    def fields(split: Split) -> dict[str, Any]:
        return cache_fields(spec.identity(), transform, split, precision)

    def extract(split: Split) -> FeatureSet:
        built = backbone()
        found = extract_features(built.model, split, transform, batch_size=cfg.feature_batch_size,
                                 num_workers=num_workers, device=device, precision=precision,
                                 progress=progress)
        found.meta = {"missing_keys": built.missing_keys, "unexpected_keys": built.unexpected_keys}
        return found

    def compute(split: Split) -> FeatureSet:
        wanted = set(split.paths)
        donors = [cache.load(cache.key(fields(sibling))) for sibling in sibling_splits(split)
                  if wanted.intersection(sibling.paths)]
        return extract_reusing(split, [donor for donor in donors if donor is not None], extract)

    features, info = {}, {}
    for role, split in splits.items():
        features[role], hit = cache.get_or_compute(fields(split), functools.partial(compute, split))
        info[role] = {"key": cache.key(fields(split)), "cached": hit,
                      "forwarded": 0 if hit else features[role].meta["forwarded"]}
    return features, info


def check_config(config: Mapping[str, Any]) -> tuple[BackboneSpec, ProbeConfig]:
    """Validate every key of a linear-probe config without touching data or building a model."""
    spec = resolve_backbone(config)
    return spec, ProbeConfig.read(config, spec.default_image_size)


def run_linear_probe(config: Mapping[str, Any], *, cache_dir: Path, device: str = "cpu",
                     num_workers: int = 0, progress: bool = True,
                     outputs_dir: Path | None = None) -> dict[str, Any]:
    """Train a linear head on `data.train_split` features, evaluate it on `data.eval_split`.

    Every key is validated before any work starts. Returns plain YAML-serialisable values;
    ``result`` is the metric named by ``metric``.
    """
    spec, cfg = check_config(config)
    torch.manual_seed(cfg.head.seed)
    splits = {"train": open_split(cfg.root, cfg.dataset, cfg.train_split, key="data.train_split"),
              "eval": open_split(cfg.root, cfg.dataset, cfg.eval_split, key="data.eval_split")}
    classes = num_classes(splits.values())
    if cfg.metric == "top5" and classes <= 5:
        raise ConfigError("metric", f"top5 needs more than 5 classes; {cfg.dataset} has {classes}")

    start = time.perf_counter()
    features, cache_info = _features(cfg, spec, splits, cache_dir, device, num_workers, progress)
    features_done = time.perf_counter()
    train, evaluation = features["train"], features["eval"]
    (head,) = train_linear_heads(train.features, train.labels, classes, [cfg.head],
                                 epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 warmup_epochs=cfg.warmup_epochs, feature_norm=cfg.feature_norm,
                                 device=device, progress=progress)
    train_done = time.perf_counter()
    logits = predict(head, evaluation.features)
    metrics = classification_metrics(logits, evaluation.labels, classes)
    if outputs_dir is not None:
        outputs_dir.mkdir(parents=True, exist_ok=True)
        rows = per_sample_outputs(logits, evaluation.labels, evaluation.paths)
        write_per_sample_csv(outputs_dir / f"{cfg.eval_split}_predictions.csv", rows)
    end = time.perf_counter()
    return {
        "result": metrics[cfg.metric],
        "metrics": metrics,
        "num_classes": classes,
        "feature_dim": int(train.features.shape[1]),
        "num_train": len(train.paths),
        "num_eval": len(evaluation.paths),
        "timings": {"features_s": round(features_done - start, 3),
                    "train_s": round(train_done - features_done, 3),
                    "eval_s": round(end - train_done, 3)},
        "features": cache_info,
        "backbone": {"weights_id": spec.weights_id,
                     "missing_keys": int(train.meta.get("missing_keys", 0)),
                     "unexpected_keys": int(train.meta.get("unexpected_keys", 0))},
    }
