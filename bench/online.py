"""Online mode against offline: what training a head on augmented images costs.

One linear-probe job (ResNet-18 with random weights, the embedded digits: train800 -> val200,
SGD, batch 64) timed three ways in one process: offline with an empty feature cache (both
splits extracted once, then the head trains on the cached features), offline again from the
cache (what every later job of a pipeline pays), and online (the training images forwarded
anew each epoch, with random resized crops; the evaluation split from the cache). The last
line is the ratio of the online job to the offline one that extracts.

    python bench/online.py [--epochs 30] [--image_size 32] [--data ./data/vtab-1k]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vtab.evaluation.digits import write_embedded  # noqa: E402
from vtab.evaluation.probe import run_linear_probe  # noqa: E402


def config(root: Path, epochs: int, image_size: int, online: bool) -> dict:
    features = {"image_size": image_size, "batch_size": 128}
    if online:
        features.update(mode="online", augment={"random_resized_crop": True,
                                                 "scale": [0.5, 1.0], "horizontal_flip": False})
    return {"dataset": "digits", "data": {"root": str(root)},
            "backbone": {"name": "resnet18", "weights": "none"}, "features": features,
            "optim": {"lr": 0.1, "epochs": epochs, "batch_size": 64}, "seed": 0}


def timed(root: Path, cache: Path, epochs: int, image_size: int, online: bool) -> tuple[
        float, dict]:
    started = time.perf_counter()
    output = run_linear_probe(config(root, epochs, image_size, online), cache_dir=cache,
                              progress=False)
    return time.perf_counter() - started, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "vtab-1k")
    args = parser.parse_args()
    write_embedded(args.data)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.epochs} epochs at {args.image_size} px")
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        extracting, first = timed(args.data, cache, args.epochs, args.image_size, False)
        cached, _ = timed(args.data, cache, args.epochs, args.image_size, False)
        online, found = timed(args.data, cache, args.epochs, args.image_size, True)
    print(f"offline, extracting:  {extracting:7.1f} s  top1 {first['result']:.3f}  "
          f"(forwarded {sum(r['forwarded'] for r in first['features'].values())} images)")
    print(f"offline, cached:      {cached:7.1f} s")
    print(f"online:               {online:7.1f} s  top1 {found['result']:.3f}  "
          f"(forwarded {found['features']['train']['forwarded']} training images)")
    print(f"online costs {online / extracting:.1f}x the offline job that extracts, "
          f"{online / cached:.1f}x a cached one")


if __name__ == "__main__":
    main()
