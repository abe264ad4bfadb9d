"""The online mode: a head trained on features of augmented training images, computed anew each
epoch by the frozen backbone.

Frozen means frozen: the backbone is built in eval mode with gradients off (`build_backbone`)
and every forward runs under inference mode, so BatchNorm uses, and keeps, its stored
statistics; with augmentation off, each epoch's features are the offline ones. An image's
augmentation in an epoch is drawn from a generator seeded by the job's seed, the epoch and the
image's index, so a run repeats exactly, whatever the runner's DataLoader workers.
"""

from __future__ import annotations

import functools

import torch

from vtab.evaluation.backbones import BackboneSpec, build_backbone, source_of
from vtab.evaluation.data import Split
from vtab.evaluation.features import (
    AugmentedTransform,
    TransformSpec,
    extract_with,
    forward_setup,
    layer_extractor,
)
from vtab.evaluation.heads.trainer import EpochFeatures
from vtab.evaluation.schemas import LinearProbeConfig


def augmented_transform(cfg: LinearProbeConfig, image_size: int,
                        epoch: int) -> AugmentedTransform:
    """The transform of an epoch's training images; its draws are seeded by the job's seed,
    the epoch and each image's index."""
    augment = cfg.features.augment
    if augment is None:
        raise ValueError("the online mode needs features.augment")
    return AugmentedTransform(TransformSpec(image_size), augment.random_resized_crop,
                              tuple(augment.scale), tuple(augment.ratio),
                              augment.horizontal_flip, seed=cfg.seed * 100_003 + epoch)


def epoch_features(cfg: LinearProbeConfig, spec: BackboneSpec, split: Split, image_size: int,
                   *, device: str, num_workers: int, progress: bool) -> EpochFeatures:
    """A function giving each epoch's features of `split`: one forward of every image per
    epoch, all layers of `features.layers` at once. The backbone is built, and traced at its
    layers (an FX trace, where a layer is not the output), on the first call only: the trace
    is paid once per job, not once per epoch."""
    setup = forward_setup(device, cfg.features.precision)
    extractor = functools.cache(lambda: layer_extractor(
        build_backbone(spec).model, cfg.features.layers, source_of(spec), setup))

    def features(epoch: int) -> list[torch.Tensor]:
        found = extract_with(extractor(), setup, split,
                             augmented_transform(cfg, image_size, epoch),
                             batch_size=cfg.features.batch_size, num_workers=num_workers,
                             progress=progress)
        return [found[layer.label()].float() for layer in cfg.features.layers]

    return features
