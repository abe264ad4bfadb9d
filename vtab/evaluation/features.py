"""Feature extraction: the transform, the precision, and the fields that key a store entry.

A split whose images other cached splits already hold (matched by content) is assembled from
their rows (`extract_reusing`): the same numbers on the CPU in fp32; with bf16 on a GPU, rows
computed in other batches can differ in the last bits from a fresh extraction, as any two
extractions with different batching do. The store itself is `store.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from vtab.evaluation.backbones import Source
from vtab.evaluation.data import ImageSplit, Split, image_digests, label_text
from vtab.evaluation.extract import LayerExtractor
from vtab.evaluation.schemas import OUTPUT, LayerConfig
from vtab.evaluation.store import FeatureSet

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


@dataclass(frozen=True)
class AugmentedTransform:
    """The online mode's transform of a training image: `base`'s, after a random resized crop
    (in place of the squash-resize) and a random horizontal flip, each when asked for; with
    neither, exactly `base`'s."""

    base: TransformSpec
    random_resized_crop: bool
    scale: tuple[float, float]
    ratio: tuple[float, float]
    horizontal_flip: bool
    seed: int = 0  # each image's draws come from (seed, its index): vary it per epoch

    def build(self) -> transforms.Compose:
        size = (self.base.image_size, self.base.image_size)
        steps: list[Any] = [transforms.RandomResizedCrop(size, self.scale, self.ratio)
                            if self.random_resized_crop else transforms.Resize(size)]
        if self.horizontal_flip:
            steps.append(transforms.RandomHorizontalFlip())
        return transforms.Compose([*steps, transforms.ToTensor(),
                                   transforms.Normalize(self.base.mean, self.base.std)])


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def cache_fields(backbone: Mapping[str, str], transform: TransformSpec, split: Split,
                 precision: str, layer: LayerConfig, storage: str = "fp32") -> dict[str, Any]:
    """Everything that determines a split's features of one layer (`precision` resolved), and
    how they are stored (`storage`: fp32 or fp16)."""
    return {
        "backbone": dict(backbone),
        "feature": "pooled" if layer.name == OUTPUT else layer.model_dump(mode="json"),
        "transform": transform.describe(),
        "data": {"dataset": split.dataset, "split": split.name, "split_sha256": split.sha256},
        "dtype": precision,
        "storage": storage,
    }


@dataclass(frozen=True)
class ForwardSetup:
    """How extraction runs the forward pass on a device: on a GPU channels_last and, for bf16,
    autocast (fp32 on the CPU, where channels_last measured no faster: bench/RESULTS.md)."""

    device: torch.device
    memory_format: torch.memory_format
    bf16: bool

    def context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16))
        return stack


def forward_setup(device: str, precision: str) -> ForwardSetup:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return ForwardSetup(dev, torch.channels_last if cuda else torch.preserve_format,
                        resolve_precision(precision, device) == "bf16")


def layer_extractor(model: nn.Module, layers: Sequence[LayerConfig], source: Source,
                    setup: ForwardSetup) -> LayerExtractor:
    """`model` moved to the setup's device, with the layers it is read at (traced when any is
    not its output: build it once for many passes, as the online mode does each epoch)."""
    model.to(setup.device, memory_format=setup.memory_format)
    return LayerExtractor(model, layers, source)


def extract_features(model: nn.Module, layers: Sequence[LayerConfig], source: Source,
                     split: Split, transform: TransformSpec | AugmentedTransform, *,
                     batch_size: int = 64,
                     num_workers: int = 0, device: str = "cpu", precision: str = "auto",
                     progress: bool = False) -> dict[str, FeatureSet]:
    """Every layer's features of every image of `split`, in file order, as float32 on the CPU,
    from one forward pass per batch; by layer label."""
    setup = forward_setup(device, precision)
    return extract_with(layer_extractor(model, layers, source, setup), setup, split, transform,
                        batch_size=batch_size, num_workers=num_workers, progress=progress)


def extract_with(extractor: LayerExtractor, setup: ForwardSetup, split: Split,
                 transform: TransformSpec | AugmentedTransform, *, batch_size: int,
                 num_workers: int, progress: bool) -> dict[str, FeatureSet]:
    """`extract_features` with an extractor built by `layer_extractor` for `setup`."""
    dev = setup.device
    seed = transform.seed if isinstance(transform, AugmentedTransform) else None
    loader = DataLoader(ImageSplit(split, transform.build(), seed), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda")
    chunks: dict[str, list[torch.Tensor]] = {site.layer.label(): [] for site in extractor.sites}
    indices = []
    with setup.context():
        for images, _, index in tqdm(loader, desc=f"{split.dataset}/{split.name}",
                                     disable=not progress, leave=False):
            images = images.to(dev, non_blocking=True, memory_format=setup.memory_format)
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
    label) already hold, matched by the sha256 of the image's bytes.

    Donors must come from the same backbone, transform and precision (other splits of the same
    dataset, say train800 and val200 for train800val200, wherever each keeps its image files),
    so that each image goes through the backbone once for the whole protocol. Only images some
    layer lacks are passed to `extract`, once for all layers. ``meta`` counts the images
    ``forwarded`` and ``reused``; every result carries the digests and targets of its rows.
    """
    digests = image_digests(split)
    known: dict[str, dict[str, torch.Tensor]] = {label: {} for label in labels}
    meta: dict[str, Any] = {}
    for label in labels:
        for donor in donors.get(label, ()):
            meta = meta or dict(donor.meta)
            for digest, row in zip(donor.digests or (), donor.features, strict=True):
                known[label].setdefault(digest, row)
    missing = [index for index, digest in enumerate(digests)
               if any(digest not in known[label] for label in labels)]
    if len(missing) == len(split.entries):
        result = extract(split)
    else:
        computed = extract(split.subset(missing)) if missing else {}
        result = {}
        for label in labels:
            rows = [known[label].get(digest) for digest in digests]
            if missing:
                meta = dict(computed[label].meta)
                for row, index in zip(computed[label].features, missing, strict=True):
                    rows[index] = row
            result[label] = FeatureSet(torch.stack(rows).float(), split.paths, dict(meta))
    targets = [label_text(label) for label in split.labels]
    for found in result.values():
        found.meta.update(forwarded=len(missing), reused=len(split.entries) - len(missing))
        found.digests, found.targets = digests, targets
    return result
