"""A probe: cached frozen-backbone features of two splits, heads trained on them, their metrics.

A job trains its head kind on each layer of ``features.layers`` (all layers from one forward
pass, all gradient heads in one training pass). Each (layer, head variant) is a *variant* of
the job's result: a job with one variant reports ``result`` and ``metrics`` as before; a job
with several reports them per variant under ``variants``, each with the config ``setting`` that
picks it (so that ``select_best`` can choose a layer or a k like any other axis).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtab.errors import Advice, ConfigError
from vtab.evaluation.backbones import (
    BackboneSpec,
    build_backbone,
    resolve_backbone,
    source_of,
    weights_advice,
)
from vtab.evaluation.curves import Curves
from vtab.evaluation.data import Split, num_classes, open_split, sibling_splits, targets
from vtab.evaluation.extract import check_layers
from vtab.evaluation.features import (
    TransformSpec,
    cache_fields,
    extract_features,
    extract_reusing,
    resolve_precision,
)
from vtab.evaluation.heads import FitSettings, Fitted, HeadInput, fit_heads_together
from vtab.evaluation.metrics import TASKS, write_per_sample_csv
from vtab.evaluation.online import epoch_features
from vtab.evaluation.schemas import GRADIENT_HEADS, LinearProbeConfig
from vtab.evaluation.store import FeatureCache, FeatureSet
from vtab.fsutil import safe_name
from vtab.schema import validate

log = logging.getLogger(__name__)


def image_size(config: LinearProbeConfig, spec: BackboneSpec) -> int:
    return config.features.image_size or spec.default_image_size


Features = dict[str, dict[str, FeatureSet]]  # role (train, eval) -> layer label -> features


def cached_features(cfg: LinearProbeConfig, spec: BackboneSpec, splits: dict[str, Split],
                    cache_dir: Path, device: str, num_workers: int,
                    progress: bool) -> tuple[Features, dict[str, dict[str, Any]]]:
    """Features of each split and layer through the cache; the backbone is built on the first
    forward only.

    A split that is not cached yet takes the rows of its images from cached sibling splits
    (train800val200 from train800 and val200), and the layers a split lacks are extracted
    together, so an image is forwarded once per protocol whatever the layers.
    """
    cache = FeatureCache(cache_dir)
    transform = TransformSpec(image_size(cfg, spec))
    precision = resolve_precision(cfg.features.precision, device)
    layers = {layer.label(): layer for layer in cfg.features.layers}
    backbone = functools.cache(functools.partial(build_backbone, spec))

    def fields(split: Split, label: str) -> dict[str, Any]:
        return cache_fields(spec.identity(), transform, split, precision, layers[label],
                            cfg.features.storage)

    def extract(names: list[str], split: Split) -> dict[str, FeatureSet]:
        built = backbone()
        found = extract_features(built.model, [layers[n] for n in names], source_of(spec),
                                 split, transform, batch_size=cfg.features.batch_size,
                                 num_workers=num_workers, device=device, precision=precision,
                                 progress=progress)
        for features in found.values():
            features.meta = {"missing_keys": built.missing_keys,
                             "unexpected_keys": built.unexpected_keys}
        return found

    def compute(split: Split, names: list[str]) -> dict[str, FeatureSet]:
        siblings = sibling_splits(split)  # rows match by image content, whatever the paths
        donors = {name: [d for d in (cache.load(cache.key(fields(s, name))) for s in siblings)
                         if d is not None] for name in names}
        return extract_reusing(split, names, donors, functools.partial(extract, names))

    features, info = {}, {}
    for role, split in splits.items():
        found, hits = cache.get_or_compute({n: fields(split, n) for n in layers},
                                           functools.partial(compute, split))
        features[role] = found
        forwarded = max((found[n].meta.get("forwarded", 0) for n in layers if not hits[n]),
                        default=0)
        info[role] = {"keys": {n: cache.key(fields(split, n)) for n in layers},
                      "cached": all(hits.values()), "forwarded": forwarded}
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
            splits[role] = open_split(root, cfg.dataset, name, key=key, task=cfg.data.task)
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigError.combine(problems)
    return splits


def _trained_classes(cfg: LinearProbeConfig, splits: dict[str, Split]) -> int:
    """How many classes the training split has examples of; top-5 among fewer than six of them
    says nothing (labels 0, 5 and 9 only make ten logits, seven of them never trained). A
    k-NN head needs at least its largest k training examples."""
    train = splits["train"]
    if cfg.head.kind == "knn" and max(cfg.head.k) > len(train.entries):
        raise ConfigError("head.k", f"{max(cfg.head.k)} neighbours asked, but "
                                    f"{cfg.dataset}'s {cfg.data.train_split} has "
                                    f"{len(train.entries)} examples")
    trained = sorted({c for label in train.labels for c in _classes_of(label)})
    if cfg.metric == "top5" and len(trained) <= 5:
        shown = ", ".join(map(str, trained))
        raise ConfigError("metric", f"top5 needs more than 5 classes with training examples; "
                                    f"{cfg.dataset}'s {cfg.data.train_split} has {len(trained)} "
                                    f"(labels {shown})")
    return len(trained)


def _classes_of(label: Any) -> tuple[int, ...]:
    return (label,) if isinstance(label, int) else tuple(label.positive)


@functools.lru_cache(maxsize=32)
def _layer_sizes(spec: BackboneSpec, layers: tuple, size: int) -> dict[str, int]:
    """Each layer's feature size, on the architecture with random weights (no download)."""
    architecture = BackboneSpec(spec.source, spec.name, "shape-check", spec.default_image_size)
    return check_layers(build_backbone(architecture).model, layers, source_of(spec), size)


