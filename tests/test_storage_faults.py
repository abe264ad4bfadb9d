"""Storage faults: a full disk, an unwritable folder, a job file deleted while it runs.

Corrupted and truncated feature-cache files are covered in test_eval_features.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import drain, queue
from tests.test_processes import start_runner, wait_for
from vtab import workarea, yamlio
from vtab.runner import CRASHED_EXIT
from vtab.workarea import CRASHED, FINISHED, RUNNING, WorkArea


def _sleep_job(log: Path, seconds: float = 0.0) -> dict[str, Any]:
    return {"name": "job", "current_stage": "run",
            "config": {"sleep": {"seconds": seconds, "log": str(log), "result": 0.5}},
            "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}


FAST = {"storage_backoff": 0.01, "storage_failures": 3}


def test_results_that_cannot_be_written_are_retried(area: WorkArea, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = yamlio.write_mapping
    failures = []

    def full_disk_twice(path: Path, data: dict[str, Any], **options: Any) -> None:
        if "result" in data and len(failures) < 2:
            failures.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, **options)

    monkeypatch.setattr(workarea.yamlio, "write_mapping", full_disk_twice)
    queue(area, _sleep_job(tmp_path / "log"), "job.yaml")
    assert drain(area, **FAST) == 0
    assert len(failures) == 2
    assert yamlio.load_mapping(area.folder(FINISHED) / "job.yaml")["result"] == 0.5
    assert len((tmp_path / "log").read_text().splitlines()) == 3  # retried, nothing lost


def test_a_runner_stops_when_the_work_area_stays_unwritable(
        area: WorkArea, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, data: dict[str, Any], **options: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    queue(area, _sleep_job(tmp_path / "log"), "job.yaml")
    before = (area.root / "job.yaml").read_bytes()
    monkeypatch.setattr(workarea.yamlio, "write_mapping", no_space)
    assert drain(area, **FAST) == 2
    assert (area.root / "job.yaml").read_bytes() == before  # back in the queue, unchanged
    assert area.listing(RUNNING) == []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0, reason="needs root")
def test_a_really_full_disk_loses_nothing(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "256k") as small:
        area = WorkArea(small / "work")
        queue(area, _sleep_job(tmp_path / "log"), "job.yaml")
        filler = small / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        assert drain(area, **FAST) == 2  # cannot write: the runner gives up, job kept
        assert [p.name for p in area.queued()] == ["job.yaml"]
        filler.unlink()
        assert drain(area) == 0
        assert yamlio.load_mapping(area.folder(FINISHED) / "job.yaml")["result"] == 0.5


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_an_unwritable_finished_folder_keeps_the_job(area: WorkArea, tmp_path: Path) -> None:
    queue(area, _sleep_job(tmp_path / "log"), "job.yaml")
    finished = area.folder(FINISHED)
    if subprocess.run(["chattr", "+i", str(finished)], capture_output=True).returncode != 0:
        pytest.skip("the filesystem has no immutable attribute")
    try:
        assert drain(area, **FAST) == 2
        assert [p.name for p in area.queued()] == ["job.yaml"]
        assert yamlio.load_mapping(area.root / "job.yaml")["result"] == 0.5  # result kept
    finally:
        subprocess.run(["chattr", "-i", str(finished)], check=True)
    assert drain(area) == 0
    assert (finished / "job.yaml").exists()
    assert len((tmp_path / "log").read_text().splitlines()) == 1  # the result was not redone


def test_a_job_file_deleted_while_running_is_kept_in_crashed(area: WorkArea,
                                                           tmp_path: Path) -> None:
    queue(area, _sleep_job(tmp_path / "log", seconds=2.0), "job.yaml")
    runner = start_runner(area, "--devices", "cpu")
    wait_for(lambda: _lease_written(area))  # the runner has read the job: it has content to keep
    area.listing(RUNNING)[0].unlink()
    output, _ = runner.communicate(timeout=60)
    assert runner.returncode == CRASHED_EXIT, output
    crashed = yamlio.load_mapping(area.folder(CRASHED) / "job.yaml")
    assert "deleted while this runner held it" in crashed["error"]["message"]
    assert crashed["current_stage"] == "run"


def _lease_written(area: WorkArea) -> bool:
    try:
        return any("lease" in yamlio.load_mapping(p) for p in area.listing(RUNNING))
    except OSError:  # renamed between the listing and the read
        return False


def test_the_feature_cache_on_a_full_disk_fails_the_job_with_the_reason(
        tmp_path: Path, digits_root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with _tmpfs(tmp_path / "cache", "1m") as cache:
        area = WorkArea(tmp_path / "work")
        queue(area, {"name": "probe", "current_stage": "run", "config": {
            "dataset": "digits", "data": {"root": str(digits_root)},
            "backbone": {"name": "resnet18", "weights": "none"},
            "features": {"image_size": 32}, "optim": {"lr": 0.1, "epochs": 1}},
            "stages": {"run": {"hyperparams": {"kind": "linear_probe"}}}}, "probe.yaml")
        assert drain(area, cache_dir=cache, max_attempts=2) == CRASHED_EXIT
        error = yamlio.load_mapping(area.folder(CRASHED) / "probe.yaml")["error"]
        assert "No space left on device" in error["message"]
        assert error["attempt"] == 2
        assert not list(cache.rglob("*.npy"))  # no half-written cache entry left behind
