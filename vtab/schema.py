"""Strict config schemas: every key a job carries is read or refused, by name.

A schema is a tree of `Section` models (pydantic v2, ``extra="forbid"``, strict types, no
NaN or infinity). `validate` turns every problem of a config into a `ConfigError` naming the
dotted key, with a "did you mean" suggestion for a misspelt key and, for a key that another
variant reads (``optim.momentum`` with ``optim.name: adamw``), which variant reads it.
`key_reference` renders a schema as the table of keys that docs/PIPELINES.md shows.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined

from vtab.errors import ConfigError, did_you_mean

M = TypeVar("M", bound="Section")


class Section(BaseModel):
    """A part of a config: unknown keys and loosely typed values are errors.

    `hints` says more about keys a user may try that the section does not have (a synonym, a
    feature that is not there yet); an unknown key's error quotes it.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    hints: ClassVar[Mapping[str, str]] = {}


@dataclass(frozen=True)
class Variants:
    """Marks a field as one of several sections told apart by the value of `field`."""

    field: str  # the key that picks the variant (``name`` of optim, ``kind`` of head)
    what: str  # how errors call a value of that key ("optimizer")
    sections: Mapping[str, type[Section]]
    default: str | None  # picked when the key is absent


def variants(field: str, what: str, sections: Sequence[type[Section]], *,
             default: str | None = None) -> Any:
    """The annotation of a field that holds one of `sections`, picked by their `field` value.

    Each section declares `field` as a ``Literal`` with its own value as default, so that a
    config without the key gets `default`'s section and records the value it ran with.
    """
    by_tag = {_tag_of(section, field): section for section in sections}

    def pick(value: Any) -> str | None:
        if isinstance(value, Mapping):
            tag = value.get(field, default)
        else:
            tag = getattr(value, field, None)
        return tag if isinstance(tag, str) else None  # None: pydantic reports no valid tag

    members = tuple(Annotated[section, Tag(tag)] for tag, section in by_tag.items())
    union = Union[members]  # noqa: UP007  (a runtime union of a variable number of types)
    return Annotated[union, Discriminator(pick), Variants(field, what, by_tag, default)]


def _tag_of(section: type[Section], field: str) -> str:
    info = section.model_fields.get(field)
    if info is None or not isinstance(info.default, str):
        raise TypeError(f"{section.__name__} must give '{field}' a string default")
    return info.default


def invalid(key: str, message: str) -> PydanticCustomError:
    """An error for a check across keys, raised in a validator of the section holding `key`."""
    return PydanticCustomError("vtab_invalid", "{message}", {"key": key, "message": message})


def validate(schema: type[M], config: Mapping[str, Any], *, prefix: str = "",
             elsewhere: Mapping[str, type[Section]] | None = None) -> M:
    """`config` checked against `schema`; every problem at once in one `ConfigError`.

    Keys in errors are dotted paths under `prefix` (the config's own place in a bigger one).
    `elsewhere` names other schemas (other job kinds): a top-level key one of them reads is
    reported as belonging there.
    """
    try:
        return schema.model_validate(config)
    except ValidationError as exc:
        problems = [_problem(schema, error, elsewhere or {}) for error in exc.errors()]
        error = ConfigError.combine(problems)
        raise (error.prefixed(prefix) if prefix else error) from None


# -- errors -----------------------------------------------------------------------------------


@dataclass
class _Place:
    """Where an error's location leads in the schema."""

    key: str  # dotted, list indices as [i]
    section: type[Section] | None  # the section whose field the last part names, if any
    chooser: tuple[str, Variants, str] | None  # (dotted key of the union, marker, tag) if inside


