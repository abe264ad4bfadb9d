"""Frozen backbones by name, in the style of timm's ``create_model``.

``backbone.source`` picks a registered source (torchvision, timm, or ``module`` for a user's own
``package.module:function``); ``backbone.weights`` is ``none`` (random, but the same for every
runner), the source's own pretrained weights, or a local checkpoint file. The classifier is
replaced by Identity, so the model maps images to pooled features.

`resolve_backbone` is cheap (no model is built): it yields the weights identity the feature cache
keys on, so a job whose features are cached never builds the model.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import feature_extraction

from vtab.errors import Advice, ConfigError, RunnerEnvironmentError
from vtab.evaluation.schemas import BackboneConfig

RANDOM_SEED = 0
RANDOM_ID = f"random-seed{RANDOM_SEED}"
DEFAULT_IMAGE_SIZE = 224
WEIGHTS_KEY = "backbone.weights"
# Wrappers around a checkpoint's state dict (Lightning, DINO, DDP, ...), unwrapped in this order.
_NESTING = ("state_dict", "model", "teacher", "module")
_PREFIXES = re.compile(r"^(?:module\.|backbone\.)+")
# Attribute names of classifiers; their checkpoint keys are dropped once the classifier is gone.
_CLASSIFIERS = ("fc", "heads", "head", "classifier")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone config resolves to, before any model is built."""

    source: str
    name: str
    weights_id: str
    default_image_size: int
    checkpoint: Path | None = None
    pretrained: bool = False  # the source's own weights, named by weights_id

    def identity(self) -> dict[str, str]:
        """The fields that determine the model's outputs (for cache keys)."""
        return {"source": self.source, "name": self.name, "weights_id": self.weights_id}


@dataclass
class Backbone:
    """A frozen model in eval mode whose forward returns [batch, feature_dim] features."""

    model: nn.Module
    feature_dim: int
    weights_id: str
    default_image_size: int
    missing_keys: int = 0
    unexpected_keys: int = 0


class Source:
    """How one model library checks names, resolves its own weights and builds models."""

    def check_name(self, name: str) -> None:
        """Raise ConfigError on ``backbone.name`` when the library has no such model."""

    def image_size(self, name: str) -> int:
        return DEFAULT_IMAGE_SIZE

    def pretrained(self, name: str, weights: str) -> tuple[str, int]:
        """(weights_id, image size) of the library weights called `weights`."""
        raise ConfigError(WEIGHTS_KEY, f"{weights!r}: this source has no pretrained weights; "
                                       "use 'none' or the path of a checkpoint file")

    def build(self, name: str, weights_id: str | None) -> nn.Module:
        raise NotImplementedError

    def weights_file(self, name: str, weights_id: str) -> tuple[str, Path] | None:
        """(where the library downloads `weights_id` from, where it keeps it), when known.

        The place follows TORCH_HOME for torch hub files and HF_HOME for Hugging Face's.
        """
        return None

    def strip_classifier(self, model: nn.Module) -> int | None:
        """Remove the classifier in place; return the feature size when known without a forward."""
        return _strip_classifier(model)

    def node_names(self, model: nn.Module) -> list[str]:
        """The names of the model's layers whose outputs `feature_extractor` can return."""
        return feature_extraction.get_graph_node_names(model)[1]

    def feature_extractor(self, model: nn.Module, nodes: list[str]) -> nn.Module:
        """A module whose forward returns ``{node: output}`` for `nodes`, from one pass."""
        return feature_extraction.create_feature_extractor(model, {n: n for n in nodes})


_SOURCES: dict[str, Source] = {}


def register_source(name: str) -> Callable[[type[Source]], type[Source]]:
    def add(cls: type[Source]) -> type[Source]:
        _SOURCES[name] = cls()
        return cls
    return add


def _unknown_model(name: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ConfigError("backbone.name", f"unknown model {name!r}{hint}")


def _strip_classifier(model: nn.Module) -> int | None:
    """Replace the classifier's last Linear by Identity, keeping any norm or pooling before it."""
    for attr in _CLASSIFIERS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            last = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)][-1:]
            if last:
                in_features = head[last[0]].in_features
                head[last[0]] = nn.Identity()
                return in_features
    return None


