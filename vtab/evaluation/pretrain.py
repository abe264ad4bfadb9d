"""A small pretraining run that writes checkpoints along the way, so that a checkpoint sweep
(``pipelines/workflows/checkpoint_sweep.yaml``) can be tried on the embedded data without a run
of one's own: a torchvision ResNet-18, trained from the same random initialisation as
``backbone.weights: none``, to classify the digits of ``digits/train800`` (supervised; the sweep
then probes ``val200``, which it never saw)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vtab.evaluation.backbones import RANDOM_SEED
from vtab.evaluation.data import ImageSplit, open_split
from vtab.evaluation.features import TransformSpec
from vtab.fsutil import atomic_write

NAME = "checkpoint_{step}.pth"


def pretrain_digits(data_root: Path, out: Path, *, steps: Sequence[int],
                    image_size: int = 32, batch_size: int = 64, lr: float = 0.05,
                    progress: bool = True) -> list[Path]:
    """Train ResNet-18 on digits' train800 for max(`steps`) SGD steps; write its weights at each
    of `steps` as ``<out>/checkpoint_<step>.pth``. Returns the files written."""
    import torchvision

    split = open_split(data_root, "digits", "train800", key="digits")
    images = ImageSplit(split, TransformSpec(image_size).build())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # the initialisation `backbone.weights: none` builds
        model = torchvision.models.get_model("resnet18")
        model.fc = nn.Linear(model.fc.in_features, 10)  # after: the rest stays as built
        order = torch.Generator().manual_seed(RANDOM_SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_of = nn.CrossEntropyLoss()
    wanted, written, step = sorted(set(steps)), [], 0
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=wanted[-1], desc="pretraining", unit="step", disable=not progress)
    while True:
        for batch, labels, _ in DataLoader(images, batch_size=batch_size, shuffle=True,
                                           generator=order):
            if step in wanted:
                written.append(_save(model, out / NAME.format(step=step)))
            if step == wanted[-1]:
                bar.close()
                return written
            model.train()
            optimizer.zero_grad()
            loss = loss_of(model(batch), labels)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")


def _save(model: nn.Module, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())  # a sweep never reads half a checkpoint
    return path