def inspect(config: LinearProbeConfig) -> list[ConfigError | Advice]:
    """What would stop this job, found without running it: the backbone's name, weights and
    checkpoint, its layers and their pooling, the data folders and split files; advice when
    library weights are not cached."""
    found: list[ConfigError | Advice] = []
    try:
        spec = resolve_backbone(config.backbone)
        if spec.pretrained:
            found += weights_advice(spec)
        layers = config.features.layers
        # A module backbone runs code of its own: it is built only when the job runs.
        if spec.source != "module" and any(layer.name != "output" for layer in layers):
            _layer_sizes(spec, tuple(layers), image_size(config, spec))
    except ConfigError as exc:
        found += exc.problems
    try:
        _trained_classes(config, _open_splits(config))
    except ConfigError as exc:
        found += exc.problems
    return found


def _variants(cfg: LinearProbeConfig, fits: list[dict[str, Fitted]]) -> dict[str, tuple[
        str, Fitted, dict[str, Any]]]:
    """name -> (layer label, fitted head, the config setting that picks it) over every layer
    and head variant; names leave out what does not vary."""
    layers = cfg.features.layers
    out = {}
    for layer, by_variant in zip(layers, fits, strict=True):
        for head_variant, fitted in by_variant.items():
            parts = ([layer.label()] if len(layers) > 1 else []) + \
                    ([head_variant] if len(by_variant) > 1 else [])
            setting = ({"features.layers": [layer.model_dump(mode="json")]}
                       if len(layers) > 1 else {})
            setting.update(fitted.setting if len(by_variant) > 1 else {})
            out[" ".join(parts)] = (layer.label(), fitted, setting)
    return out


# What each head keeps for itself: sibling jobs that differ only in these share a training pass.
# The seed is shared: one pass has one initialisation and one data order, so that linear heads
# are one wide layer; siblings of other seeds run in other passes (on other runners at once).
PER_HEAD_OPTIM = ("lr", "weight_decay", "momentum")


def batch_key(config: LinearProbeConfig | Mapping[str, Any]) -> str | None:
    """Equal for configs that can train in one pass (same features, head, seed and schedule;
    any learning rate, weight decay, momentum); None for a head not trained by gradient."""
    cfg = parse_config(config)
    if cfg.head.kind not in GRADIENT_HEADS:
        return None
    shared = cfg.model_dump(mode="json")
    for key in PER_HEAD_OPTIM:
        shared["optim"].pop(key, None)
    return json.dumps(shared, sort_keys=True)