@functools.cache
def _torchvision_models() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@register_source("torchvision")
class TorchvisionSource(Source):
    def check_name(self, name: str) -> None:
        if name not in _torchvision_models():
            raise _unknown_model(name, _torchvision_models())

    def pretrained(self, name: str, weights: str) -> tuple[str, int]:
        # Accept IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2 and DEFAULT (an alias).
        enum = torchvision.models.get_model_weights(name)
        try:
            member = enum[weights.removeprefix(enum.__name__ + ".")]
        except KeyError:
            raise ConfigError(WEIGHTS_KEY, f"{name} has no weights {weights!r}; available: "
                                           f"{', '.join(enum.__members__)}") from None
        return f"{enum.__name__}.{member.name}", int(member.transforms().crop_size[0])

    def build(self, name: str, weights_id: str | None) -> nn.Module:
        # Downloads the weights into TORCH_HOME on first use.
        return torchvision.models.get_model(name, weights=weights_id)

    def weights_file(self, name: str, weights_id: str) -> tuple[str, Path] | None:
        url = torchvision.models.get_weight(weights_id).url
        return url, _hub_checkpoints() / os.path.basename(urlparse(url).path)


@register_source("timm")
class TimmSource(Source):
    @staticmethod
    def _timm() -> Any:
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("backbone.source",
                              "timm is not installed (pip install 'vtab[timm]')") from exc
        return timm

    def check_name(self, name: str) -> None:
        timm = self._timm()
        if not timm.is_model(name):
            raise _unknown_model(name, timm.list_models())

    def image_size(self, name: str) -> int:
        try:
            cfg = self._timm().models.get_pretrained_cfg(name)
        except RuntimeError as exc:  # an unknown pretrained tag
            raise ConfigError("backbone.name", str(exc)) from exc
        return int(cfg.input_size[-1]) if cfg is not None else DEFAULT_IMAGE_SIZE

    def pretrained(self, name: str, weights: str) -> tuple[str, int]:
        if weights not in ("pretrained", "DEFAULT"):
            raise ConfigError(WEIGHTS_KEY, "timm weights are chosen by a tag in backbone.name "
                                           "(resnet50.a1_in1k); set weights to 'pretrained'")
        # An untagged name means timm's default tag, which may change between timm versions.
        return f"timm:{name}@{self._timm().__version__}", self.image_size(name)

    def build(self, name: str, weights_id: str | None) -> nn.Module:
        return self._timm().create_model(name, pretrained=weights_id is not None)

    def weights_file(self, name: str, weights_id: str) -> tuple[str, Path] | None:
        cfg = self._timm().models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None)
        if hub_id:
            return f"https://huggingface.co/{hub_id}", _hf_cache(hub_id)
        url = getattr(cfg, "url", None)
        if url:
            return url, _hub_checkpoints() / os.path.basename(urlparse(url).path)
        return None

    def strip_classifier(self, model: nn.Module) -> int | None:
        model.reset_classifier(0)
        return None  # num_features is not the pooled size for every timm model: measure it

    # timm's versions know which of its modules to keep whole when tracing.
    def node_names(self, model: nn.Module) -> list[str]:
        return self._timm().models.get_graph_node_names(model)[1]

    def feature_extractor(self, model: nn.Module, nodes: list[str]) -> nn.Module:
        return self._timm().models.create_feature_extractor(model, {n: n for n in nodes})


@register_source("module")
class ModuleSource(Source):
    """``backbone.name`` is ``package.module:function``; function() returns the nn.Module."""

    def check_name(self, name: str) -> None:
        if not re.fullmatch(r"[\w.]+:\w+", name):
            raise ConfigError("backbone.name", f"expected 'package.module:function', got {name!r}")
        module = name.split(":")[0]
        try:  # finds the module without running it; the function is looked up when it is built
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:  # a parent package that is missing or broken
            raise ConfigError("backbone.name", f"cannot find module {module}: {exc}") from exc
        if found is None:
            raise ConfigError("backbone.name", f"cannot find module {module} (is it installed, "
                                               "or on PYTHONPATH of every runner?)")

    def build(self, name: str, weights_id: str | None) -> nn.Module:
        module_name, function = name.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("backbone.name", f"cannot import {name}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError("backbone.name",
                              f"{name}() returned a {type(model).__name__}, not a torch nn.Module")
        return model


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache(repo_id: str) -> Path:
    """Hugging Face's cache folder of a model repository (HF_HUB_CACHE, HF_HOME)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return cache / f"models--{repo_id.replace('/', '--')}"


def weights_advice(spec: BackboneSpec) -> list[Advice]:
    """Advice when a library's weights are not in the local cache yet (runners download them)."""
    where = _source(spec.source).weights_file(spec.name, spec.weights_id)
    if where is None or where[1].exists():
        return []
    url, path = where
    return [Advice(WEIGHTS_KEY, f"{spec.weights_id} is not in the local cache yet ({path}); a "
                                f"runner downloads it from {urlparse(url).netloc} on first use. "
                                f"{_OFFLINE_HINT}")]


_OFFLINE_HINT = ("On a machine without internet access, put the file there beforehand "
                 "(TORCH_HOME chooses the folder of torch hub files, HF_HOME that of Hugging "
                 "Face's), or set backbone.weights to a local checkpoint file.")


