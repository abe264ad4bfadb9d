"""Extraction throughput: images/s of ResNet-50 and ViT-B/16 at 224 px, vtab's way and a plain loop.

Two measurements per backbone, each against the plain way measured in the same run:

- from decoded tensors: batches already in memory, only the forward pass. Plain: ``model(x)``
  under ``torch.no_grad()`` in fp32. vtab: `vtab.evaluation.features.forward_setup` as
  ``extract_features`` uses it (inference mode; on a GPU bf16 autocast and channels_last) and
  the layer extractor that returns the pooled output.
- end to end from JPEG files: a split of JPEG files read, decoded, resized and normalised.
  Plain: a ``DataLoader`` without workers over PIL, and the same forward as above. vtab:
  ``extract_features`` with DataLoader workers (decoding overlaps the forward; on a GPU pinned
  memory) and its forward setup.

Weights are random (nothing is downloaded); throughput does not depend on them. ``--compile``
adds a row with ``torch.compile`` on the vtab forward (not used by jobs yet).

    python bench/extraction.py                                      # CPU, small counts
    python bench/extraction.py --device cuda --images 8192 --batch 512 --workers 16 --compile
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from vtab.evaluation.backbones import (  # noqa: E402
    Source,
    build_backbone,
    resolve_backbone,
    source_of,
)
from vtab.evaluation.data import open_split  # noqa: E402
from vtab.evaluation.extract import LayerExtractor  # noqa: E402
from vtab.evaluation.features import TransformSpec, extract_features, forward_setup  # noqa: E402
from vtab.evaluation.schemas import BackboneConfig, LayerConfig  # noqa: E402

SIZE = 224


def write_jpegs(root: Path, count: int) -> Path:
    """A dataset folder with `count` 256 x 256 JPEG files listed in train800.txt."""
    folder = root / "jpegs"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((256, 256), Image.BILINEAR)
        image.save(folder / "images" / f"{index:05d}.jpg", quality=90)
        lines.append(f"images/{index:05d}.jpg {index % 10}\n")
    (folder / "train800.txt").write_text("".join(lines))
    return root


class PlainJpegs(Dataset):
    """What a plain loop does: PIL, resize, to tensor, normalise."""

    def __init__(self, folder: Path, transform: Callable) -> None:
        self.files = sorted((folder / "images").glob("*.jpg"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run: Callable[[], int], device: torch.device) -> float:
    run()  # warm-up: allocations, cuDNN choices, compilation
    synchronize(device)
    started = time.perf_counter()
    count = run()
    synchronize(device)
    return count / (time.perf_counter() - started)


def decoded(model: torch.nn.Module, source: Source, device: torch.device,
            args: argparse.Namespace, vtab: bool) -> float:
    batches = max(1, args.images // args.batch)
    x = torch.randn(args.batch, 3, SIZE, SIZE, device=device)
    if vtab:
        setup = forward_setup(str(device), "auto")
        model = model.to(device, memory_format=setup.memory_format)
        extractor = LayerExtractor(model, [LayerConfig()], source)
        if args.compile_model:
            extractor = torch.compile(extractor)
        x = x.to(memory_format=setup.memory_format)

        def run() -> int:
            with setup.context():
                for _ in range(batches):
                    extractor(x)
            return batches * args.batch
    else:
        model = model.to(device)

        def run() -> int:
            with torch.no_grad():
                for _ in range(batches):
                    model(x)
            return batches * args.batch
    return images_per_second(run, device)


def from_jpegs(model: torch.nn.Module, source: Source, device: torch.device,
               args: argparse.Namespace, root: Path, vtab: bool) -> float:
    transform = TransformSpec(SIZE)
    if vtab:
        split = open_split(root, "jpegs", "train800", key="data.train_split")

        def run() -> int:
            extract_features(model, [LayerConfig()], source, split, transform,
                             batch_size=args.batch, num_workers=args.workers,
                             device=str(device), precision="auto")
            return len(split.entries)
    else:
        model = model.to(device)
        loader = DataLoader(PlainJpegs(root / "jpegs", transform.build()),
                            batch_size=args.batch)

        def run() -> int:
            count = 0
            with torch.no_grad():
                for x in loader:
                    model(x.to(device))
                    count += len(x)
            return count
    return images_per_second(run, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="vtab's DataLoader workers (the plain way uses none)")
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--compile", dest="compile_model", action="store_true",
                        help="torch.compile the vtab forward (decoded tensors only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{args.images} images per measurement, batch {args.batch}, vtab workers "
          f"{args.workers}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp), args.images)
        print(f"{'model':<10} {'input':<8} {'plain img/s':>12} {'vtab img/s':>11} {'ratio':>6}")
        for name in args.models.split(","):
            spec = resolve_backbone(BackboneConfig(name=name, weights="none"))
            model, source = build_backbone(spec).model.eval(), source_of(spec)
            for label, measure in (("decoded", decoded), ("jpeg", from_jpegs)):
                extra = (root,) if measure is from_jpegs else ()
                plain = measure(model, source, device, args, *extra, vtab=False)
                ours = measure(model, source, device, args, *extra, vtab=True)
                ratios.append(ours / plain)
                print(f"{name:<10} {label:<8} {plain:>12.1f} {ours:>11.1f} "
                      f"{ours / plain:>5.2f}x")
    print(f"ratio (vtab / plain) over {len(ratios)} measurements: "
          f"{min(ratios):.2f}x to {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
