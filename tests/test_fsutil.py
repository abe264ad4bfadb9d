"""Atomic writes and the replace-only-if-present rename under them."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from vtab import fsutil


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "check-then-rename"])
def test_replace_existing_replaces_only_a_file_that_is_there(
        tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr(fsutil, "_renameat2", None)
    src, dst = tmp_path / "new", tmp_path / "old"
    src.write_text("new")
    with pytest.raises(FileNotFoundError):
        fsutil.replace_existing(src, dst)
    assert _files(tmp_path) == ["new"]  # nothing created, the source kept
    dst.write_text("old")
    fsutil.replace_existing(src, dst)
    assert _files(tmp_path) == ["old"] and dst.read_text() == "new"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM])
def test_an_unsupported_exchange_falls_back_to_check_then_rename(
        tmp_path: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*_args: object) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(fsutil, "_renameat2", unsupported)
    src, dst = tmp_path / "new", tmp_path / "old"
    src.write_text("new")
    dst.write_text("old")
    assert fsutil.rename_with_flags(src, dst, fsutil.RENAME_EXCHANGE) is False
    fsutil.replace_existing(src, dst)
    assert _files(tmp_path) == ["old"] and dst.read_text() == "new"


def test_other_exchange_errors_are_raised(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(*_args: object) -> int:
        ctypes.set_errno(errno.EXDEV)
        return -1

    monkeypatch.setattr(fsutil, "_renameat2", cross_device)
    with pytest.raises(OSError) as caught:
        fsutil.rename_with_flags(tmp_path / "a", tmp_path / "b", fsutil.RENAME_EXCHANGE)
    assert caught.value.errno == errno.EXDEV


def test_atomic_write_must_exist_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "job.yaml"
    with pytest.raises(FileNotFoundError):
        fsutil.atomic_write(target, "x: 1\n", must_exist=True)
    assert _files(tmp_path) == []
    target.write_text("x: 0\n")
    fsutil.atomic_write(target, "x: 1\n", must_exist=True)
    assert _files(tmp_path) == ["job.yaml"] and target.read_text() == "x: 1\n"


def test_atomic_write_all_renames_only_once_every_file_is_written(tmp_path: Path) -> None:
    files = [(tmp_path / f"{name}.yaml", name) for name in ("a", "b")]
    fsutil.atomic_write_all(files)
    assert _files(tmp_path) == ["a.yaml", "b.yaml"] and (tmp_path / "b.yaml").read_text() == "b"
    with pytest.raises(FileNotFoundError):  # the second file cannot be written
        fsutil.atomic_write_all([(tmp_path / "c.yaml", "c"), (tmp_path / "gone" / "d.yaml", "d")])
    assert _files(tmp_path) == ["a.yaml", "b.yaml"]  # c was never renamed in; no temporary left


def test_atomic_write_all_keeps_what_it_renamed_when_a_rename_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replace, renames = os.replace, []

    def second_fails(src: object, dst: object) -> None:
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(errno.EIO, "injected")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    checkpoints: list[list[str]] = []
    with pytest.raises(OSError):
        fsutil.atomic_write_all([(tmp_path / "a.yaml", "a"), (tmp_path / "b.yaml", "b")],
                                checkpoint=lambda: checkpoints.append(_files(tmp_path)))
    assert _files(tmp_path) == ["a.yaml"]  # renamed before the failure; b's temporary removed
    assert [len(seen) for seen in checkpoints] == [2, 2]  # both written; then a in, b's temp
    assert fsutil.temp_target(fsutil.temp_path_for(tmp_path / "c.yaml").name) == "c.yaml"
    assert fsutil.temp_target("c.yaml") is None
