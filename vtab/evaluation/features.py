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
from collections.abc import Callable, Iterable, Mapping
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
from vtab.evaluation.data import ImageSplit, Split
from vtab.fsutil import atomic_write

# Bump when the payload layout or the extraction changes in a way the key fields do not show.
FORMAT_VERSION = 1
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
    features: torch.Tensor  # float32 [N, D], on the CPU
    labels: torch.Tensor  # int64 [N]
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # plain values kept in the manifest


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def cache_fields(backbone: Mapping[str, str], transform: TransformSpec, split: Split,
                 precision: str) -> dict[str, Any]:
    """Everything that determines a split's features (`precision` already resolved)."""
    return {
        "backbone": dict(backbone),
        "feature": "pooled",
        "transform": transform.describe(),
        "data": {"dataset": split.dataset, "split": split.name, "split_sha256": split.sha256},
        "dtype": precision,
    }


def extract_features(model: nn.Module, split: Split, transform: TransformSpec, *,
                     batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                     precision: str = "auto", progress: bool = False) -> FeatureSet:
    """Features of every image of `split`, in file order, as float32 on the CPU."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.preserve_format
    model = model.to(dev, memory_format=memory_format)
    loader = DataLoader(ImageSplit(split, transform.build()), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=cuda)
    bf16 = resolve_precision(precision, device) == "bf16"
    chunks, indices = [], []
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        for images, _, index in tqdm(loader, desc=f"{split.dataset}/{split.name}",
                                     disable=not progress, leave=False):
            images = images.to(dev, non_blocking=True, memory_format=memory_format)
            chunks.append(model(images).float().cpu())
            indices.append(index)
    stacked = torch.cat(chunks)
    features = torch.empty_like(stacked)
    features[torch.cat(indices)] = stacked
    return FeatureSet(features, torch.tensor(split.labels, dtype=torch.int64), split.paths)


def extract_reusing(split: Split, donors: Iterable[FeatureSet],
                    extract: Callable[[Split], FeatureSet]) -> FeatureSet:
    """Features of `split`, copying the rows of images that `donors` already hold.

    Donors must come from the same backbone, transform and precision (other splits of the same
    dataset, say train800 and val200 for train800val200), so that each image goes through the
    backbone once for the whole protocol. Only the other images are passed to `extract`.
    ``meta`` counts the images ``forwarded`` and ``reused``.
    """
    known: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for donor in donors:
        meta = meta or dict(donor.meta)
        for path, row in zip(donor.paths, donor.features, strict=True):
            known.setdefault(path, row)
    missing = [index for index, path in enumerate(split.paths) if path not in known]
    if len(missing) == len(split.entries):
        result = extract(split)
    else:
        rows = [known.get(path) for path in split.paths]
        if missing:
            computed = extract(split.subset(missing))
            meta = dict(computed.meta)
            for row, index in zip(computed.features, missing, strict=True):
                rows[index] = row
        result = FeatureSet(torch.stack(rows), torch.tensor(split.labels, dtype=torch.int64),
                            split.paths, meta)
    result.meta.update(forwarded=len(missing), reused=len(split.entries) - len(missing))
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
            return FeatureSet(data["features"], data["labels"], data["paths"],
                              manifest.get("meta", {}))
        except Exception as exc:  # a damaged entry is recomputed, whatever the damage
            self._discard(key, f"unreadable payload ({type(exc).__name__}: {exc})")
            return None

    def store(self, key: str, fields: Mapping[str, Any], features: FeatureSet) -> None:
        """Write payload then manifest, each atomically: readers see a whole entry or none."""
        buffer = io.BytesIO()
        torch.save({"features": features.features, "labels": features.labels,
                    "paths": features.paths}, buffer)
        payload = buffer.getvalue()
        self._folder(key)
        atomic_write(self._path(key, ".pt"), payload)
        manifest = {"key": key, "format": FORMAT_VERSION, "fields": dict(fields),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "shape": list(features.features.shape), "meta": features.meta,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": socket.gethostname()}
        atomic_write(self._path(key, ".json"), json.dumps(manifest, indent=1, sort_keys=True))

    def get_or_compute(self, fields: Mapping[str, Any],
                       compute: Callable[[], FeatureSet]) -> tuple[FeatureSet, bool]:
        """The cached features for `fields`, else compute() stored; also whether it was a hit.

        The lock only avoids duplicate work. Correctness never depends on it (over NFS it may
        not exclude): files are replaced atomically, a payload that does not match its manifest
        is discarded and recomputed, and two extractions of one key produce the same features,
        so a duplicate extraction is only wasted time. Hence a waiter whose lock holder shows no
        sign of life for `patience` seconds computes without it rather than hang.
        """
        key = self.key(fields)
        found = self.load(key)
        if found is not None:
            return found, True
        lock = filelock.FileLock(self._path(key, ".lock"))
        self._folder(key)
        if not self._wait_for(lock, key):
            return self._compute_once(key, fields, compute)
        try:
            with _SignOfLife(self._path(key, ".alive"), self.patience / 6):
                return self._compute_once(key, fields, compute)
        finally:
            lock.release()

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

    def _compute_once(self, key: str, fields: Mapping[str, Any],
                      compute: Callable[[], FeatureSet]) -> tuple[FeatureSet, bool]:
        found = self.load(key)  # another process may have finished while we waited
        if found is not None:
            return found, True
        features = compute()
        self.store(key, fields, features)
        return features, False
