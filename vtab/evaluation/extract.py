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


def _need(x: torch.Tensor, dims: int, layer: LayerConfig, index: int, what: str) -> None:
    if x.ndim != dims:
        raise ConfigError(_key(index, "pool"),
                          f"{layer.pool} needs {what}; layer {layer.name} gives {_shape(x)}")


def _avg(x: torch.Tensor, layer: LayerConfig, index: int) -> torch.Tensor:
    _need(x, 4, layer, index, "a [batch, channels, height, width] map")
    return x.mean((2, 3))


def _avgpool2d(x: torch.Tensor, layer: LayerConfig, index: int) -> torch.Tensor:
    _need(x, 4, layer, index, "a [batch, channels, height, width] map")
    if min(x.shape[2:]) + 2 * layer.padding < layer.kernel_size:
        raise ConfigError(_key(index, "kernel_size"),
                          f"{layer.kernel_size} is larger than layer {layer.name}'s map "
                          f"{_shape(x)} (+ padding)")
    if layer.padding * 2 > layer.kernel_size:
        raise ConfigError(_key(index, "padding"), "must be at most half of kernel_size")
    return F.avg_pool2d(x, layer.kernel_size, layer.stride or layer.kernel_size,
                        layer.padding).flatten(1)


def _tokens(x: torch.Tensor, layer: LayerConfig, index: int) -> torch.Tensor:
    _need(x, 3, layer, index, "tokens [batch, tokens, dim]")
    if x.shape[1] < 2 and layer.pool != "cls":
        raise ConfigError(_key(index, "pool"), f"{layer.pool} needs patch tokens besides "
                                               f"the CLS token; layer {layer.name} gives "
                                               f"{_shape(x)}")
    return x


def _none(x: torch.Tensor, layer: LayerConfig, index: int) -> torch.Tensor:
    _need(x, 2, layer, index, "no pooling: the layer must give [batch, dim]; choose a "
                                    "pool op")
    return x


POOL_OPS: dict[str, Callable[[torch.Tensor, LayerConfig, int], torch.Tensor]] = {
    "none": _none,
    "avg": _avg,
    "avgpool2d": _avgpool2d,
    "cls": lambda x, layer, i: _tokens(x, layer, i)[:, 0],
    "patch_mean": lambda x, layer, i: _tokens(x, layer, i)[:, 1:].mean(1),
    "cls_patch_mean": lambda x, layer, i: torch.cat(
        [_tokens(x, layer, i)[:, 0], x[:, 1:].mean(1)], dim=1),
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


class LayerExtractor:
    """Maps a batch of images to ``{layer label: [batch, dim]}`` for every configured layer."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerConfig], source: Source) -> None:
        self.model, self.layers = model, list(layers)
        self.norms: dict[int, nn.Module] = {}
        self.nodes: dict[int, list[str]] = {}
        if all(layer.name == OUTPUT for layer in self.layers):
            self.traced = None  # the model's plain forward: nothing to trace
            return
        names = source.node_names(model)
        for index, layer in enumerate(self.layers):
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
            return {layer.label(): _none(out, layer, i) for i, layer in enumerate(self.layers)}
        outputs = self.traced(images)
        return {layer.label(): self._pool(index, layer, outputs)
                for index, layer in enumerate(self.layers)}

    def _pool(self, index: int, layer: LayerConfig,
              outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        found = [outputs[node] for node in self.nodes[index]]
        if layer.name != LAST_BLOCKS:
            return POOL_OPS[layer.pool](found[0], layer, index)
        normed = [self.norms[index](x) for x in found]
        for x in normed:
            _tokens(x, layer, index)
        parts = [x[:, 0] for x in normed]
        if layer.pool == "cls_patch_mean":
            parts.append(normed[-1][:, 1:].mean(1))
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
