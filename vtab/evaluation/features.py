"""Feature extraction and a content-keyed feature cache shared by all jobs and runners.

A cache entry is ``<root>/<key[:2]>/<key>.pt`` (features, labels, image paths) and
``<key>.json``, a manifest written after the payload: an entry exists once its manifest does.
The key hashes everything that determines the features, so entries are never invalidated, only
added; a changed split file or checkpoint simply gets a new key. A split whose images other
cached splits already hold is assembled from their rows (`extract_reusing`): the same numbers
on the CPU in fp32; with bf16 on a GPU, rows computed in other batches can differ in the last
bits from a fresh extraction, as any two extractions with different batching do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from vtab.errors import DataError
from vtab.evaluation.backbones import Source
from vtab.evaluation.data import ImageSplit, Split
from vtab.evaluation.extract import LayerExtractor
from vtab.evaluation.schemas import OUTPUT, LayerConfig
from vtab.fsutil import atomic_write

# Bump when the payload layout or the extraction changes in a way the key fields do not show.
FORMAT_VERSION = 2  # 2: one entry per layer, no labels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransformSpec:
    """Squash-resize to image_size x image_size (no crop: VTAB images keep their full content)."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def describe(self) -> dict[str, Any]:
        return {"resize": "squash-bilinear", "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}

    def build(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.Resize((self.image_size, self.image_size)),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


@dataclass
class FeatureSet:
    """One layer's features of a split's images (labels come from the split file: the same
    image can carry other labels in another split or task)."""

    features: torch.Tensor  # float32 [N, D], on the CPU
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # plain values kept in the manifest


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def cache_fields(backbone: Mapping[str, str], transform: TransformSpec, split: Split,
                 precision: str, layer: LayerConfig) -> dict[str, Any]:
    """Everything that determines a split's features of one layer (`precision` resolved)."""
    return {
        "backbone": dict(backbone),
        "feature": "pooled" if layer.name == OUTPUT else layer.model_dump(mode="json"),
        "transform": transform.describe(),
        "data": {"dataset": split.dataset, "split": split.name, "split_sha256": split.sha256},
        "dtype": precision,
    }


def extract_features(model: nn.Module, layers: Sequence[LayerConfig], source: Source,
                     split: Split, transform: TransformSpec, *, batch_size: int = 64,
                     num_workers: int = 0, device: str = "cpu", precision: str = "auto",
                     progress: bool = False) -> dict[str, FeatureSet]:
    """Every layer's features of every image of `split`, in file order, as float32 on the CPU,
    from one forward pass per batch; by layer label."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.preserve_format
    model = model.to(dev, memory_format=memory_format)
    extractor = LayerExtractor(model, layers, source)
    loader = DataLoader(ImageSplit(split, transform.build()), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=cuda)
    bf16 = resolve_precision(precision, device) == "bf16"
    chunks: dict[str, list[torch.Tensor]] = {layer.label(): [] for layer in layers}
    indices = []
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        for images, _, index in tqdm(loader, desc=f"{split.dataset}/{split.name}",
                                     disable=not progress, leave=False):
            images = images.to(dev, non_blocking=True, memory_format=memory_format)
            for label, found in extractor(images).items():
                chunks[label].append(found.float().cpu())
            indices.append(index)
    order = torch.cat(indices)
    result = {}
    for label, parts in chunks.items():
        stacked = torch.cat(parts)
        features = torch.empty_like(stacked)
        features[order] = stacked
        result[label] = FeatureSet(features, split.paths)
    return result


def extract_reusing(split: Split, labels: Sequence[str],
                    donors: Mapping[str, Iterable[FeatureSet]],
                    extract: Callable[[Split], dict[str, FeatureSet]]) -> dict[str, FeatureSet]:
    """Features of `split` for each layer label, copying the rows of images that `donors` (by
    label) already hold.

    Donors must come from the same backbone, transform and precision (other splits of the same
    dataset, say train800 and val200 for train800val200), so that each image goes through the
    backbone once for the whole protocol. Only images some layer lacks are passed to
    `extract`, once for all layers. ``meta`` counts the images ``forwarded`` and ``reused``.
    """
    known: dict[str, dict[str, torch.Tensor]] = {label: {} for label in labels}
    meta: dict[str, Any] = {}
    for label in labels:
        for donor in donors.get(label, ()):
            meta = meta or dict(donor.meta)
            for path, row in zip(donor.paths, donor.features, strict=True):
                known[label].setdefault(path, row)
    missing = [index for index, path in enumerate(split.paths)
               if any(path not in known[label] for label in labels)]
    if len(missing) == len(split.entries):
        result = extract(split)
    else:
        computed = extract(split.subset(missing)) if missing else {}
        result = {}
        for label in labels:
            rows = [known[label].get(path) for path in split.paths]
            if missing:
                meta = dict(computed[label].meta)
                for row, index in zip(computed[label].features, missing, strict=True):
                    rows[index] = row
            result[label] = FeatureSet(torch.stack(rows), split.paths, dict(meta))
    for found in result.values():
        found.meta.update(forwarded=len(missing), reused=len(split.entries) - len(missing))
    return result


def _read_plain(path: Path) -> bytes:
    """A plain file's bytes: not through a link, and never waiting on a FIFO planted there."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a plain file")
        return handle.read()


def _stamp_of(path: Path) -> tuple[int, int] | None:
    """The sign of life's stamp, through an open file (NFS revalidates it then, as for leases)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        found = os.fstat(fd)
    finally:
        os.close(fd)
    return found.st_mtime_ns, found.st_size


def _holder(alive: Path) -> str:
    try:
        return _read_plain(alive)[:200].decode("utf-8", "replace").strip() or "another process"
    except OSError:
        return "another process"


class _SignOfLife:
    """While a lock is held: a file touched every `interval` seconds, naming the holder, so that
    waiters can tell a slow computation from a process that stopped."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cache-lock", daemon=True)

    def __enter__(self) -> _SignOfLife:
        atomic_write(self.path, f"{socket.gethostname()} pid {os.getpid()}\n", durable=False)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.path.unlink()


class FeatureCache:
    """Features stored under `root`, keyed by the sha256 of their canonical description."""

    def __init__(self, root: Path, *, patience: float = 60.0) -> None:
        self.root = Path(root)
        self.patience = patience  # seconds a lock holder may show no sign of life

    @staticmethod
    def key(fields: Mapping[str, Any]) -> str:
        canonical = json.dumps({**fields, "format": FORMAT_VERSION}, sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _folder(self, key: str) -> Path:
        """The entry's folder, made where missing; never a link (it could lead anywhere)."""
        folder = self.root / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():
            raise DataError(f"feature cache folder {folder} is a symbolic link; remove it")
        return folder

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def _discard(self, key: str, reason: str) -> None:
        log.warning("feature cache: discarding %s: %s", self._path(key, ".pt"), reason)
        for suffix in (".json", ".pt"):  # manifest first: no moment shows a manifest alone
            with contextlib.suppress(FileNotFoundError):
                self._path(key, suffix).unlink()

    def load(self, key: str) -> FeatureSet | None:
        """The entry, or None when it is absent or fails verification (then it is deleted)."""
        try:
            manifest = json.loads(_read_plain(self._path(key, ".json")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._discard(key, f"unreadable manifest ({exc})")
            return None
        try:
            payload = _read_plain(self._path(key, ".pt"))
            if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
                self._discard(key, "sha256 does not match the manifest")
                return None
            data = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            return FeatureSet(data["features"], data["paths"], manifest.get("meta", {}))
        except Exception as exc:  # a damaged entry is recomputed, whatever the damage
            self._discard(key, f"unreadable payload ({type(exc).__name__}: {exc})")
            return None

    def store(self, key: str, fields: Mapping[str, Any], features: FeatureSet) -> None:
        """Write payload then manifest, each atomically: readers see a whole entry or none."""
        buffer = io.BytesIO()
        torch.save({"features": features.features, "paths": features.paths}, buffer)
        payload = buffer.getvalue()
        self._folder(key)
        atomic_write(self._path(key, ".pt"), payload)
        manifest = {"key": key, "format": FORMAT_VERSION, "fields": dict(fields),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "shape": list(features.features.shape), "meta": features.meta,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": socket.gethostname()}
        atomic_write(self._path(key, ".json"), json.dumps(manifest, indent=1, sort_keys=True))

    def get_or_compute(self, fields: Mapping[str, Mapping[str, Any]],
                       compute: Callable[[list[str]], dict[str, FeatureSet]]) -> tuple[
                           dict[str, FeatureSet], dict[str, bool]]:
        """The cached features of each entry of `fields` (by name), computing those not cached
        with one call of compute(names) and storing them; also whether each was a hit.

        The lock (one per set of missing entries) only avoids duplicate work. Correctness
        never depends on it (over NFS it may not exclude): files are replaced atomically, a
        payload that does not match its manifest is discarded and recomputed, and two
        extractions of one key produce the same features, so a duplicate extraction is only
        wasted time. Hence a waiter whose lock holder shows no sign of life for `patience`
        seconds computes without it rather than hang.
        """
        keys = {name: self.key(f) for name, f in fields.items()}
        found = {name: self.load(key) for name, key in keys.items()}
        missing = sorted(name for name, features in found.items() if features is None)
        if not missing:
            return found, dict.fromkeys(found, True)
        bundle = (keys[missing[0]] if len(missing) == 1
                  else self.key({"entries": sorted(keys[name] for name in missing)}))
        lock = filelock.FileLock(self._path(bundle, ".lock"))
        self._folder(bundle)
        held = self._wait_for(lock, bundle)
        try:
            with _SignOfLife(self._path(bundle, ".alive"), self.patience / 6) if held \
                    else contextlib.nullcontext():
                loaded, computed = self._compute_once(keys, fields, missing, compute)
        finally:
            if held:
                lock.release()
        return {**found, **loaded}, {name: name not in computed for name in fields}

    def _wait_for(self, lock: filelock.FileLock, key: str) -> bool:
        """Take the lock; False if its holder showed no sign of life for `patience` seconds (a
        process stopped while it held it: SIGSTOP, a hung mount) and the caller should compute
        without it. Judged on this process's clock, like a lease."""
        alive = self._path(key, ".alive")
        seen, since, said = None, time.monotonic(), False
        while True:
            try:
                lock.acquire(timeout=min(1.0, self.patience))
                return True
            except filelock.Timeout:
                pass
            stamp = _stamp_of(alive)
            if stamp != seen:
                seen, since = stamp, time.monotonic()
            if not said:
                log.info("feature cache: waiting for %s, who computes %s", _holder(alive), key)
                said = True
            if time.monotonic() - since >= self.patience:
                log.warning("feature cache: %s showed no sign of life for %.0f s (stopped?); "
                            "computing %s without waiting for it", _holder(alive),
                            self.patience, key)
                return False

    def _compute_once(self, keys: Mapping[str, str], fields: Mapping[str, Mapping[str, Any]],
                      missing: list[str], compute: Callable[[list[str]], dict[str, FeatureSet]]
                      ) -> tuple[dict[str, FeatureSet], set[str]]:
        """The entries of `missing`, and the names of those computed (and stored) here: an
        entry another process stored while we waited is loaded instead."""
        loaded = {name: self.load(keys[name]) for name in missing}
        absent = [name for name, features in loaded.items() if features is None]
        computed = compute(absent) if absent else {}
        for name in absent:
            self.store(keys[name], fields[name], computed[name])
            loaded[name] = computed[name]
        return loaded, set(absent)
