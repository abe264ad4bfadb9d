"""Safe YAML reading and writing with errors that name the file.

Anyone who can write into a work area can hand a runner a yaml, so what one file may cost a
reader is bounded: its size (`MAX_FILE_BYTES`), how deep lists and mappings nest (`MAX_DEPTH`)
and how large the document grows once its aliases are expanded (`MAX_NODES`,
`MAX_EXPANDED_CHARS`). These are checked while the file is parsed, before anything is built.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, CollectionStartEvent, Event, MappingStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vtab.errors import VtabError
from vtab.fsutil import atomic_write, atomic_write_all

# libyaml's parser and emitter when PyYAML was built with them: several times faster.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# The largest job file read. Runners write far smaller ones: the biggest, a select_best job over
# a grid of 10,000 points (the default --max_grid_points) with its tuning table, is about 1 MB;
# and 4 MiB still read in a few seconds (PyYAML builds about 1 MB a second).
MAX_FILE_BYTES = 4 * 1024 * 1024
# Real files nest under 15 levels; Python code walking the data recursively (validation, the
# writer) needs well under its recursion limit of 1000 frames for 64.
MAX_DEPTH = 64
# Values (scalars, lists, mappings) and characters of text in the document with every alias
# expanded, as the writer spells it out (`_PlainDumper`) and as code walking it sees it. A file
# without aliases cannot reach the text bound within MAX_FILE_BYTES; the value bound is about
# what a job file of MAX_FILE_BYTES holds as block YAML.
MAX_NODES = 500_000
MAX_EXPANDED_CHARS = MAX_FILE_BYTES
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"  # the key ``=``, a string since PyYAML reads it so
_READ_CHUNK = 2**20  # a read of n bytes allocates n at once: read a bounded file in chunks


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _TooCostly(yaml.MarkedYAMLError):
    """Valid YAML, but past a bound of what one file may cost (or a structure holding itself)."""


class _KeyNotString(yaml.YAMLError):
    pass


class _Size(NamedTuple):
    """What an anchored node stands for wherever it is aliased."""

    nodes: int
    chars: int
    height: int  # levels of lists and mappings, itself included


class _BoundedComposer(Composer):
    """PyYAML's composer, counting on the way what the document costs with its aliases expanded.

    Aliases are allowed, within bounds, rather than refused: anchors are plain YAML that people
    use to share settings in hand-written pipelines. What makes them dangerous is only their
    expansion (nested anchors, each repeating the previous one several times, grow exponentially
    when written out), and that is what is bounded: an alias counts as everything it stands for,
    so a "billion laughs" file is refused within a few hundred events. An alias inside the value
    it names (a structure containing itself) is refused: it cannot be written out. Mapping keys
    are checked for duplicates here, before merge keys (``<<``) are applied, so that an explicit
    key overriding a merged one (which is what merging is for) is not taken for a duplicate.
    """

    def __init__(self) -> None:
        Composer.__init__(self)  # not super(): next in a loader's MRO may be the whole loader
        self._nodes = self._chars = self._level = self._deepest = 0
        self._sizes: dict[str, _Size] = {}  # anchors whose nodes are complete
        self._open: set[str] = set()  # anchors whose nodes are being composed
        self._keys: list[set[Any]] = []  # the keys so far of each mapping being composed

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._expand(event)
            node = super().compose_node(parent, index)
        else:
            node = self._compose_counted(parent, index, event)
        if isinstance(parent, MappingNode) and index is None:  # `node` is a key of `parent`
            self._check_duplicate(node)
        return node

    def _compose_counted(self, parent: Node | None, index: Any, event: Event) -> Node:
        nodes, chars, level, outer = self._nodes, self._chars, self._level, self._deepest
        self._deepest = level
        self._add(1, len(event.value) if isinstance(event, ScalarEvent) else 0, event)
        if isinstance(event, CollectionStartEvent):
            self._reach(level + 1, event)
            self._level += 1
        mapping = isinstance(event, MappingStartEvent)
        if mapping:
            self._keys.append(set())
        if event.anchor is not None:
            self._open.add(event.anchor)
        node = super().compose_node(parent, index)
        if mapping:
            self._keys.pop()
        if event.anchor is not None:
            self._open.discard(event.anchor)
            self._sizes[event.anchor] = _Size(self._nodes - nodes, self._chars - chars,
                                              self._deepest - level)
        self._level = level
        self._deepest = max(outer, self._deepest)
        return node

    def _expand(self, event: AliasEvent) -> None:
        if event.anchor in self._open:
            raise _TooCostly(problem=f"alias *{event.anchor} is used inside the value it names "
                                     "(a structure that contains itself cannot be written out)",
                             problem_mark=event.start_mark)
        size = self._sizes.get(event.anchor)
        if size is not None:  # else undefined: the composer says so
            self._add(size.nodes, size.chars, event)
            self._reach(self._level + size.height, event)

    def _add(self, nodes: int, chars: int, event: Event) -> None:
        self._nodes += nodes
        self._chars += chars
        if self._nodes > MAX_NODES:
            raise _too_costly(event, f"more than {MAX_NODES} values (scalars, lists, mappings)")
        if self._chars > MAX_EXPANDED_CHARS:
            raise _too_costly(event, f"more than {MAX_EXPANDED_CHARS} characters of text")

    def _reach(self, depth: int, event: Event) -> None:
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            raise _too_costly(event, f"lists and mappings nested more than {MAX_DEPTH} levels deep")

    def _check_duplicate(self, node: Node) -> None:
        if not isinstance(node, ScalarNode):
            return  # a list or mapping as a key: the constructor refuses it (unhashable)
        key = node.value if node.tag == _STR_TAG else (node.tag, node.value)
        if key in self._keys[-1]:
            raise _DuplicateKey(problem=f"duplicate key {node.value!r}",
                                problem_mark=node.start_mark)
        self._keys[-1].add(key)


def _too_costly(event: Event, what: str) -> _TooCostly:
    if isinstance(event, AliasEvent):
        problem = (f"expanding alias *{event.anchor} gives the document {what} (a runner writes "
                   "aliases out in full)")
    else:
        problem = f"the document holds {what}"
    return _TooCostly(problem=problem, problem_mark=event.start_mark)


class _Loader(_BoundedComposer, _BaseLoader):  # type: ignore[misc,valid-type]
    """The safe loader (libyaml's parser where available) with the bounded composer.

    Merge keys (``<<: *defaults``) are supported rather than refused: they are plain YAML 1.1,
    the way people share settings between the stages of a hand-written pipeline, and the
    composer has already bounded what they expand to.
    """

    def __init__(self, stream: str) -> None:
        _BaseLoader.__init__(self, stream)
        _BoundedComposer.__init__(self)

    def flatten_mapping(self, node: MappingNode) -> None:
        """Apply merge keys as the YAML merge spec says: the mapping's own keys win over merged
        ones, and of several merged mappings (``<<: [*a, *b]``) the earlier one wins.

        PyYAML's own version tells keys apart by object identity, so that which of two equal
        keys wins depends on whether Python happened to share their strings.
        """
        own = [(key, value) for key, value in node.value if key.tag != _MERGE_TAG]
        sources = [source for key, value in node.value if key.tag == _MERGE_TAG
                   for source in _merge_sources(node, value)]
        for key, _ in own:
            if key.tag == _VALUE_TAG:
                key.tag = _STR_TAG
        if not sources:
            return
        seen = {_identity(key) for key, _ in own}
        merged = []
        for source in sources:
            self.flatten_mapping(source)
            for key, value in source.value:
                if _identity(key) not in seen:
                    seen.add(_identity(key))
                    merged.append((key, value))
        node.value = merged + own


def _merge_sources(node: MappingNode, value: Node) -> list[MappingNode]:
    """The mappings that ``<<: value`` merges into `node`, in order."""
    sources = value.value if isinstance(value, SequenceNode) else [value]
    for source in sources:
        if not isinstance(source, MappingNode):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"expected a mapping or list of mappings for merging, but found {source.id}",
                source.start_mark)
    return sources


def _identity(key: Node) -> Any:
    """What tells two keys apart (lists and mappings as keys are refused when constructed)."""
    return (key.tag, key.value) if isinstance(key, ScalarNode) else id(key)


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
    YAML is constructed (tags such as ``!!python/object`` are refused), within
    the bounds above, with string keys.
    """
    if len(raw) > MAX_FILE_BYTES:
        raise YamlFileError(f"{name}: the file is larger than {MAX_FILE_BYTES} bytes "
                            f"({MAX_FILE_BYTES // 2**20} MiB), the most a job file may hold")
    if not raw.strip():
        raise YamlFileError(f"{name}: the file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start})") from None
    try:
        data = _load(text)
    except yaml.constructor.ConstructorError as exc:
        raise YamlFileError(f"{name}: refused YAML construct ({exc.problem}{_where(exc)}); "
                            "only plain mappings, lists and scalars are allowed") from None
    except (_TooCostly, _KeyNotString) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlFileError(f"{name}: refused: {problem}{_where(exc)}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlFileError(f"{name}: invalid YAML: {problem}{_where(exc)}") from None
    except ValueError as exc:  # a value Python will not build: an integer of 5000 digits, say
        raise YamlFileError(f"{name}: refused value: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise YamlFileError(f"{name}: the top level is {_kind(data)}, expected a mapping of keys")
    return data


def load_scalar(text: str) -> Any:
    """One YAML value read as a job file's values are (an environment variable's, say)."""
    return _load(text)


def load_mapping(path: Path, *, follow_link: bool = False) -> dict[str, Any]:
    """The mapping in the yaml file `path`. A link is refused unless `follow_link`: a file in a
    work area is a job only as a plain file, never through a link leading elsewhere."""
    return parse_mapping(read_bounded(path, follow_link=follow_link), str(path))


def _load(text: str) -> Any:
    data = yaml.load(text, Loader=_Loader)  # a safe loader: plain YAML only
    _check_keys(data)
    return data


def read_bounded(path: Path, *, follow_link: bool = False) -> bytes:
    """At most MAX_FILE_BYTES + 1 bytes of `path`, which must be a plain file (not a link,
    unless `follow_link`).

    Opened without blocking: a FIFO put in a job's place would otherwise wait for a writer.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_link else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise YamlFileError(f"{path}: a symbolic link, not a plain file: job files are "
                                "never read through links") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise YamlFileError(f"{path}: not a plain file (a folder, FIFO, socket or device)")
    chunks: list[bytes] = []
    left = MAX_FILE_BYTES + 1
    with open(fd, "rb") as file:
        while left > 0 and (chunk := file.read(min(left, _READ_CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
    return b"".join(chunks)


def _check_keys(data: Any) -> None:
    """Refuse mapping keys that are not strings (``1:``, ``true:``, ``null:``, dates).

    Job files are read by key name everywhere, and a number as a key would fail far from the
    file with a TypeError. The mappings that runners key by value are the exception
    (`_keyed_by_value`).
    """
    found = _first_odd_key(data, "", ())
    if found is not None:
        path, key = found
        hint = "; yes, no, on, off, true and false are booleans" if isinstance(key, bool) else ""
        raise _KeyNotString(f"the key {path!r} is {_kind(key)} ({key!r}{hint}), but mapping keys "
                            "must be strings: quote it if it is meant as a name")


def _first_odd_key(value: Any, path: str, trail: tuple[Any, ...]) -> tuple[str, Any] | None:
    """The path and the key of the first mapping key in `value` that is not a string.

    `path` names `value` in messages; `trail` holds the mapping keys leading to it (None for a
    position in a list).
    """
    if isinstance(value, dict):
        by_value = _keyed_by_value(trail)
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if not (isinstance(key, str) or by_value):
                return here, key
            if (found := _first_odd_key(item, here, (*trail, key))) is not None:
                return found
    elif isinstance(value, list):
        for position, item in enumerate(value):
            if (found := _first_odd_key(item, f"{path}[{position}]", (*trail, None))) is not None:
                return found
    return None


def _keyed_by_value(trail: tuple[Any, ...]) -> bool:
    """Whether the mapping at `trail` is one that runners key by value: the aggregate processor
    records each seed's result under the seed itself, in its job (``seeds: {0: 0.91}``), and
    summarize copies that into summary.yaml (``datasets: {<dataset>: {seeds: ...}}``, or the
    same within each of its ``rows``)."""
    if trail[:2] == ("rows", None):
        trail = trail[2:]
    return trail == ("seeds",) or (len(trail) == 3 and trail[0] == "datasets"
                                   and isinstance(trail[1], str) and trail[2] == "seeds")


class _PlainDumper(_BaseDumper):  # type: ignore[misc,valid-type]
    """Writes shared values out in full: job files are read by people, not only by parsers.

    What that expansion can cost is bounded when a file is read (`_BoundedComposer`).
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


# Strings that read as such floats must be quoted when written, so that they read back as strings.
_PlainDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT,
                                   list("-+0123456789"))


def dump(data: dict[str, Any]) -> str:
    """`data` as YAML, ending with the end-of-document line ``...``: a file that ends so is
    whole (docs/PROTOCOL.md, files in flight)."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100, explicit_end=True)


def write_mapping(path: Path, data: dict[str, Any], *, must_exist: bool = False) -> None:
    """Write `data` atomically; a document no reader would take (over MAX_FILE_BYTES) is
    refused here, so that a runner never writes a job that it could not read back."""
    atomic_write(path, _writable(path, data), must_exist=must_exist)


def write_mappings(files: Sequence[tuple[Path, dict[str, Any]]],
                   checkpoint: Callable[[], None] | None = None) -> None:
    """`write_mapping` for several new files, renamed into place once all are written
    (`atomic_write_all`)."""
    atomic_write_all([(path, _writable(path, data)) for path, data in files],
                     checkpoint=checkpoint)


def _writable(path: Path, data: dict[str, Any]) -> str:
    text = dump(data)
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise YamlFileError(f"{path}: the job would be larger than {MAX_FILE_BYTES // 2**20} MiB "
                            "once written, the most a job file may hold (a grid too large for "
                            "one job? split it)")
    return text


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)
