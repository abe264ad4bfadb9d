"""Several layers of a backbone from one forward pass, each pooled to a vector.

Intermediate outputs come from the model library's own tracer (torchvision's
``create_feature_extractor``, timm's for timm models), not hand-written hooks. A layer is named
as the library names it: a module of the model (``layer3``, ``encoder.layers.encoder_layer_11``,
``blocks.11``), ``output`` for the backbone's own pooled output, or ``last_blocks``: the CLS
tokens of a ViT's last n blocks after its final norm, concatenated (DINOv2's linear protocol,
``cls_patch_mean`` adding the mean patch token of the last block). Pooling ops are a map from
name to function, as VISSL's ``LINEAR_EVAL_FEAT_POOL_OPS_MAP`` is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtab.errors import ConfigError
from vtab.evaluation.backbones import Source
from vtab.evaluation.schemas import LAST_BLOCKS, OUTPUT, LayerConfig

# (blocks container, final norm) of the ViTs we know: torchvision's, timm's.
_VIT_PARTS = (("encoder.layers", "encoder.ln"), ("blocks", "norm"))


def _key(index: int, part: str = "") -> str:
    return f"features.layers[{index}]{'.' + part if part else ''}"


def _shape(x: torch.Tensor) -> str:
    return f"[batch, {', '.join(map(str, x.shape[1:]))}]"


@dataclass(frozen=True)
class Site:
    """Where a pooling op works: the layer (for errors) and the model's token layout."""

    layer: LayerConfig
    index: int  # in features.layers
    prefix: int = 1  # tokens before the patch tokens: CLS (and registers, in timm's ViTs)
    has_cls: bool = True

    def refuse(self, part: str, message: str) -> ConfigError:
        return ConfigError(_key(self.index, part), message)


def _need(x: torch.Tensor, dims: int, site: Site, what: str) -> None:
    if x.ndim != dims:
        raise site.refuse("pool", f"{site.layer.pool} needs {what}; layer {site.layer.name} "
                                  f"gives {_shape(x)}")


def _avg(x: torch.Tensor, site: Site) -> torch.Tensor:
    _need(x, 4, site, "a [batch, channels, height, width] map")
    return x.mean((2, 3))


def _avgpool2d(x: torch.Tensor, site: Site) -> torch.Tensor:
    _need(x, 4, site, "a [batch, channels, height, width] map")
    layer = site.layer
    if min(x.shape[2:]) + 2 * layer.padding < layer.kernel_size:
        raise site.refuse("kernel_size", f"{layer.kernel_size} is larger than layer "
                                         f"{layer.name}'s map {_shape(x)} (+ padding)")
    if layer.padding * 2 > layer.kernel_size:
        raise site.refuse("padding", "must be at most half of kernel_size")
    return F.avg_pool2d(x, layer.kernel_size, layer.stride or layer.kernel_size,
                        layer.padding).flatten(1)


def _cls(x: torch.Tensor, site: Site) -> torch.Tensor:
    _need(x, 3, site, "tokens [batch, tokens, dim]")
    if not site.has_cls:
        raise site.refuse("pool", f"{site.layer.pool} needs a CLS token; this model has none "
                                  "(it pools its patch tokens): use patch_mean")
    return x[:, 0]


def _patch_mean(x: torch.Tensor, site: Site) -> torch.Tensor:
    _need(x, 3, site, "tokens [batch, tokens, dim]")
    if x.shape[1] <= site.prefix:
        raise site.refuse("pool", f"{site.layer.pool} needs patch tokens after the model's "
                                  f"{site.prefix} leading token(s); layer {site.layer.name} "
                                  f"gives {_shape(x)}")
    return x[:, site.prefix:].mean(1)


def _none(x: torch.Tensor, site: Site) -> torch.Tensor:
    _need(x, 2, site, "no pooling: the layer must give [batch, dim]; choose a pool op")
    return x


POOL_OPS: dict[str, Callable[[torch.Tensor, Site], torch.Tensor]] = {
    "none": _none,
    "avg": _avg,
    "avgpool2d": _avgpool2d,
    "cls": _cls,
    "patch_mean": _patch_mean,
    "cls_patch_mean": lambda x, site: torch.cat([_cls(x, site), _patch_mean(x, site)], dim=1),
}


