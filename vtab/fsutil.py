"""Atomic file writes: readers see the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def temp_path_for(path: Path) -> Path:
    """A unique hidden name beside `path` (same filesystem, so a rename is atomic).

    The name starts with a dot and does not end in the target's suffix, so
    folder scans that look for ``*.yaml`` never pick it up.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")


def temp_target(name: str) -> str | None:
    """The name of the file that a temporary file named `name` (`temp_path_for`) was to
    become; None for any other name."""
    match = _TEMP_NAME.fullmatch(name)
    return match[1] if match else None


RENAME_NOREPLACE = 1  # renameat2(2) flags (linux/fs.h)
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# "Not here": no such call (ENOSYS), a filesystem without the flag (EINVAL: NFS, Lustre, FUSE),
# or a sandbox that forbids the call (EPERM; a real permission error resurfaces in the fallback).
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def rename_with_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the system or filesystem lacks it (NFS does).

    Errors other than "not supported" are raised as OSError (ENOENT, EEXIST, ...).
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def replace_existing(src: Path, dst: Path) -> None:
    """Rename `src` over `dst` only if `dst` exists, else raise FileNotFoundError.

    Atomic where the filesystem supports RENAME_EXCHANGE (the old content lands at `src` and is
    removed); elsewhere a check then a rename, which a rename of `dst` away can slip between.
    """
    if rename_with_flags(src, dst, RENAME_EXCHANGE):
        with contextlib.suppress(OSError):  # `dst` is replaced; `src` now holds the old content
            src.unlink()
        return
    if not dst.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file to replace", str(dst))
    os.replace(src, dst)


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError then).

    Atomic with RENAME_NOREPLACE where the filesystem has it; elsewhere a hard link (which NFS
    makes atomically, failing with EEXIST) and the removal of `src`.
    """
    if rename_with_flags(src, dst, RENAME_NOREPLACE):
        return
    os.link(src, dst)
    with contextlib.suppress(FileNotFoundError):  # an NFS retransmit of a removal that worked
        os.unlink(src)


def create_new(path: Path, data: bytes | str) -> bool:
    """Write `path` whole unless it exists: True if this call created it, False if it was there.

    The content goes to a temporary file first and is linked into place, so that a reader never
    sees a part, and of two writers racing for one name exactly one wins (NFS included).
    """
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return True


def atomic_write(path: Path, data: bytes | str, *, durable: bool = True,
                 must_exist: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename.

    With `durable`, the data is flushed to storage before the rename, so that
    a crash (or another NFS client) cannot observe the new name with old or
    missing content. With `must_exist`, `path` is only replaced, never created
    (FileNotFoundError if it is gone). On failure the temporary file is removed
    and `path` is left as it was.
    """
    tmp = _written_temp(path, data, durable)
    try:
        if must_exist:
            replace_existing(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_all(files: Sequence[tuple[Path, bytes | str]], *, durable: bool = True,
                     checkpoint: Callable[[], None] | None = None) -> None:
    """`atomic_write` for several files, renamed into place one after another only once all are
    written: a reader scanning their folder sees them appear a rename apart, not a write and a
    flush apart. On failure the files not yet renamed are left as they were. `checkpoint` is
    called once all are written and after each rename (crash points, for tests)."""
    temps: list[tuple[Path, Path]] = []
    renamed = 0
    try:
        for path, data in files:
            temps.append((_written_temp(path, data, durable), path))
        for tmp, path in temps:
            if checkpoint is not None:
                checkpoint()
            os.replace(tmp, path)
            renamed += 1
        if checkpoint is not None:
            checkpoint()
    except BaseException:
        for tmp, _ in temps[renamed:]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _written_temp(path: Path, data: bytes | str, durable: bool) -> Path:
    """A temporary file beside `path` holding `data` (removed again if writing fails)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def append_line(path: Path | str, line: str) -> None:
    """Append one line durably; O_APPEND keeps lines of concurrent writers whole."""
    # Never through a link, never waiting on a FIFO (no reader: ENXIO).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_hex(handle: BinaryIO, chunk: int = 2**20) -> str:
    """The sha256 of what remains to be read from `handle`, read in chunks (hashlib's
    file_digest does this from Python 3.11 on)."""
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def safe_name(label: str) -> str:
    """`label` as a file name part: runs of other characters than letters, digits, ``._-``
    become ``_`` (``layer3:avg`` -> ``layer3_avg``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")