def _locate(schema: type[Section], loc: Sequence[int | str]) -> _Place:
    """Follow `loc` through the schema, dropping the tags pydantic adds for unions."""
    parts: list[str] = []
    node: Any = schema
    section: type[Section] | None = None
    chooser = None
    index = 0
    while index < len(loc):
        part = loc[index]
        index += 1
        if isinstance(part, int):
            if parts:
                parts[-1] += f"[{part}]"
            else:
                parts.append(f"[{part}]")
            node = _item_type(node)
            continue
        parts.append(part)
        if not (isinstance(node, type) and issubclass(node, Section)):
            node = None
            continue
        section = node
        info = node.model_fields.get(part)
        if info is None:
            node = None
            continue
        marker = _variants_of(info)
        if marker is not None and index < len(loc) and loc[index] in marker.sections:
            tag = str(loc[index])
            index += 1
            chooser = (".".join(parts), marker, tag)
            node = marker.sections[tag]
        else:
            node = _unwrap(info.annotation)
    return _Place(".".join(parts), section, chooser)


def _item_type(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    return _unwrap(args[0]) if args else None


def _unwrap(annotation: Any) -> Any:
    """The section type of an annotation that holds one (``X`` or ``X | None``), else it."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        sections = [a for a in typing.get_args(annotation) if a is not type(None)]
        return sections[0] if len(sections) == 1 else annotation
    return annotation


def _variants_of(info: FieldInfo) -> Variants | None:
    return next((m for m in info.metadata if isinstance(m, Variants)), None)


_TYPES = {"float_type": "a number", "int_type": "an integer", "string_type": "a string",
          "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "model_attributes_type": "a mapping",
          "int_from_float": "an integer"}
_BOUNDS = {"greater_than": ("gt", "must be greater than"),
           "greater_than_equal": ("ge", "must be at least"),
           "less_than": ("lt", "must be less than"),
           "less_than_equal": ("le", "must be at most")}


def _problem(schema: type[Section], error: Any,
             elsewhere: Mapping[str, type[Section]]) -> ConfigError:
    place = _locate(schema, error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "vtab_invalid":
        key = f"{place.key}.{ctx['key']}" if place.key else ctx["key"]
        return ConfigError(key, ctx["message"])
    if kind == "extra_forbidden":
        return ConfigError(place.key, _unknown_key(schema, place, elsewhere))
    if kind == "missing":
        return ConfigError(place.key, "is required but missing")
    if kind == "literal_error":
        choices = [c.strip("'") for c in ctx["expected"].replace(" or ", ", ").split(", ")]
        return ConfigError(place.key, f"must be one of {', '.join(choices)}; got {value!r}"
                                      f"{did_you_mean(value, choices)}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return ConfigError(*_bad_choice(schema, place, error))
    if kind in _BOUNDS:
        name, text = _BOUNDS[kind]
        bound = ctx[name]
        shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return ConfigError(place.key, f"{text} {shown}, got {value!r}")
    if kind == "finite_number":
        return ConfigError(place.key, f"must be a finite number, got {value!r}")
    if kind in _TYPES:
        return ConfigError(place.key, f"expected {_TYPES[kind]}, got {_describe(value)}"
                                      f"{_quoted_number(value)}")
    message = str(error["msg"]).removeprefix("Value error, ")
    return ConfigError(place.key, message)


def _quoted_number(value: Any) -> str:
    """A hint for a number written in quotes."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (a number in quotes is a string: write it without them)"


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _unknown_key(schema: type[Section], place: _Place,
                 elsewhere: Mapping[str, type[Section]]) -> str:
    name = place.key.rsplit(".", 1)[-1]
    if place.section is not None and name in place.section.hints:
        return f"unknown key: {place.section.hints[name]}"
    if place.chooser is not None:
        union_key, marker, tag = place.chooser
        readers = [t for t, s in marker.sections.items() if t != tag and name in s.model_fields]
        if readers:
            return (f"unknown key: it is read only when {union_key}.{marker.field} is "
                    f"{' or '.join(readers)}, not {tag}")
    if place.section is schema:
        owners = [owner for owner, other in elsewhere.items() if name in other.model_fields]
        if owners:
            return f"unknown key here: it is read by {' and '.join(owners)}"
    known = sorted(place.section.model_fields) if place.section else []
    return f"unknown key{did_you_mean(name, known)}; known here: {', '.join(known) or 'none'}"


def _bad_choice(schema: type[Section], place: _Place, error: Any) -> tuple[str, str]:
    info = place.section.model_fields.get(place.key.rsplit(".", 1)[-1]) if place.section else None
    marker = _variants_of(info) if info is not None else None
    if marker is None:  # not one of ours: pydantic's own words
        return place.key, str(error["msg"])
    given = error["input"]
    if not isinstance(given, Mapping):
        return place.key, f"expected a mapping, got {_describe(given)}"
    key, known = f"{place.key}.{marker.field}", list(marker.sections)
    if marker.field not in given:
        return key, f"is required: one of {', '.join(known)}"
    value = given[marker.field]
    return key, (f"unknown {marker.what} {value!r}{did_you_mean(value, known)}; "
                 f"known: {', '.join(known)}")


# -- the key reference ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str
    help: str
    when: str = ""  # the variant the key belongs to ("optim.name: sgd")


def key_docs(schema: type[Section], prefix: str = "", when: str = "") -> Iterator[KeyDoc]:
    """Every key of `schema` in declaration order, nested sections and variants expanded.

    A key that every variant of a field reads alike is listed once; one that only some read
    is listed with the variant (`when`) that reads it.
    """
    for name, info in schema.model_fields.items():
        key = f"{prefix}{name}"
        marker = _variants_of(info)
        if marker is not None:
            yield from _variant_docs(key, marker, when)
            continue
        annotation = _unwrap(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, Section):
            yield from key_docs(annotation, f"{key}.", when)
            continue
        yield KeyDoc(key, _type_text(info), _default_text(info), info.description or "", when)


def _variant_docs(key: str, marker: Variants, when: str) -> Iterator[KeyDoc]:
    tags = list(marker.sections)
    first = marker.sections[tags[0]].model_fields[marker.field]
    yield KeyDoc(f"{key}.{marker.field}", " \\| ".join(tags), marker.default or "required",
                 first.description or "", when)
    readers: dict[KeyDoc, list[str]] = {}
    for tag, section in marker.sections.items():
        for doc in key_docs(section, f"{key}.", when):
            if doc.key != f"{key}.{marker.field}":
                readers.setdefault(doc, []).append(tag)
    for doc, reading in readers.items():
        shared = len(reading) == len(tags)
        condition = f"{key}.{marker.field}: {' or '.join(reading)}"
        yield doc if shared else KeyDoc(doc.key, doc.type, doc.default, doc.help,
                                        f"{when}, {condition}" if when else condition)


def _type_text(info: FieldInfo) -> str:
    annotation = info.annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = " \\| ".join(str(a) for a in typing.get_args(annotation))
    else:
        text = _type_name(annotation)
    bounds = [f"{symbol} {getattr(m, attr)}" for m in info.metadata
              for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
              if getattr(m, attr, None) is not None]
    return ", ".join([text, *bounds])


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    names = {float: "number", int: "integer", str: "string", bool: "true/false",
             type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default is PydanticUndefined:
        return "computed"
    if info.default is None:
        return "null"
    return '`""`' if info.default == "" else str(info.default)


def key_reference(schemas: Mapping[str, type[Section]]) -> str:
    """A Markdown table of every key of every schema, for docs/PIPELINES.md."""
    lines = []
    for title, schema in schemas.items():
        lines += [f"#### {title}", "", "| key | type | default | what it does |",
                  "| --- | --- | --- | --- |"]
        for doc in key_docs(schema):
            help_text = f"{doc.help} (when `{doc.when}`)" if doc.when else doc.help
            lines.append(f"| `{doc.key}` | {doc.type} | {doc.default} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["Field", "KeyDoc", "Section", "Variants", "invalid", "key_docs", "key_reference",
           "validate", "variants"]
