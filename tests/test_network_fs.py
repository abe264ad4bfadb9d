"""The work area on a filesystem that refuses RENAME_EXCHANGE, for real: a FUSE mount (bindfs).

NFS, Lustre and FUSE refuse renameat2 flags, and vtab then rewrites a claim file by checking
that it exists and renaming over it (vtab/fsutil.py, docs/PROTOCOL.md "Limits"). Here the
contention and chaos suites run on such a mount instead of a mocked errno.

Needs root, `bindfs` and /dev/fuse; otherwise the tests skip and say which is missing (CI
installs bindfs: see .ci/run).

Sizes, smaller than the local-disk suites' so that the module takes well under a minute on two
cores: VTAB_FUSE_CONTENTION_JOBS (default 300), VTAB_FUSE_CONTENTION_RUNNERS (default 6),
VTAB_FUSE_CHAOS_SEEDS (default 2 killer seeds), VTAB_FUSE_CHAOS_KILLS (default 8 kills per run),
VTAB_FUSE_CHAOS_CRASH_PROBABILITY (default 0.01 per protocol step).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_chaos import check_random_kills
from tests.test_contention import drain_tiny_jobs
from vtab import fsutil, yamlio
from vtab.workarea import RUNNING, LeaseLost, WorkArea

JOBS = int(os.environ.get("VTAB_FUSE_CONTENTION_JOBS", "300"))
RUNNERS = int(os.environ.get("VTAB_FUSE_CONTENTION_RUNNERS", "6"))
SEEDS = int(os.environ.get("VTAB_FUSE_CHAOS_SEEDS", "2"))
KILLS = int(os.environ.get("VTAB_FUSE_CHAOS_KILLS", "8"))
CRASH_PROBABILITY = os.environ.get("VTAB_FUSE_CHAOS_CRASH_PROBABILITY", "0.01")
# Job bodies ten times longer than the local chaos suite's: with fewer kills, a run must still
# kill runners that hold jobs (it checks that leases were recovered), not only idle ones.
CHAOS_JOB_SECONDS = 0.1

RENAME_NOREPLACE = 1  # linux/fs.h; fsutil names only the flag it uses
_libc = ctypes.CDLL(None, use_errno=True)


def _mount_problem() -> str | None:
    """Why a bindfs mount cannot be tried here, or None."""
    if os.geteuid() != 0:
        return "not root: mounting bindfs for these tests needs root"
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (Debian: apt-get install bindfs)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is missing or not usable"
    if getattr(_libc, "renameat2", None) is None:
        return "the C library has no renameat2 (glibc 2.28+)"
    return None


def _unmount(mount: Path) -> None:
    """Unmount however it works; a mount left behind breaks pytest's cleanup of old temp folders.

    A runner killed a moment ago may still hold a file open, hence the retries, and the lazy
    unmount (detach now, finish when the last user goes) as the last resort.
    """
    tries = [["umount", str(mount)], ["fusermount", "-u", str(mount)]] * 5
    for command in [*tries, ["umount", "-l", str(mount)]]:
        if not os.path.ismount(mount):
            return
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run(command, capture_output=True, timeout=30, check=False).returncode:
            time.sleep(0.2)
    assert not os.path.ismount(mount), f"could not unmount {mount}"


@pytest.fixture
def fuse_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on a bindfs (FUSE) mount of a folder of `tmp_path`; unmounted after."""
    problem = _mount_problem()
    if problem:
        pytest.skip(problem)
    source, mount = tmp_path / "disk", tmp_path / "fuse"
    source.mkdir()
    mount.mkdir()
    mounted = subprocess.run(["bindfs", str(source), str(mount)], capture_output=True,
                             text=True, timeout=60, check=False)
    try:
        if mounted.returncode != 0 or not os.path.ismount(mount):
            pytest.skip(f"mounting bindfs failed (exit code {mounted.returncode}): "
                        f"{mounted.stderr.strip() or 'no mount appeared'}")
        yield mount
    finally:
        _unmount(mount)


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """renameat2(2) itself: 0 on success, else the errno (fsutil would hide EINVAL)."""
    if _libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


def test_the_mount_refuses_rename_exchange_and_vtab_falls_back(
        fuse_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, free = fuse_dir / "first", fuse_dir / "second", fuse_dir / "free"
    first.write_text("1")
    second.write_text("2")
    assert _renameat2(first, second, fsutil.RENAME_EXCHANGE) in (errno.EINVAL, errno.EOPNOTSUPP)
    assert (first.read_text(), second.read_text()) == ("1", "2")  # nothing exchanged
    # The kernel refuses a RENAME_NOREPLACE onto an existing name before asking the filesystem;
    # whether the filesystem takes the flag at all depends on the FUSE library (libfuse 2: no).
    assert _renameat2(first, second, RENAME_NOREPLACE) == errno.EEXIST
    assert _renameat2(first, free, RENAME_NOREPLACE) in (0, errno.EINVAL)
    assert _renameat2(second, fuse_dir / "third", 0) == 0  # a plain rename (claims, moves)

    # vtab's own write path, observed (not mocked): the exchange is asked for, refused, and
    # the check-then-rename fallback replaces the claim file.
    decisions: list[bool] = []
    real = fsutil.rename_with_flags

    def observed(src: Path, dst: Path, flags: int) -> bool:
        decisions.append(real(src, dst, flags))
        return decisions[-1]

    monkeypatch.setattr(fsutil, "rename_with_flags", observed)
    area = WorkArea(fuse_dir / "work")
    yamlio.write_mapping(area.root / "job.yaml", {"id": "job"})
    claim = area.claim(area.root / "job.yaml")
    assert claim is not None
    area.write(claim, {"id": "job", "result": 0.5})
    assert decisions == [False]  # the fallback, taken because the mount refused the exchange
    assert area.read(claim) == {"id": "job", "result": 0.5}
    assert [p.name for p in area.folder(RUNNING).iterdir()] == [claim.path.name]  # no temp left

    # A write after a takeover brings nothing back (the kernel finds no claim file before it
    # asks the filesystem about the flag); only a takeover inside the window can (Limits).
    takeover = area.claim(claim.path)
    assert takeover is not None
    with pytest.raises(LeaseLost):
        area.write(claim, {"id": "job", "stale": True})
    assert [p.name for p in area.folder(RUNNING).iterdir()] == [takeover.path.name]
    assert area.read(takeover) == {"id": "job", "result": 0.5}


@pytest.mark.slow
def test_many_runners_drain_tiny_jobs_exactly_once_on_fuse(fuse_dir: Path,
                                                          tmp_path: Path) -> None:
    # The execution log is the witness, kept on the local disk beside the mount.
    drain_tiny_jobs(WorkArea(fuse_dir / "work"), tmp_path / "executions.log", JOBS, RUNNERS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_kills_do_not_change_the_outcome_on_fuse(fuse_dir: Path, tmp_path: Path,
                                                        seed: int) -> None:
    outcome = check_random_kills(fuse_dir, tmp_path / "executions.log", seed, KILLS,
                                 CRASH_PROBABILITY, CHAOS_JOB_SECONDS)
    print(f"chaos on FUSE, seed {seed}: {outcome}")  # shown with -s, and on failure
