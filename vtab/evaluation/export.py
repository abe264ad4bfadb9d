"""Exported embeddings: the features of a dataset's splits written for tools of one's own.

Features come from the feature store (computed where missing, through the same cache and with
the same rows shared between splits as jobs use), then are written to a folder as:

- ``<split>.npy`` (``<split>.<layer>.npy`` when several layers are asked for): float32
  ``[images, dim]``, in the order of the split file;
- ``manifest.csv``: ``image,split,target,file,row,layer``, one line per row of every file;
- ``export.json``: the config that ran, the shapes, and each file's store key.

See docs/FEATURES.md ("Exported embeddings").
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vtab.errors import ConfigError
from vtab.evaluation.backbones import resolve_backbone
from vtab.evaluation.data import Split, label_text, open_split
from vtab.evaluation.probe import cached_features
from vtab.evaluation.schemas import ExportConfig
from vtab.fsutil import atomic_write, safe_name
from vtab.schema import validate

MANIFEST_FIELDS = ("image", "split", "target", "file", "row", "layer")


def export_features(config: ExportConfig | Mapping[str, Any], out: Path, *, cache_dir: Path,
                    device: str = "cpu", num_workers: int = 0,
                    progress: bool = True) -> list[Path]:
    """Write the features of `config`'s splits and layers under `out`; the files written."""
    cfg = config if isinstance(config, ExportConfig) else validate(ExportConfig, config)
    spec = resolve_backbone(cfg.backbone)
    splits = _open_splits(cfg)
    features, info = cached_features(cfg, spec, splits, cache_dir, device, num_workers, progress)
    labels = [layer.label() for layer in cfg.features.layers]
    out.mkdir(parents=True, exist_ok=True)
    written, lines, shapes = [], [], {}
    for name, split in splits.items():
        targets = [label_text(label) for label in split.labels]
        for label in labels:
            file = f"{name}.npy" if len(labels) == 1 else f"{name}.{safe_name(label)}.npy"
            rows = features[name][label].float().numpy()
            buffer = io.BytesIO()
            np.save(buffer, rows, allow_pickle=False)
            atomic_write(out / file, buffer.getvalue())
            written.append(out / file)
            shapes[file] = list(rows.shape)
            lines += [(image, name, target, file, row, label)
                      for row, (image, target) in enumerate(zip(split.paths, targets,
                                                                strict=True))]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    writer.writerows(lines)
    atomic_write(out / "manifest.csv", text.getvalue())
    description = {"config": cfg.model_dump(mode="json"), "weights_id": spec.weights_id,
                   "shapes": shapes, "store_keys": {name: info[name]["keys"] for name in splits}}
    atomic_write(out / "export.json", json.dumps(description, indent=1, sort_keys=True))
    return [*written, out / "manifest.csv", out / "export.json"]


def _open_splits(cfg: ExportConfig) -> dict[str, Split]:
    root = Path(cfg.data.root).expanduser()
    splits, problems = {}, []
    for index, name in enumerate(dict.fromkeys(cfg.data.splits)):
        try:
            splits[name] = open_split(root, cfg.dataset, name, key=f"data.splits[{index}]",
                                      task=cfg.data.task)
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigError.combine(problems)
    return splits