def run_linear_probe(config: LinearProbeConfig | Mapping[str, Any], *, cache_dir: Path,
                     device: str = "cpu", num_workers: int = 0, progress: bool = True,
                     outputs_dir: Path | None = None) -> dict[str, Any]:
    """Train `head.kind` on `data.train_split` features of each layer, evaluate it on
    `data.eval_split`.

    Every key is validated before any work starts. Returns plain YAML-serialisable values;
    ``result`` is the metric named by ``metric``.
    """
    (output,) = run_linear_probes([config], cache_dir=cache_dir, device=device,
                                  num_workers=num_workers, progress=progress,
                                  outputs_dirs=[outputs_dir])
    if isinstance(output, Exception):
        raise output
    return output


def run_linear_probes(configs: list[LinearProbeConfig | Mapping[str, Any]], *, cache_dir: Path,
                      device: str = "cpu", num_workers: int = 0, progress: bool = True,
                      outputs_dirs: list[Path | None] | None = None,
                      ) -> list[dict[str, Any] | Exception]:
    """`run_linear_probe` for configs with equal `batch_key`s: the features are loaded once
    and every head is trained in one pass, each exactly as it would train alone.

    For each config, its output, or the error of its own evaluation; an error of the shared
    work (features, training) is raised.
    """
    cfgs = [parse_config(config) for config in configs]
    if len(cfgs) > 1 and len({batch_key(cfg) for cfg in cfgs} - {None}) != 1:
        raise ValueError("configs trained in one pass must differ only in "
                         "optim.lr, optim.weight_decay and optim.momentum")
    cfg = cfgs[0]
    spec = resolve_backbone(cfg.backbone)
    torch.manual_seed(cfg.seed)
    splits = _open_splits(cfg)
    classes = num_classes(splits.values())
    trained_classes = _trained_classes(cfg, splits)

    start = time.perf_counter()
    online = cfg.features.mode == "online"
    # Online, the training split's features are new each epoch: never cached.
    features, cache_info = cached_features(cfg, spec, {"eval": splits["eval"]} if online
                                           else splits, cache_dir, device, num_workers,
                                           progress)
    per_epoch = epoch_features(cfg, spec, splits["train"], image_size(cfg, spec),
                               device=device, num_workers=num_workers,
                               progress=progress) if online else None
    train_x = per_epoch(1) if per_epoch else [features["train"][layer.label()].float()
                                              for layer in cfg.features.layers]
    if online:
        cache_info["train"] = {"online": True, "forwarded": len(splits["train"].entries) *
                               cfg.optim.epochs}
    features_done = time.perf_counter()
    train_targets = targets(splits["train"], classes)
    inputs = [HeadInput(x, train_targets, classes, cfg.data.task) for x in train_x]
    settings = [FitSettings(seed=c.seed, device=device, progress=progress,
                            optim=c.optim if c.head.kind in GRADIENT_HEADS else None)
                for c in cfgs]
    eval_targets = targets(splits["eval"], classes)
    curves = _curves(cfgs, features["eval"], eval_targets, classes, trained_classes) if (
        cfg.head.kind in GRADIENT_HEADS and any(outputs_dirs or [])) else None
    fits = fit_heads_together(cfg.head, inputs, settings,
                              on_epoch=curves.record if curves else None,
                              epoch_features=per_epoch)
    train_done = time.perf_counter()

    shared = {
        "num_classes": classes,  # the head's outputs: the largest label + 1, or class folders
        "classes_in_train": trained_classes,
        "num_train": len(splits["train"].entries),
        "num_eval": len(splits["eval"].entries),
        "timings": {"features_s": round(features_done - start, 3),
                    "train_s": round(train_done - features_done, 3)},
        "features": cache_info,
        "backbone": {"weights_id": spec.weights_id, **_backbone_keys(features)},
    }
    if splits["train"].class_names is not None:
        shared["class_names"] = list(splits["train"].class_names)
    evaluation = _Evaluation(splits["eval"], features["eval"], eval_targets, classes,
                             trained_classes)
    outputs: list[dict[str, Any] | Exception] = []
    for job, (one, fit, outputs_dir) in enumerate(zip(cfgs, fits,
                                                      outputs_dirs or [None] * len(cfgs),
                                                      strict=True)):
        try:
            output: dict[str, Any] | Exception = evaluation.run(one, fit, shared, outputs_dir)
        except Exception as exc:  # this job's own failure: the others keep their results
            output = exc
        if curves is not None and outputs_dir is not None and not isinstance(output, Exception):
            try:
                curves.write(job, outputs_dir, one.data.eval_split)
            except Exception as exc:  # the curves are a by-product: the result stands
                log.warning("training curves of %s not written: %s: %s", outputs_dir,
                            type(exc).__name__, exc)
        outputs.append(output)
    return outputs