def _fetch_failed(exc: BaseException) -> bool:
    """Whether `exc` is a failure to download or store weights, not a fault of the config."""
    libraries = {"urllib3", "requests", "httpx", "httpcore", "huggingface_hub"}
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in libraries


def _build(source: Source, spec: BackboneSpec) -> nn.Module:
    """The source's model, with its own weights when `spec` asks for them. A download that fails
    stops this runner, not the job: another machine (or this one, once the file is in place)
    can run it."""
    if not spec.pretrained:
        return source.build(spec.name, None)
    try:
        return source.build(spec.name, spec.weights_id)
    except Exception as exc:
        if not _fetch_failed(exc):
            raise
        where = source.weights_file(spec.name, spec.weights_id)
        place = (f" from {urlparse(where[0]).netloc} into {where[1]}" if where else "")
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunnerEnvironmentError(
            f"cannot fetch the weights {spec.weights_id}{place}: {type(exc).__name__}: "
            f"{reason}. This machine cannot reach the weights' host (or cannot store them). "
            f"{_OFFLINE_HINT}") from exc


def source_of(spec: BackboneSpec) -> Source:
    return _source(spec.source)


def _source(name: str) -> Source:
    if name not in _SOURCES:
        raise ConfigError("backbone.source",
                          f"unknown source {name!r}; known: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[name]


_HASHES: dict[tuple[str, int, int], str] = {}


def checkpoint_id(path: Path) -> str:
    """``sha256:<hex>`` of the file, memoized while its size and mtime stay the same."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[memo] = f"sha256:{digest.hexdigest()}"
    return _HASHES[memo]


def _is_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or Path(weights).is_file()


def resolve_backbone(cfg: BackboneConfig) -> BackboneSpec:
    """Check the ``backbone.*`` values and identify the weights, without building a model."""
    source = _source(cfg.source)
    source.check_name(cfg.name)
    if cfg.weights == "none":
        return BackboneSpec(cfg.source, cfg.name, RANDOM_ID, source.image_size(cfg.name))
    if _is_path(cfg.weights):
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise ConfigError(WEIGHTS_KEY, f"checkpoint file {path.absolute()} does not exist")
        return BackboneSpec(cfg.source, cfg.name, checkpoint_id(path),
                            source.image_size(cfg.name), checkpoint=path)
    weights_id, image_size = source.pretrained(cfg.name, cfg.weights)
    return BackboneSpec(cfg.source, cfg.name, weights_id, image_size, pretrained=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a file that is no checkpoint
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(WEIGHTS_KEY, f"{path} is not a loadable checkpoint: {reason}") from exc
    while isinstance(obj, Mapping):
        nested = next((obj[k] for k in _NESTING if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise ConfigError(WEIGHTS_KEY, f"{path} holds a {type(obj).__name__}, not a state dict")
    return {_PREFIXES.sub("", k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_checkpoint(model: nn.Module, path: Path) -> tuple[int, int]:
    """Load `path` into `model` (classifier already removed); (missing, unexpected) key counts."""
    own = model.state_dict()
    state = {k: v for k, v in _read_state_dict(path).items()
             if k in own or k.split(".")[0] not in _CLASSIFIERS}
    if not own.keys() & state.keys():
        sample = ", ".join(list(state)[:3]) or "none"
        raise ConfigError(WEIGHTS_KEY, f"no parameter of {path} matches the model "
                                       f"(checkpoint keys: {sample}, ...)")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(WEIGHTS_KEY, f"{path} does not fit the model: {exc}") from exc
    return len(result.missing_keys), len(result.unexpected_keys)


def _measure_feature_dim(model: nn.Module, image_size: int) -> int:
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, image_size, image_size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("backbone.name", f"the model returns {shape}; expected [batch, dim]")
    return int(out.shape[1])


def build_backbone(spec: BackboneSpec) -> Backbone:
    """Build the model of `spec` on the CPU, frozen and in eval mode."""
    source = _source(spec.source)
    # Seeded fork: random weights (and any a checkpoint lacks) are the same in every runner.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = _build(source, spec)
    feature_dim = source.strip_classifier(model)
    missing, unexpected = _load_checkpoint(model, spec.checkpoint) if spec.checkpoint else (0, 0)
    model.eval().requires_grad_(False)
    if feature_dim is None:
        feature_dim = _measure_feature_dim(model, spec.default_image_size)
    return Backbone(model, feature_dim, spec.weights_id, spec.default_image_size,
                    missing, unexpected)


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone described by ``backbone.name``, ``backbone.weights`` and ``backbone.source``."""
    return build_backbone(resolve_backbone(cfg))
