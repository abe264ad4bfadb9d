"""A linear probe: cached frozen-backbone features of two splits, a linear head, its metrics."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vtab.errors import Advice, ConfigError
from vtab.evaluation.backbones import (
    BackboneSpec,
    build_backbone,
    resolve_backbone,
    weights_advice,
)
from vtab.evaluation.data import Split, num_classes, open_split, sibling_splits
from vtab.evaluation.features import (
    FeatureCache,
    FeatureSet,
    TransformSpec,
    cache_fields,
    extract_features,
    extract_reusing,
    resolve_precision,
)
from vtab.evaluation.heads import HeadSpec, predict, train_linear_heads
from vtab.evaluation.metrics import (
    classification_metrics,
    per_sample_outputs,
    write_per_sample_csv,
)
from vtab.evaluation.schemas import LinearProbeConfig
from vtab.schema import validate


def head_spec(config: LinearProbeConfig) -> HeadSpec:
    """The per-head settings of a job: what a batched trainer keeps per head."""
    optim = config.optim
    return HeadSpec(lr=optim.lr, weight_decay=optim.weight_decay, seed=config.seed,
                    optimizer=optim.name, momentum=getattr(optim, "momentum", 0.0))


def image_size(config: LinearProbeConfig, spec: BackboneSpec) -> int:
    return config.features.image_size or spec.default_image_size


def _features(cfg: LinearProbeConfig, spec: BackboneSpec, splits: dict[str, Split], cache_dir: Path,
              device: str, num_workers: int,
              progress: bool) -> tuple[dict[str, FeatureSet], dict[str, dict[str, Any]]]:
    """Features of each split through the cache; the backbone is built on the first forward only.

    A split that is not cached yet takes the rows of its images from cached sibling splits
    (train800val200 from train800 and val200), so an image is forwarded once per protocol.
    """
    cache = FeatureCache(cache_dir)
    transform = TransformSpec(image_size(cfg, spec))
    precision = resolve_precision(cfg.features.precision, device)
    backbone = functools.cache(functools.partial(build_backbone, spec))

    def fields(split: Split) -> dict[str, Any]:
        return cache_fields(spec.identity(), transform, split, precision)

    def extract(split: Split) -> FeatureSet:
        built = backbone()
        found = extract_features(built.model, split, transform, batch_size=cfg.features.batch_size,
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


def parse_config(config: LinearProbeConfig | Mapping[str, Any]) -> LinearProbeConfig:
    """A validated config; a plain mapping is checked against the schema first."""
    if isinstance(config, LinearProbeConfig):
        return config
    return validate(LinearProbeConfig, config)


def complete_config(config: LinearProbeConfig, device: str) -> LinearProbeConfig:
    """`config` with the values that depend on more than it filled in: the backbone's input
    size when none is set, and the precision ``auto`` stands for on `device`."""
    features = config.features
    size = features.image_size or resolve_backbone(config.backbone).default_image_size
    return config.model_copy(update={"features": features.model_copy(update={
        "image_size": size, "precision": resolve_precision(features.precision, device)})})


def _open_splits(cfg: LinearProbeConfig) -> dict[str, Split]:
    """The training and evaluation splits; the problems of both at once."""
    root = Path(cfg.data.root).expanduser()
    splits, problems = {}, []
    for role, key, name in (("train", "data.train_split", cfg.data.train_split),
                            ("eval", "data.eval_split", cfg.data.eval_split)):
        try:
            splits[role] = open_split(root, cfg.dataset, name, key=key)
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigError.combine(problems)
    return splits


def _trained_classes(cfg: LinearProbeConfig, splits: dict[str, Split]) -> int:
    """How many classes the training split has examples of; top-5 among fewer than six of them
    says nothing (labels 0, 5 and 9 only make ten logits, seven of them never trained)."""
    trained = sorted(set(splits["train"].labels))
    if cfg.metric == "top5" and len(trained) <= 5:
        shown = ", ".join(map(str, trained))
        raise ConfigError("metric", f"top5 needs more than 5 classes with training examples; "
                                    f"{cfg.dataset}'s {cfg.data.train_split} has {len(trained)} "
                                    f"(labels {shown})")
    return len(trained)


def inspect(config: LinearProbeConfig) -> list[ConfigError | Advice]:
    """What would stop this job, found without running it: the backbone's name, weights and
    checkpoint, the data folders and split files; advice when library weights are not cached."""
    found: list[ConfigError | Advice] = []
    try:
        spec = resolve_backbone(config.backbone)
        if spec.pretrained:
            found += weights_advice(spec)
    except ConfigError as exc:
        found += exc.problems
    try:
        _trained_classes(config, _open_splits(config))
    except ConfigError as exc:
        found += exc.problems
    return found


def run_linear_probe(config: LinearProbeConfig | Mapping[str, Any], *, cache_dir: Path,
                     device: str = "cpu", num_workers: int = 0, progress: bool = True,
                     outputs_dir: Path | None = None) -> dict[str, Any]:
    """Train a linear head on `data.train_split` features, evaluate it on `data.eval_split`.

    Every key is validated before any work starts. Returns plain YAML-serialisable values;
    ``result`` is the metric named by ``metric``.
    """
    cfg = parse_config(config)
    spec = resolve_backbone(cfg.backbone)
    head = head_spec(cfg)
    torch.manual_seed(head.seed)
    splits = _open_splits(cfg)
    classes = num_classes(splits.values())
    trained_classes = _trained_classes(cfg, splits)

    start = time.perf_counter()
    features, cache_info = _features(cfg, spec, splits, cache_dir, device, num_workers, progress)
    features_done = time.perf_counter()
    train, evaluation = features["train"], features["eval"]
    (trained,) = train_linear_heads(
        train.features, train.labels, classes, [head], epochs=cfg.optim.epochs,
        batch_size=cfg.optim.batch_size, warmup_epochs=cfg.optim.warmup_epochs,
        feature_norm=cfg.head.feature_norm, device=device, progress=progress)
    train_done = time.perf_counter()
    logits = predict(trained, evaluation.features)
    metrics = classification_metrics(logits, evaluation.labels, classes,
                                     top5=trained_classes > 5)
    if outputs_dir is not None:
        outputs_dir.mkdir(parents=True, exist_ok=True)
        rows = per_sample_outputs(logits, evaluation.labels, evaluation.paths)
        write_per_sample_csv(outputs_dir / f"{cfg.data.eval_split}_predictions.csv", rows)
    end = time.perf_counter()
    return {
        "result": metrics[cfg.metric],
        "metrics": metrics,
        "num_classes": classes,  # the largest label + 1: the head's outputs
        "classes_in_train": trained_classes,
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
