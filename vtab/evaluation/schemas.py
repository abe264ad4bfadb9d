"""The config of an evaluation job, part by part: every key with its type, range, default and help.

Importing this module does not import torch: the runner and ``main_status.py --plan`` check
configs without it. The evaluation code reads its settings from these models only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from vtab.schema import Section, invalid, variants

Task = Literal["single_label", "multi_label"]
SINGLE_LABEL_METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1")
MULTI_LABEL_METRICS = ("map", "map_voc07", "map_interpolated")
Metric = Literal["top1", "top5", "balanced_accuracy", "macro_f1", "map", "map_voc07",
                 "map_interpolated"]
METRICS_OF_TASK: dict[str, tuple[str, ...]] = {"single_label": SINGLE_LABEL_METRICS,
                                               "multi_label": MULTI_LABEL_METRICS}
Precision = Literal["auto", "fp32", "bf16"]
FeatureNorm = Literal["standardize", "l2", "none"]
METRICS: tuple[str, ...] = get_args(Metric)
TASKS: tuple[str, ...] = get_args(Task)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def _plain_name(value: str) -> str:
    if not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a plain name: use letters, digits and ._+- "
                         "(no '/', no '..'); it names a folder or file under data.root")
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]


class DataConfig(Section):
    root: str = Field(description="folder with one folder per dataset (split files or class "
                                  "folders: SETUP_DATA.md)")
    train_split: PlainName = Field(
        "train800", description="split (file without .txt, or class folder) the head is "
                                "trained on")
    eval_split: PlainName = Field(
        "val200", description="split (file without .txt, or class folder) the head is "
                              "evaluated on")
    task: Task = Field("single_label", description="single_label: one class per image; "
                                                   "multi_label: a set of classes per image "
                                                   "(split file lines '<path> 3,7,12?')")


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


OUTPUT = "output"  # the layer name of the backbone's own pooled output
LAST_BLOCKS = "last_blocks"  # DINOv2's concatenation of the last blocks' CLS tokens
PoolOp = Literal["none", "avg", "avgpool2d", "cls", "patch_mean", "cls_patch_mean"]


class LayerConfig(Section):
    """One layer the head is trained on, with the pooling that makes it a vector."""

    hints: ClassVar[Mapping[str, str]] = {
        "layer": "did you mean 'name'?", "kernel": "did you mean 'kernel_size'?",
        "pooling": "did you mean 'pool'?", "n": "did you mean 'blocks'?"}

    name: str = Field(OUTPUT, description=f"{OUTPUT}: the backbone's own pooled output; a "
                                          "module of the model (layer3, "
                                          "encoder.layers.encoder_layer_11, blocks.11); "
                                          f"{LAST_BLOCKS}: the CLS tokens of the last blocks "
                                          "of a ViT, after its final norm (DINOv2)")
    pool: PoolOp = Field("none", description="none (the layer is [batch, dim] already), avg "
                                             "(global average of a [B, C, H, W] map), "
                                             "avgpool2d (kernel_size/stride/padding, then "
                                             "flattened), cls (token 0 of [B, T, D]), "
                                             "patch_mean (mean of tokens 1..), cls_patch_mean "
                                             "(both, concatenated)")
    kernel_size: int | None = Field(None, ge=1, le=1024, description="avgpool2d only")
    stride: int | None = Field(None, ge=1, le=1024,
                               description="avgpool2d only; default: kernel_size")
    padding: int = Field(0, ge=0, le=512, description="avgpool2d only")
    blocks: int | None = Field(None, ge=1, le=64,
                               description=f"{LAST_BLOCKS} only: how many of the last blocks")

    @model_validator(mode="after")
    def _fits_together(self) -> LayerConfig:
        pooled2d = self.pool == "avgpool2d"
        if pooled2d and self.kernel_size is None:
            raise invalid("kernel_size", "is required with pool avgpool2d")
        for key in ("kernel_size", "stride", "padding"):
            if not pooled2d and key in self.model_fields_set:
                raise invalid(key, f"is read only with pool avgpool2d, not {self.pool}")
        last = self.name == LAST_BLOCKS
        if last and self.blocks is None:
            raise invalid("blocks", f"is required with name {LAST_BLOCKS}")
        if not last and "blocks" in self.model_fields_set:
            raise invalid("blocks", f"is read only with name {LAST_BLOCKS}")
        if last and self.pool not in ("cls", "cls_patch_mean"):
            raise invalid("pool", f"{LAST_BLOCKS} concatenates CLS tokens: use cls or "
                                  f"cls_patch_mean (adds the mean of the last block's patch "
                                  f"tokens), not {self.pool}")
        if self.name == OUTPUT and self.pool != "none":
            raise invalid("pool", f"the {OUTPUT} layer is pooled by the backbone already; "
                                  "name a module of the model to pool it yourself")
        return self

    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """The keys this layer's name and pool read: what ran, and valid to read back."""
        dumped = handler(self)
        unread = {"kernel_size", "stride", "padding"} if self.pool != "avgpool2d" else set()
        unread |= {"blocks"} if self.name != LAST_BLOCKS else set()
        return {k: v for k, v in dumped.items() if k not in unread}

    def label(self) -> str:
        """A short name of the layer and its pooling, unique within a job."""
        if self.name == OUTPUT:
            return OUTPUT
        if self.name == LAST_BLOCKS:
            return f"last{self.blocks}_{self.pool}"
        if self.pool == "avgpool2d":
            stride = self.stride or self.kernel_size
            return f"{self.name}:avgpool{self.kernel_size}s{stride}p{self.padding}"
        return self.name if self.pool == "none" else f"{self.name}:{self.pool}"


