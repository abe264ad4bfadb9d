"""TensorBoard event files, through the optional ``tensorboard`` package (the extra)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vtab.errors import VtabError

log = logging.getLogger(__name__)
NEEDS_TENSORBOARD = ("TensorBoard events need the tensorboard package, which is not installed: "
                     "pip install 'vtab[tensorboard]'")
_said: set[str] = set()


def _writer_class(missing: str | None) -> Any:
    """torch's SummaryWriter. Without the package: None, and `missing` said once per process
    as a warning; with no `missing` message, an error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if missing is None:
            raise VtabError(NEEDS_TENSORBOARD) from None
        if missing not in _said:
            log.warning(missing)
            _said.add(missing)
        return None
    return SummaryWriter


def write_scalars(folder: Path, scalars: Iterable[tuple[str, float, int]],
                  missing: str | None = None) -> bool:
    """(tag, value, step) scalars as the one run in `folder`, in place of the events an
    earlier write left there (TensorBoard would draw both); False where the package is
    missing and `missing` was said instead."""
    writer_class = _writer_class(missing)
    if writer_class is None:
        return False
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    with writer_class(log_dir=str(folder)) as writer:
        for tag, value, step in scalars:
            writer.add_scalar(tag, value, step)
    return True
