"""Nested configuration values addressed by dotted paths, and environment references.

Accessors raise `ConfigError` naming the dotted key. What a job kind reads is checked by its
schema (vtab/schema.py); these helpers serve the stage machine and the processors, which walk
job documents.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import yaml

from vtab.errors import ConfigError
from vtab.yamlio import load_scalar

T = TypeVar("T")
_MISSING = object()


def get_path(tree: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """Return ``tree[a][b][c]`` for ``key == "a.b.c"``."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise ConfigError(key, "is required but missing")
            return default
        node = node[part]
    return node


def set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key == "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(where, f"is a {type(child).__name__}, not a mapping")
        node = child
    node[parts[-1]] = value


def delete_path(tree: dict[str, Any], key: str) -> None:
    """Remove ``tree[a][b][c]`` for ``key == "a.b.c"`` if it is there."""
    *parents, last = key.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def flatten(tree: Mapping[str, Any], prefix: str = "",
            is_leaf: Callable[[Any], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, leaf value) pairs; mappings are descended (but those `is_leaf` calls
    leaves), lists are leaves."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not (is_leaf and is_leaf(value)):
            yield from flatten(value, path + ".", is_leaf)
        else:
            yield path, value


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any],
           where: str = "") -> dict[str, Any]:
    """Deep copy of `base` with every (possibly dotted) entry of `overrides` applied.

    A key that `overrides` sets twice (``optim.lr`` beside ``optim: {lr: ...}``) is an error
    naming it under `where`: one of the two would be silently dropped.
    """
    out = copy.deepcopy(dict(base))
    for key, value in flat_entries(overrides, where):
        set_path(out, key, copy.deepcopy(value))
    return out


def flat_entries(tree: Mapping[str, Any], where: str = "",
                 is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """`flatten`'s pairs; a dotted key given twice is an error naming it under `where`."""
    entries = list(flatten(tree, is_leaf=is_leaf))
    seen: set[str] = set()
    for key, _ in entries:
        if key in seen:
            raise ConfigError(f"{where}.{key}" if where else key,
                              "is set twice (once as a dotted key, once inside a mapping)")
        seen.add(key)
    return entries


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in seq)


def typed(tree: Mapping[str, Any], key: str, kind: type[T], default: Any = _MISSING) -> T:
    """Return the value at `key` checked against `kind` (ints are accepted as floats)."""
    value = get_path(tree, key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(key, f"expected {_type_name(kind)}, got {type(value).__name__} {value!r}")
    return value


# ${NAME} or ${NAME:-default}; the default may be empty.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_env(tree: Any, key: str = "", used: dict[str, str] | None = None) -> Any:
    """Replace ``${NAME:-default}`` references in every string of `tree`.

    A string that is exactly one reference is parsed as a YAML scalar after
    substitution, so ``epochs: ${EPOCHS:-30}`` yields the integer 30. `used`
    collects the variables read and the values they resolved to.
    """
    if isinstance(tree, Mapping):
        return {k: resolve_env(v, f"{key}.{k}" if key else str(k), used) for k, v in tree.items()}
    if isinstance(tree, list):
        return [resolve_env(v, f"{key}[{i}]", used) for i, v in enumerate(tree)]
    if not isinstance(tree, str) or "${" not in tree:
        return tree

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise ConfigError(key, f"environment variable {name} is not set and has no default "
                                       f"(write ${{{name}:-default}})")
            value = default
        if used is not None:
            used[name] = value
        return value

    whole = _ENV_REF.fullmatch(tree)
    text = _ENV_REF.sub(substitute, tree)
    if whole:
        try:
            return load_scalar(text) if text.strip() else text
        except (yaml.YAMLError, ValueError):
            return text
    return text