def _distinct(values: list) -> list:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"lists {', '.join(map(str, twice))} more than once")
    return values


def _distinct_layers(layers: list[LayerConfig]) -> list[LayerConfig]:
    labels = [layer.label() for layer in layers]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"the same layer and pooling twice: {', '.join(twice)}")
    return layers


def _pair(low: float, high: float) -> Any:
    return Annotated[list[Annotated[float, Field(ge=low, le=high)]],
                     Field(min_length=2, max_length=2)]


class AugmentConfig(Section):
    """How the online mode varies a training image at each epoch (evaluation images never)."""

    hints: ClassVar[Mapping[str, str]] = {
        "flip": "did you mean 'horizontal_flip'?", "crop": "did you mean "
        "'random_resized_crop'?"}

    random_resized_crop: bool = Field(
        True, description="a random part of the image (area fraction `scale`, aspect `ratio`) "
                          "resized to image_size, as torchvision's RandomResizedCrop; false: "
                          "the whole image squashed to image_size, as offline")
    scale: _pair(0.001, 1.0) = Field([0.08, 1.0], description="random_resized_crop only: the "
                                                              "range of the area fraction")
    ratio: _pair(0.01, 100.0) = Field([0.75, 4 / 3], description="random_resized_crop only: "
                                                                 "the range of the aspect ratio")
    horizontal_flip: bool = Field(True, description="mirror half of the images at random")

    @model_validator(mode="after")
    def _crop_options_are_read(self) -> AugmentConfig:
        for key in ("scale", "ratio"):
            if not self.random_resized_crop and key in self.model_fields_set:
                raise invalid(key, "is read only with random_resized_crop: true")
            low, high = getattr(self, key)
            if low > high:
                raise invalid(key, f"is a range [low, high]; got [{low}, {high}]")
        return self

    @model_serializer(mode="wrap")
    def _only_what_is_read(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        dumped = handler(self)
        if not self.random_resized_crop:
            del dumped["scale"], dumped["ratio"]
        return dumped


class FeaturesConfig(Section):
    hints: ClassVar[Mapping[str, str]] = {
        "layer": "did you mean 'layers' (a list)?", "pool": "pooling is set per entry of layers",
        "augmentation": "did you mean 'augment'?"}

    image_size: int | None = Field(
        None, ge=1, le=4096,
        description="square input size in pixels; null: the backbone's own (224 for most)")
    batch_size: int = Field(64, ge=1, le=100_000,
                            description="images per forward pass when extracting")
    precision: Precision = Field(
        "auto", description="autocast dtype of the forward pass; auto is bf16 on a GPU, "
                            "fp32 on the CPU")
    layers: Annotated[list[LayerConfig], AfterValidator(_distinct_layers)] = Field(
        [LayerConfig()], min_length=1, max_length=32,
        description="the layers a head is trained on, one head each, all from one forward "
                    "pass; a result per layer")
    storage: Literal["fp32", "fp16"] = Field(
        "fp32", description="how the feature store keeps the rows: fp32, or fp16 (half the "
                            "disk and memory; heads still train in fp32)")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: the head trains on the cached features of the "
                               "training images; online: on features of augmented images, "
                               "computed anew each epoch by the frozen backbone (in eval "
                               "mode: BatchNorm keeps its statistics); heads trained by "
                               "gradient descent only")
    augment: AugmentConfig | None = Field(
        None, validate_default=False,
        description="online only: how training images are augmented (default: "
                    "random_resized_crop and horizontal_flip)")

    @model_validator(mode="before")
    @classmethod
    def _online_augments_by_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("mode") == "online" and "augment" not in data:
            return {**data, "augment": {}}
        return data

    @model_validator(mode="after")
    def _augment_is_read(self) -> FeaturesConfig:
        if self.mode == "offline" and self.augment is not None:
            raise invalid("augment", "is read only with features.mode online")
        if self.mode == "online" and self.augment is None:
            raise invalid("augment", "must be a mapping in the online mode (leave it out for "
                                     "the default augmentation)")
        return self

    @model_serializer(mode="wrap")
    def _augment_if_online(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        dumped = handler(self)
        if self.mode == "offline":
            del dumped["augment"]
        return dumped


_FEATURE_NORM = Field("standardize", description="normalisation fitted on the training "
                                                 "features and applied to both splits")


class LinearHead(Section):
    kind: Literal["linear"] = Field("linear", description="the head trained on the features")
    feature_norm: FeatureNorm = _FEATURE_NORM


class BnLinearHead(Section):
    kind: Literal["bn_linear"] = Field(
        "bn_linear", description="BatchNorm without affine parameters, then linear (MAE, "
                                 "VISSL's eval_mlp)")
    feature_norm: FeatureNorm = Field("none", description="normalisation before the BatchNorm")


class MlpHead(Section):
    kind: Literal["mlp"] = Field("mlp", description="hidden layers, then linear")
    feature_norm: FeatureNorm = _FEATURE_NORM
    hidden: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        [512], min_length=1, max_length=8, description="sizes of the hidden layers")
    activation: Literal["relu", "gelu"] = Field("relu", description="after each hidden layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="after each activation")


class LogregHead(Section):
    kind: Literal["logreg"] = Field(
        "logreg", description="logistic regression fitted by L-BFGS to convergence "
                              "(multinomial; one sigmoid per class for multi_label)")
    feature_norm: FeatureNorm = _FEATURE_NORM
    c: float = Field(1.0, gt=0, le=1e12, description="inverse L2 strength (scikit-learn's C): "
                                                     "the loss summed over samples plus "
                                                     "|W|^2 / (2 c)")
    max_iter: int = Field(1000, ge=1, le=100_000, description="L-BFGS iterations at most")


class SvmHead(Section):
    kind: Literal["svm"] = Field(
        "svm", description="one-vs-rest linear SVMs (squared hinge) on L2-normalised "
                           "features, the cost of each class chosen by cross-validated "
                           "average precision (VISSL/VirTex VOC07)")
    costs: Annotated[list[Annotated[float, Field(gt=0, le=1e6)]],
                     AfterValidator(_distinct)] = Field(
        [0.01, 0.1, 1.0, 10.0], min_length=1, max_length=32,
        description="the costs (C) tried for each class")
    folds: int = Field(3, ge=2, le=20, description="cross-validation folds, stratified per "
                                                     "class")
    positive_weight: float = Field(1.0, gt=0, le=1000,
                                   description="weight of a positive example's loss (VISSL "
                                               "and VirTex use 2)")
    train_difficult_as: Literal["ignored", "negative"] = Field(
        "ignored", description="multi_label only: whether an example marked difficult for a "
                               "class is left out of its training or counts as a negative "
                               "(VISSL, VirTex); evaluation always leaves it out")
    max_iter: int = Field(1000, ge=1, le=100_000, description="L-BFGS iterations per fit")


class KnnHead(Section):
    kind: Literal["knn"] = Field(
        "knn", description="k nearest training features by cosine similarity, votes "
                           "weighted by exp(similarity / temperature) (DINOv2)")
    k: Annotated[list[Annotated[int, Field(ge=1, le=100_000)]],
                 AfterValidator(_distinct)] = Field(
        [10, 20, 100, 200], min_length=1, max_length=16,
        description="neighbour counts; a result for each")
    votes: Literal["temperature", "uniform"] = Field(
        "temperature", description="temperature: weights exp(similarity / temperature); "
                                   "uniform: one vote per neighbour")
    temperature: float = Field(0.07, gt=0, le=100,
                               description="of the vote weights (temperature votes only)")

    @model_validator(mode="after")
    def _temperature_is_read(self) -> KnnHead:
        if self.votes == "uniform" and "temperature" in self.model_fields_set:
            raise invalid("temperature", "is read only with votes: temperature")
        return self

    @model_serializer(mode="wrap")
    def _only_what_is_read(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        dumped = handler(self)
        if self.votes == "uniform":
            del dumped["temperature"]
        return dumped


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


HEAD_SECTIONS = (LinearHead, BnLinearHead, MlpHead, LogregHead, SvmHead, KnnHead)
HeadConfig = variants("kind", "head kind", HEAD_SECTIONS, default="linear")
# Heads trained by gradient descent read optim; the others are fitted to convergence.
GRADIENT_HEADS = ("linear", "bn_linear", "mlp")
# Heads whose fit involves no randomness: a seed would change nothing.
SEEDLESS_HEADS = ("logreg", "svm", "knn")
OPTIMIZER_SECTIONS = (SgdOptimizer, AdamWOptimizer)
OptimConfig = variants("name", "optimizer", OPTIMIZER_SECTIONS, default="sgd")
OPTIMIZERS: tuple[str, ...] = tuple(s.model_fields["name"].default for s in OPTIMIZER_SECTIONS)


class LinearProbeConfig(Section):
    """What the ``linear_probe`` job kind reads: cached features of two splits, heads on them."""

    dataset: PlainName = Field(description="dataset folder under data.root")
    data: DataConfig
    backbone: BackboneConfig
    features: FeaturesConfig = Field(FeaturesConfig(), description="feature extraction")
    head: HeadConfig = Field(LinearHead(), description="the head")
    # None when absent (the validator below decides whether that is right).
    optim: OptimConfig = Field(
        None, validate_default=True,
        description=f"the optimizer; required by head kinds {', '.join(GRADIENT_HEADS)} and "
                    "read by no other")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="head initialisation and data order (not read by "
                                  f"{', '.join(SEEDLESS_HEADS)})")
    metric: Metric = Field(
        "top1", validate_default=True,
        description=f"the metric reported as result: {', '.join(SINGLE_LABEL_METRICS)} "
                    f"(single_label); {', '.join(MULTI_LABEL_METRICS)} (multi_label)")

    # Field validators, not one model validator: their errors come with those of other keys
    # (a model validator runs only once every field is valid). `info.data` holds the fields
    # declared before, when they were valid.
    @field_validator("optim", mode="wrap")
    @classmethod
    def _optim_read_by_the_head(cls, value: object, handler: ValidatorFunctionWrapHandler,
                                info: ValidationInfo) -> object:
        kind = getattr(info.data.get("head"), "kind", None)
        if value is None:
            if kind in GRADIENT_HEADS:
                raise ValueError(f"is required: head.kind {kind} is trained by gradient "
                                 "descent (optim.name, optim.lr, optim.epochs)")
            return None
        if kind is not None and kind not in GRADIENT_HEADS:
            raise ValueError(f"is not read by head.kind {kind}, which is fitted to "
                             "convergence; remove it")
        return handler(value)

    @field_validator("head")
    @classmethod
    def _head_options_of_the_task(cls, value: Any, info: ValidationInfo) -> Any:
        mode = getattr(info.data.get("features"), "mode", None)
        if mode == "online" and value.kind not in GRADIENT_HEADS:
            raise ValueError(f"head.kind {value.kind} is fitted to convergence on fixed "
                             "features, which features.mode online does not have (new "
                             "augmented features each epoch): use one of "
                             f"{', '.join(GRADIENT_HEADS)}, or the offline mode")
        task = getattr(info.data.get("data"), "task", None)
        if task == "single_label" and "train_difficult_as" in value.model_fields_set:
            raise ValueError("train_difficult_as is read only with data.task multi_label "
                             "(single-label files mark no label difficult)")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_read_by_the_head(cls, value: int, info: ValidationInfo) -> int:
        kind = getattr(info.data.get("head"), "kind", None)
        if kind in SEEDLESS_HEADS:
            raise ValueError(f"is not read by head.kind {kind}: its fit is deterministic; "
                             "remove it")
        return value

    @field_validator("metric")
    @classmethod
    def _metric_of_the_task(cls, value: str, info: ValidationInfo) -> str:
        task = getattr(info.data.get("data"), "task", None)
        if task is not None and value not in METRICS_OF_TASK[task]:
            raise ValueError(f"{value} is not a {task} metric; use one of "
                             f"{', '.join(METRICS_OF_TASK[task])}")
        return value

    @field_serializer("optim", mode="wrap")
    def _optim_if_any(self, optim: object, handler: SerializerFunctionWrapHandler) -> object:
        return None if optim is None else handler(optim)

    @model_serializer(mode="wrap")
    def _only_what_is_read(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """No optim or seed where the head reads none: run_config records what ran."""
        dumped = handler(self)
        if self.optim is None:
            del dumped["optim"]
        if self.head.kind in SEEDLESS_HEADS:
            del dumped["seed"]
        if self.data.task == "single_label":
            dumped["head"].pop("train_difficult_as", None)
        return dumped


class ExportDataConfig(Section):
    root: str = Field(description="folder with one folder per dataset (SETUP_DATA.md)")
    splits: list[PlainName] = Field(
        ["train800", "val200", "test"], min_length=1, max_length=64,
        description="the splits whose features are written (files without .txt, or class "
                    "folders)")
    task: Task = Field("single_label", description="how the split files' labels read: "
                                                   "single_label or multi_label")


class ExportConfig(Section):
    """What ``main_export.py`` reads: a dataset's splits, the backbone and how to extract."""

    dataset: PlainName = Field(description="dataset folder under data.root")
    data: ExportDataConfig
    backbone: BackboneConfig
    features: FeaturesConfig = Field(FeaturesConfig(), description="feature extraction")

    @field_validator("features")
    @classmethod
    def _offline(cls, value: FeaturesConfig) -> FeaturesConfig:
        if value.mode != "offline":
            raise ValueError("mode online augments training images anew each epoch: an "
                             "export writes the features of the images as they are (offline)")
        return value
