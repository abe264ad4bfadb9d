"""The feature store: rows of features keyed by what determines them, loaded memory-mapped.

An entry is one layer's features of one split, under ``<root>/<key[:2]>/``:

- ``<key>.npy``: the rows, [images, dim], float32 or float16 (``features.storage``): a NumPy
  array file, loaded memory-mapped (``numpy.load(path, mmap_mode="r")``), never unpickled;
- ``<key>.csv``: the manifest, one line per row: ``row,image,sha256,split,target`` (the image's
  path as its split file names it, the sha256 of its bytes, the split, its label as written);
- ``<key>.json``: what the entry is (the key's fields, dtype, shape, the sha256 of the other two
  files), written last: an entry exists once its ``.json`` does.

The key hashes everything that determines the features, so entries are never invalidated, only
added; a changed split file or checkpoint simply gets a new key. Rows are matched between splits
by image content (the sha256 column), not by path, so that a split whose images other cached
splits hold is assembled from their rows even where each split keeps its images in a folder of
its own (docs/FEATURES.md).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch

from vtab.errors import DataError
from vtab.fsutil import atomic_write, sha256_hex

# Bump when the entry layout or the extraction changes in a way the key fields do not show.
FORMAT_VERSION = 3  # 3: .npy rows memory-mapped, a .csv manifest, rows matched by content
STORAGE = {"fp32": np.float32, "fp16": np.float16}
MANIFEST_FIELDS = ("row", "image", "sha256", "split", "target")

log = logging.getLogger(__name__)


Rows = tuple[list[str], list[str], list[str]]  # images, their sha256, their targets


class FeatureSet:
    """One layer's features of a split's images, and what each row is: its image's path, the
    sha256 of the image's bytes (rows match by content) and its target as the split file writes
    it. A loaded entry reads its manifest only when one of those is asked for (a job that hits
    the cache needs the rows alone)."""

    def __init__(self, features: torch.Tensor, paths: list[str] | None = None,
                 meta: dict[str, Any] | None = None, digests: list[str] | None = None,
                 targets: list[str] | None = None, *,
                 manifest: Callable[[], Rows] | None = None) -> None:
        self.features = features  # [N, D] on the CPU: float32 (memory-mapped when loaded)
        self.meta = meta if meta is not None else {}  # plain values kept in the entry
        self._rows: Rows | None = None if manifest else (paths or [], digests, targets)
        self._manifest = manifest

    def _known(self) -> Rows:
        if self._rows is None:
            self._rows = self._manifest()
        return self._rows

    @property
    def paths(self) -> list[str]:
        return self._known()[0]

    @property
    def digests(self) -> list[str] | None:
        return self._known()[1]

    @digests.setter
    def digests(self, value: list[str]) -> None:
        self._rows = (self.paths, value, self.targets)

    @property
    def targets(self) -> list[str] | None:
        return self._known()[2]

    @targets.setter
    def targets(self, value: list[str]) -> None:
        self._rows = (self.paths, self.digests, value)

    def float(self) -> torch.Tensor:
        """The rows as float32 (a copy only when stored as float16)."""
        return self.features.float()


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_hex(handle)


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
        log.warning("feature cache: discarding %s: %s", self._path(key, ".npy"), reason)
        for suffix in (".json", ".npy", ".csv"):  # description first: never one without rows
            with contextlib.suppress(FileNotFoundError):
                self._path(key, suffix).unlink()

    def load(self, key: str) -> FeatureSet | None:
        """The entry, or None when it is absent or fails verification (then it is deleted).

        The rows are memory-mapped: pages are read when used. Each file's sha256 is checked
        against the description once per process and entry (`_verified`)."""
        try:
            description = json.loads(_read_plain(self._path(key, ".json")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._discard(key, f"unreadable description ({exc})")
            return None
        try:
            rows_path, manifest_path = self._path(key, ".npy"), self._path(key, ".csv")
            _verify(rows_path, description["sha256"])
            _verify(manifest_path, description["manifest_sha256"])
            rows = np.load(rows_path, mmap_mode="r", allow_pickle=False)
            if list(rows.shape) != description["shape"]:
                raise ValueError(f"shape {list(rows.shape)}, described {description['shape']}")
            with warnings.catch_warnings():  # read-only pages: nothing here writes into them
                warnings.simplefilter("ignore", UserWarning)
                features = torch.from_numpy(rows)
            return FeatureSet(features, meta=description.get("meta", {}),
                              manifest=functools.partial(_manifest_rows, manifest_path,
                                                         rows.shape[0]))
        except Exception as exc:  # a damaged entry is recomputed, whatever the damage
            self._discard(key, f"unreadable entry ({type(exc).__name__}: {exc})")
            return None

    def store(self, key: str, fields: Mapping[str, Any], features: FeatureSet) -> None:
        """Write rows, manifest, then description, each atomically: readers see a whole entry
        or none. The rows are kept as ``fields["storage"]`` says (fp32 when absent)."""
        storage = str(fields.get("storage", "fp32"))
        if features.digests is None or len(features.digests) != len(features.paths):
            raise ValueError("an entry needs the sha256 of every image it holds")
        self._folder(key)
        buffer = io.BytesIO()
        values = features.features.float().numpy()
        with np.errstate(over="ignore"):  # an overflow is refused just below, by name
            stored = values.astype(STORAGE[storage])
        if not np.isfinite(stored).all() and np.isfinite(values).all():
            raise DataError(f"features of {fields.get('data', {}).get('split', 'a split')} "
                            f"exceed the range of {storage} (largest magnitude "
                            f"{np.abs(values).max():.4g}): set features.storage to fp32")
        np.save(buffer, stored, allow_pickle=False)
        rows = buffer.getvalue()
        atomic_write(self._path(key, ".npy"), rows)
        manifest = _manifest(features, str(fields.get("data", {}).get("split", "")))
        atomic_write(self._path(key, ".csv"), manifest)
        description = {"key": key, "format": FORMAT_VERSION, "fields": dict(fields),
                       "dtype": storage, "shape": list(features.features.shape),
                       "sha256": hashlib.sha256(rows).hexdigest(),
                       "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                       "meta": features.meta, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "host": socket.gethostname()}
        atomic_write(self._path(key, ".json"), json.dumps(description, indent=1, sort_keys=True))

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
            # What a job uses is what the store holds (fp16 rows are rounded), as on a hit.
            loaded[name] = self.load(keys[name]) or computed[name]
            loaded[name].meta = computed[name].meta
        return loaded, set(absent)


# (path, inode, size, modification time, sha256) of files checked in this process
_verified: set[tuple[str, int, int, int, str]] = set()


def _verify(path: Path, sha256: str) -> None:
    """Raise unless `path` (a plain file) has this sha256; a file checked before in this process
    and unchanged since (inode, size, modification time), against the same sha256, is not read
    again."""
    found = os.stat(path, follow_symlinks=False)
    if not stat.S_ISREG(found.st_mode):
        raise OSError(f"{path} is not a plain file")
    stamp = (str(path), found.st_ino, found.st_size, found.st_mtime_ns, sha256)
    if stamp in _verified:
        return
    if file_sha256(path) != sha256:
        raise ValueError("the rows' sha256 does not match the description")
    _verified.add(stamp)


def _manifest_rows(path: Path, count: int) -> Rows:
    """A manifest's images, sha256 and targets; its checks (sha256, shape) were done when its
    entry was loaded, and this raises if it changed since."""
    header, *lines = _read_csv(_read_plain(path).decode("utf-8"))
    if tuple(header) != MANIFEST_FIELDS or len(lines) != count:
        raise DataError(f"feature store manifest {path} changed after it was checked: "
                        f"{len(lines)} lines headed {header} for {count} rows")
    columns = zip(*lines, strict=True) if lines else [()] * len(MANIFEST_FIELDS)
    _, images, digests, _, targets = (list(column) for column in columns)
    return images, digests, targets


def _read_csv(text: str) -> list[list[str]]:
    """The lines of a CSV text as fields; text without quotes (the common case: no image path
    with a comma or quote) is split directly, several times faster than the csv module."""
    if '"' in text:
        return list(csv.reader(io.StringIO(text)))
    # split("\n"), not splitlines(): the writer ends lines with \n only and leaves characters
    # such as \x0c or \u2028 unquoted inside a field.
    return [line.split(",") for line in text.split("\n") if line]


def _manifest(features: FeatureSet, split: str) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    targets = features.targets or [""] * len(features.paths)
    for row, (image, digest, target) in enumerate(zip(features.paths, features.digests or (),
                                                      targets, strict=True)):
        writer.writerow((row, image, digest, split, target))
    return text.getvalue().encode("utf-8")
