"""Atomic file writes: readers see the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """A unique hidden name beside `path` (same filesystem, so a rename is atomic).

    The name starts with a dot and does not end in the target's suffix, so
    folder scans that look for ``*.yaml`` never pick it up.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` to `path` through a temporary file and a rename.

    With `durable`, the data is flushed to storage before the rename, so that
    a crash (or another NFS client) cannot observe the new name with old or
    missing content. On failure the temporary file is removed and `path` is
    left as it was.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def append_line(path: Path | str, line: str) -> None:
    """Append one line durably; O_APPEND keeps lines of concurrent writers whole."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
