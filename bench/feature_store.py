"""Feature store: loading a cached split of dsprites' test size (73,728 images x 768 features).

vtab's store keeps an entry's rows as a NumPy file loaded memory-mapped, with a CSV manifest
and a JSON description (docs/FEATURES.md). Today's way (the format before this store, and what
per-job tools that pickle their features do) is one ``torch.save`` file: read it whole, check
its sha256, unpickle it. Both are timed from the page cache (the entry was just written): the
first load in a process (which checks the sha256) and later loads (checked once per process);
"touched" adds summing every row, which reads every page, as a head's first epoch does.

    python bench/feature_store.py [--rows 73728] [--dim 768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vtab.evaluation import store  # noqa: E402
from vtab.evaluation.store import FeatureCache, FeatureSet  # noqa: E402


def entry(rows: int, dim: int) -> FeatureSet:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(rows, dim, generator=generator)
    paths = [f"images/test/{index:06d}.png" for index in range(rows)]
    digests = [hashlib.sha256(path.encode()).hexdigest() for path in paths]
    return FeatureSet(features, paths, {}, digests, [str(index % 16) for index in range(rows)])


def save_today(path: Path, features: FeatureSet) -> str:
    buffer = io.BytesIO()
    torch.save({"features": features.features, "paths": features.paths}, buffer)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_today(path: Path, sha256: str) -> torch.Tensor:
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise SystemExit("today's payload does not match its sha256")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)["features"]


def seconds(work: Callable[[], torch.Tensor], touch: bool) -> float:
    started = time.perf_counter()
    features = work()
    if touch:
        features.float().sum()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=73_728)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores; {args.rows} x {args.dim}")
    features = entry(args.rows, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp) / "store")
        keys = {}
        for storage in ("fp32", "fp16"):
            fields = {"bench": "feature_store", "storage": storage}
            keys[storage] = cache.key(fields)
            cache.store(keys[storage], fields, features)
        today = Path(tmp) / "today.pt"
        sha256 = save_today(today, features)

        def ours(storage: str) -> Callable[[], torch.Tensor]:
            return lambda: cache.load(keys[storage]).features

        ways = {"today (torch.load)": lambda: load_today(today, sha256),
                "store fp32": ours("fp32"), "store fp16": ours("fp16")}
        table = {}
        for name, work in ways.items():
            store._verified.clear()
            first = seconds(work, touch=False)
            later = statistics.median(seconds(work, touch=False) for _ in range(args.repeats))
            touched = statistics.median(seconds(work, touch=True) for _ in range(args.repeats))
            table[name] = (first, later, touched)
        sizes = {"today (torch.load)": today.stat().st_size,
                 **{f"store {s}": (Path(tmp) / "store" / k[:2] / f"{k}.npy").stat().st_size
                    for s, k in keys.items()}}
    print(f"{'':<20} {'MB':>7} {'first load s':>13} {'later load s':>13} {'touched s':>10}")
    for name, (first, later, touched) in table.items():
        print(f"{name:<20} {sizes[name] / 2**20:>7.0f} {first:>13.3f} {later:>13.4f} "
              f"{touched:>10.3f}")
    today_first, today_later, today_touched = table["today (torch.load)"]
    first, later, touched = table["store fp32"]
    print(f"ratio (today / store fp32): {today_first / first:.1f}x first load, "
          f"{today_later / later:.0f}x later loads, {today_touched / touched:.1f}x touched")


if __name__ == "__main__":
    main()
