"""The config of an evaluation job, part by part: every key with its type, range, default and help.

Importing this module does not import torch: the runner and ``main_status.py --plan`` check
configs without it. The evaluation code reads its settings from these models only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import AfterValidator, Field, model_validator

from vtab.schema import Section, invalid, variants

Metric = Literal["top1", "top5", "balanced_accuracy", "macro_f1"]
Precision = Literal["auto", "fp32", "bf16"]
FeatureNorm = Literal["standardize", "l2", "none"]
METRICS: tuple[str, ...] = get_args(Metric)
PRECISIONS: tuple[str, ...] = get_args(Precision)
FEATURE_NORMS: tuple[str, ...] = get_args(FeatureNorm)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def _plain_name(value: str) -> str:
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a plain name: use letters, digits and ._+- "
                         "(no '/', no '..'); it names a folder or file under data.root")
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]


class DataConfig(Section):
    root: str = Field(description="folder with one folder per dataset, in the VTAB-1K layout")
    train_split: PlainName = Field(
        "train800", description="split file (without .txt) the head is trained on")
    eval_split: PlainName = Field(
        "val200", description="split file (without .txt) the head is evaluated on")


class BackboneConfig(Section):
    name: str = Field(description="model name: torchvision (resnet50, vit_b_16), timm "
                                  "(resnet50.a1_in1k) or, with source module, "
                                  "package.module:function")
    source: Literal["torchvision", "timm", "module"] = Field(
        "torchvision", description="the library that builds the model; module runs a function "
                                   "of a module the runner trusts (main_runner.py "
                                   "--module_backbones)")
    weights: str = Field("none", description="none (random, the same in every runner), the "
                                             "source's pretrained weights (IMAGENET1K_V2, "
                                             "DEFAULT; timm: pretrained) or a checkpoint file")


_ONE_LAYER = ("features from other layers are not supported yet: the backbone's final pooled "
              "output (or CLS token) is used")
_OFFLINE_ONLY = "only the offline mode (a head trained on cached frozen features) exists yet"


class FeaturesConfig(Section):
    hints: ClassVar[Mapping[str, str]] = {
        "layer": _ONE_LAYER, "layers": _ONE_LAYER, "pool": _ONE_LAYER, "pooling": _ONE_LAYER,
        "mode": _OFFLINE_ONLY, "augment": _OFFLINE_ONLY, "augmentation": _OFFLINE_ONLY}

    image_size: int | None = Field(
        None, ge=1, le=4096,
        description="square input size in pixels; null: the backbone's own (224 for most)")
    batch_size: int = Field(64, ge=1, le=100_000,
                            description="images per forward pass when extracting")
    precision: Precision = Field(
        "auto", description="autocast dtype of the forward pass; auto is bf16 on a GPU, "
                            "fp32 on the CPU")


class LinearHead(Section):
    kind: Literal["linear"] = Field("linear", description="the head trained on the features")
    feature_norm: FeatureNorm = Field(
        "standardize", description="normalisation fitted on the training features and applied "
                                   "to both splits")


class _Optimizer(Section):
    hints: ClassVar[Mapping[str, str]] = {
        "learning_rate": "did you mean 'lr'?", "wd": "did you mean 'weight_decay'?",
        "optimizer": "did you mean 'name'?", "type": "did you mean 'name'?",
        "warmup": "did you mean 'warmup_epochs'?"}

    name: str  # each optimizer's own Literal; declared here so that it comes first
    lr: float = Field(gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled for adamw, L2 for sgd")
    epochs: int = Field(ge=1, le=100_000, description="passes over the training features")
    batch_size: int = Field(128, ge=1, le=1_000_000, description="training mini-batch size")
    warmup_epochs: int = Field(0, ge=0, description="linear warmup, then cosine decay to 0")

    @model_validator(mode="after")
    def _warmup_fits(self) -> _Optimizer:
        if self.warmup_epochs > self.epochs:
            raise invalid("warmup_epochs", f"must not exceed optim.epochs ({self.epochs}), "
                                           f"got {self.warmup_epochs}")
        return self


class SgdOptimizer(_Optimizer):
    name: Literal["sgd"] = Field("sgd", description="the optimizer")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")


class AdamWOptimizer(_Optimizer):
    name: Literal["adamw"] = Field("adamw", description="the optimizer")


HeadConfig = variants("kind", "head kind", [LinearHead], default="linear")
OPTIMIZER_SECTIONS = (SgdOptimizer, AdamWOptimizer)
OptimConfig = variants("name", "optimizer", OPTIMIZER_SECTIONS, default="sgd")
OPTIMIZERS: tuple[str, ...] = tuple(s.model_fields["name"].default for s in OPTIMIZER_SECTIONS)


class LinearProbeConfig(Section):
    """What the ``linear_probe`` job kind reads: cached features of two splits, a head."""

    dataset: PlainName = Field(description="dataset folder under data.root")
    data: DataConfig
    backbone: BackboneConfig
    features: FeaturesConfig = Field(FeaturesConfig(), description="feature extraction")
    head: HeadConfig = Field(LinearHead(), description="the head")
    optim: OptimConfig
    seed: int = Field(0, ge=0, le=2**32 - 1, description="head initialisation and data order")
    metric: Metric = Field("top1", description="the metric reported as result")