def _curves(cfgs: list[LinearProbeConfig], evaluation: dict[str, FeatureSet],
            eval_targets: torch.Tensor, classes: int, trained_classes: int) -> Curves:
    """Per-epoch curves of every job of a pass, scored on its evaluation split."""
    layers = [layer.label() for layer in cfgs[0].features.layers]

    def metric(cfg: LinearProbeConfig) -> Callable[[torch.Tensor], float]:
        task = TASKS[cfg.data.task]
        return lambda scores: task.evaluate(scores.float().cpu(), eval_targets, classes,
                                            trained_classes).metrics[cfg.metric]

    return Curves([cfg.metric for cfg in cfgs], [metric(cfg) for cfg in cfgs], layers,
                  [evaluation[label].float() for label in layers], cfgs[0].optim.epochs)


@dataclass(frozen=True)
class _Evaluation:
    """The evaluation split, its features and targets: what every head is scored on."""

    split: Split
    features: dict[str, FeatureSet]  # layer label -> features
    targets: torch.Tensor
    classes: int
    trained_classes: int

    def run(self, cfg: LinearProbeConfig, fits: list[dict[str, Fitted]], shared: dict[str, Any],
            outputs_dir: Path | None) -> dict[str, Any]:
        """Score a job's fitted heads; its output (``result``, or one per variant)."""
        started = time.perf_counter()
        task = TASKS[cfg.data.task]
        results = {}
        for name, (label, fitted, setting) in _variants(cfg, fits).items():
            evaluation_x = self.features[label].float()
            scores = fitted.scores(evaluation_x)
            evaluated = task.evaluate(scores, self.targets, self.classes, self.trained_classes)
            results[name] = {"result": evaluated.metrics[cfg.metric],
                             "metrics": evaluated.metrics, "per_class": evaluated.per_class,
                             "feature_dim": int(evaluation_x.shape[1]), **_head_info(fitted)}
            if setting:
                results[name]["setting"] = setting
            if fitted.info.get("converged") is False:
                log.warning("%s head (%s) did not converge within max_iter", cfg.head.kind,
                            name or "its layer")
            if outputs_dir is not None:
                outputs_dir.mkdir(parents=True, exist_ok=True)
                fields, rows = task.per_sample(scores, self.targets, self.split.paths,
                                               fitted.output, self.split.name)
                stem = "_".join(filter(None, [cfg.data.eval_split, safe_name(name)]))
                write_per_sample_csv(outputs_dir / f"{stem}_predictions.csv", fields, rows)
        timings = {**shared["timings"], "eval_s": round(time.perf_counter() - started, 3)}
        own = {**copy.deepcopy(shared), "timings": timings}  # each job's own document
        if len(results) == 1:
            return {**next(iter(results.values())), **own}
        return {"variants": results, **own}


def _head_info(fitted: Fitted) -> dict[str, Any]:
    return {"head_info": dict(fitted.info)} if fitted.info else {}


def _backbone_keys(features: Features) -> dict[str, int]:
    meta = next(iter(features["eval"].values())).meta
    return {"missing_keys": int(meta.get("missing_keys", 0)),
            "unexpected_keys": int(meta.get("unexpected_keys", 0))}
