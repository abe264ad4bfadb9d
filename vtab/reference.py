"""The key reference of docs/PIPELINES.md, generated from the schemas so that it cannot drift.

``python -m vtab.reference`` prints it; ``python -m vtab.reference --write docs/PIPELINES.md``
(``make docs``) puts it between the markers there. tests/test_schema.py checks that the document
holds exactly this text.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vtab import kinds, processors  # noqa: F401  (registers kinds and processors)
from vtab.pipeline import KINDS, PROCESSORS
from vtab.schema import key_reference

BEGIN = "<!-- keys: generated from the schemas by `python -m vtab.reference`; do not edit -->"
END = "<!-- end of keys -->"


def markdown() -> str:
    """Every key of every job kind's config and of every processor's options (vtab's own: not
    those a program that uses vtab registers)."""
    schemas = {f"Job kind `{name}` (the job's `config` with the stage's overrides)": kind.schema
               for name, kind in KINDS.items() if _ours(kind.run)}
    schemas |= {f"Processor `{name}` (keys under `stages.<stage>.processor`)": processor.options
                for name, processor in PROCESSORS.items() if _ours(processor.run)}
    return key_reference(schemas)


def _ours(function: object) -> bool:
    return getattr(function, "__module__", "").startswith("vtab.")


def replace_in(document: str) -> str:
    """`document` with the text between the markers replaced by the current reference."""
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{markdown()}\n{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        for name in sys.argv[2:]:
            Path(name).write_text(replace_in(Path(name).read_text()))
    else:
        print(markdown(), end="")
