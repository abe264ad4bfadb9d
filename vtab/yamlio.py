"""Safe YAML reading and writing with errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from vtab.errors import VtabError
from vtab.fsutil import atomic_write

# libyaml's parser and emitter when PyYAML was built with them: several times faster.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """The safe loader, refusing duplicate keys: YAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable keys are the base constructor's to refuse
            if key in seen:
                raise _DuplicateKey(problem=f"duplicate key {key!r}",
                                    problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-3 as a string: a float needs a dot there (1.0e-3). YAML 1.2 and
# every other tool read it as a number, and it is how learning rates are written: do the same.
_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT,
                              list("-+0123456789"))


class YamlFileError(VtabError):
    """A yaml file that cannot be read as a mapping."""


def parse_mapping(raw: bytes, name: str) -> dict[str, Any]:
    """Parse `raw` as a YAML mapping; `name` is used in error messages.

    A UTF-8 byte-order mark and Windows line ends are accepted. Only plain
    YAML is constructed (tags such as ``!!python/object`` are refused).
    """
    if not raw.strip():
        raise YamlFileError(f"{name}: the file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a safe loader: plain YAML only
    except yaml.constructor.ConstructorError as exc:
        raise YamlFileError(f"{name}: refused YAML construct ({exc.problem}{_where(exc)}); "
                            "only plain mappings, lists and scalars are allowed") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlFileError(f"{name}: invalid YAML: {problem}{_where(exc)}") from None
    if not isinstance(data, dict):
        raise YamlFileError(f"{name}: the top level is {_kind(data)}, expected a mapping of keys")
    return data


def load_scalar(text: str) -> Any:
    """One YAML value read as a job file's values are (an environment variable's, say)."""
    return yaml.load(text, Loader=_Loader)


def load_mapping(path: Path) -> dict[str, Any]:
    return parse_mapping(path.read_bytes(), str(path))


class _PlainDumper(_BaseDumper):  # type: ignore[misc,valid-type]
    """Writes shared values out in full: job files are read by people, not only by parsers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# Strings that read as such floats must be quoted when written, so that they read back as strings.
_PlainDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT,
                                   list("-+0123456789"))


def dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)


def write_mapping(path: Path, data: dict[str, Any], *, must_exist: bool = False) -> None:
    atomic_write(path, dump(data), must_exist=must_exist)


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