def _find(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _vit_blocks(model: nn.Module, index: int, count: int) -> tuple[list[str], nn.Module]:
    """Names of the last `count` blocks of a ViT, and its final norm."""
    for blocks_path, norm_path in _VIT_PARTS:
        blocks, norm = _find(model, blocks_path), _find(model, norm_path)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and norm is not None:
            if isinstance(norm, nn.Identity):
                raise ConfigError(_key(index, "name"),
                                  f"{LAST_BLOCKS} applies the model's final norm ({norm_path}), "
                                  "which is an Identity here (the model normalises after "
                                  "pooling instead): name the blocks and pool them directly")
            names = [f"{blocks_path}.{name}" for name, _ in blocks.named_children()]
            if count > len(names):
                raise ConfigError(_key(index, "blocks"),
                                  f"{count} blocks asked; the model has {len(names)}")
            return names[-count:], norm
    raise ConfigError(_key(index, "name"),
                      f"{LAST_BLOCKS} needs a ViT with blocks and a final norm (torchvision: "
                      "encoder.layers and encoder.ln; timm: blocks and norm); this model has "
                      "neither")


def _traceable(name: str, nodes: Sequence[str]) -> bool:
    """Whether the tracer can return `name`: a node, or a module whose last node it returns."""
    return name in nodes or any(node.startswith(name + ".") for node in nodes)


def _unknown_layer(name: str, index: int, nodes: Sequence[str],
                   model: nn.Module) -> ConfigError:
    shown = [n for n, _ in model.named_modules() if n and n.count(".") <= 1
             and _traceable(n, nodes)]
    close = difflib.get_close_matches(name, shown + list(nodes), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(_key(index, "name"),
                       f"the model has no layer {name!r}{hint}; its layers include "
                       f"{', '.join(shown[:40])}{' ...' if len(shown) > 40 else ''}; "
                       f"also {OUTPUT} and {LAST_BLOCKS}")


def _token_layout(model: nn.Module) -> tuple[int, bool]:
    """(tokens before the patch tokens, whether the first is a CLS token) of a ViT: timm's say
    so (registers, models without a CLS token); torchvision's have one CLS token."""
    prefix = getattr(model, "num_prefix_tokens", 1)
    return int(prefix), getattr(model, "cls_token", True) is not None and prefix > 0


class LayerExtractor:
    """Maps a batch of images to ``{layer label: [batch, dim]}`` for every configured layer."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerConfig], source: Source) -> None:
        self.model = model
        prefix, has_cls = _token_layout(model)
        self.sites = [Site(layer, index, prefix, has_cls) for index, layer in enumerate(layers)]
        self.norms: dict[int, nn.Module] = {}
        self.nodes: dict[int, list[str]] = {}
        if all(layer.name == OUTPUT for layer in layers):
            self.traced = None  # the model's plain forward: nothing to trace
            return
        names = source.node_names(model)
        for index, layer in enumerate(layers):
            if layer.name == OUTPUT:
                self.nodes[index] = [names[-1]]
            elif layer.name == LAST_BLOCKS:
                self.nodes[index], self.norms[index] = _vit_blocks(model, index, layer.blocks)
            elif _traceable(layer.name, names):
                self.nodes[index] = [layer.name]
            else:
                raise _unknown_layer(layer.name, index, names, model)
        wanted = sorted({node for nodes in self.nodes.values() for node in nodes})
        self.traced = source.feature_extractor(model, wanted)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.traced is None:
            out = self.model(images)
            return {site.layer.label(): _none(out, site) for site in self.sites}
        outputs = self.traced(images)
        return {site.layer.label(): self._pool(site, outputs) for site in self.sites}

    def _pool(self, site: Site, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        found = [outputs[node] for node in self.nodes[site.index]]
        if site.layer.name != LAST_BLOCKS:
            return POOL_OPS[site.layer.pool](found[0], site)
        # DINOv2: the CLS token of each block after the final norm, then (cls_patch_mean) the
        # mean patch token of the last one.
        normed = [self.norms[site.index](x) for x in found]
        parts = [_cls(x, site) for x in normed]
        if site.layer.pool == "cls_patch_mean":
            parts.append(_patch_mean(normed[-1], site))
        return torch.cat(parts, dim=1)


def check_layers(model: nn.Module, layers: Sequence[LayerConfig], source: Source,
                 image_size: int) -> dict[str, int]:
    """Each layer's feature size, from a forward of a blank image; one ConfigError listing every
    layer whose name is unknown or whose pooling does not fit its shape, by key."""
    sizes, problems = {}, []
    blank = torch.zeros(1, 3, image_size, image_size)
    for index, layer in enumerate(layers):
        try:
            with torch.inference_mode():
                (found,) = LayerExtractor(model, [layer], source)(blank).values()
            sizes[layer.label()] = int(found.shape[1])
        except ConfigError as exc:  # keyed as layer 0 of the one-layer extractor
            problems += [ConfigError(p.key.replace(_key(0), _key(index), 1), p.message)
                         for p in exc.problems]
    if problems:
        raise ConfigError.combine(problems)
    return sizes
