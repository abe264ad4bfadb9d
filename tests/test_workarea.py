"""The work-area protocol: claims, leases, atomic writes, locating jobs."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from vtab import fsutil, yamlio
from vtab.workarea import (
    FINISHED,
    RUNNING,
    IdTaken,
    LeaseLost,
    LeaseWatcher,
    WorkArea,
    is_valid_id,
)


def _queue_job(area: WorkArea, job_id: str) -> Path:
    path = area.root / f"{job_id}.yaml"
    yamlio.write_mapping(path, {"id": job_id})
    return path


def test_claim_is_exclusive(area: WorkArea) -> None:
    path = _queue_job(area, "job")
    other = WorkArea(area.root)
    first = area.claim(path)
    assert first is not None
    assert other.claim(path) is None
    assert first.path.parent.name == RUNNING
    assert first.path.name.startswith("job@")
    assert area.queued() == []


def test_claim_next_on_empty_queue(area: WorkArea) -> None:
    assert area.claim_next() is None


def test_hidden_and_foreign_files_are_not_jobs(area: WorkArea) -> None:
    (area.root / ".x.yaml.abc.tmp").write_text("id: x")
    (area.root / "notes.txt").write_text("hello")
    (area.root / ".hidden.yaml").write_text("id: x")
    assert area.queued() == []


def _claim_all(root: str, out: multiprocessing.Queue) -> None:
    area = WorkArea(root)
    won = []
    while (claim := area.claim_next()) is not None:
        won.append(claim.job_id)
    out.put(won)


def test_racing_processes_claim_each_job_once(area: WorkArea) -> None:
    ids = {f"job{i:03d}" for i in range(300)}
    for job_id in ids:
        _queue_job(area, job_id)
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_all, args=(str(area.root), out))
             for _ in range(6)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    claimed = [job_id for won in results for job_id in won]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert len(area.listing(RUNNING)) == len(ids)


def test_old_holder_cannot_write_or_move_after_a_takeover(area: WorkArea) -> None:
    claim = area.claim(_queue_job(area, "job"))
    assert claim is not None
    takeover = area.claim(claim.path)
    assert takeover is not None
    with pytest.raises(LeaseLost):
        area.write(claim, {"id": "job", "stale": True})
    with pytest.raises(LeaseLost):
        area.move(claim, FINISHED)
    with pytest.raises(LeaseLost):
        area.heartbeat(claim)
    assert area.read(takeover) == {"id": "job"}
    assert area.listing(RUNNING) == [takeover.path]


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "check-then-rename"])
def test_a_takeover_during_a_write_is_not_undone_by_it(area: WorkArea, exchange: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    claim = area.claim(_queue_job(area, "job"))
    assert claim is not None
    if not exchange:  # as on a filesystem without renameat2 flags (NFS)
        monkeypatch.setattr(fsutil, "_renameat2", None)
    elif not fsutil.rename_with_flags(claim.path, claim.path, fsutil.RENAME_EXCHANGE):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    monkeypatch.setattr(area, "heartbeat", lambda claim: None)  # the takeover comes after it
    takeover = area.claim(claim.path)
    assert takeover is not None
    with pytest.raises(LeaseLost):
        area.write(claim, {"id": "job", "stale": True})
    assert area.listing(RUNNING) == [takeover.path]  # the old claim file did not come back
    assert area.read(takeover) == {"id": "job"}
    assert [p.name for p in area.folder(RUNNING).iterdir()] == [takeover.path.name]


def test_write_replaces_content_atomically_and_leaves_no_temporary_files(area: WorkArea) -> None:
    claim = area.claim(_queue_job(area, "job"))
    assert claim is not None
    area.write(claim, {"id": "job", "result": 0.5})
    assert area.read(claim)["result"] == 0.5
    assert sorted(p.name for p in claim.path.parent.iterdir()) == [claim.path.name]
    target = area.move(claim, FINISHED)
    assert target == area.folder(FINISHED) / "job.yaml"


def test_lease_watcher_judges_by_its_own_observation(area: WorkArea) -> None:
    claim = area.claim(_queue_job(area, "job"))
    assert claim is not None
    os.utime(claim.path, (0, 0))  # a claim file stamped in 1970: clocks are not compared
    watcher = LeaseWatcher(timeout=0.3)
    assert watcher.stale(area.folder(RUNNING), set()) == []
    time.sleep(0.2)
    area.heartbeat(claim)
    assert watcher.stale(area.folder(RUNNING), set()) == []  # the stamp moved: alive
    time.sleep(0.35)
    assert watcher.stale(area.folder(RUNNING), set()) == [claim.path]
    assert watcher.stale(area.folder(RUNNING), {claim.token}) == []  # never our own


OWNER = {"pipeline": "p", "parent": "p"}


def test_create_queues_jobs_together_and_reserves_every_id_first(
        area: WorkArea, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = {job_id: {"id": job_id, "pipeline": "p"} for job_id in ("a", "b", "c")}
    assert area.reserve("c", {"pipeline": "other"}) is None
    with pytest.raises(IdTaken):
        area.create(jobs, OWNER)
    assert area.queued() == []  # nothing queued: the taken id was found before any write
    del jobs["c"]
    # Left by a fork killed between its writes and its renames: this fork's are removed.
    for name in ("a.yaml", "other.yaml"):
        (area.root / f".{name}.0123456789ab.tmp").write_text("half")
    queue_at_first_rename: list[list[str]] = []
    replace = os.replace

    def watched(src: object, dst: object) -> None:
        if not queue_at_first_rename:
            queue_at_first_rename.append(sorted(p.name for p in area.root.iterdir()
                                                if p.name.endswith(".tmp")))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watched)
    assert area.create(jobs, OWNER) == ["a", "b"]
    # Both files were written before the first appeared in the queue; a's stale one was gone.
    assert [name.split(".")[1] for name in queue_at_first_rename[0]] == ["a", "b", "other"]
    assert sorted(p.name for p in area.queued()) == ["a.yaml", "b.yaml"]
    assert [p.name for p in area.root.glob(".*.tmp")] == [".other.yaml.0123456789ab.tmp"]


def test_locate_and_create(area: WorkArea) -> None:
    assert area.create({"a": {"id": "a", "pipeline": "p"}}, OWNER) == ["a"]
    assert area.create({"a": {"id": "a", "pipeline": "p"}}, OWNER) == []  # a retried fork
    assert area.locate("a") == area.root / "a.yaml"
    claim = area.claim(area.root / "a.yaml")
    assert claim is not None
    assert area.locate("a") == claim.path
    area.move(claim, FINISHED)
    assert area.locate("a") == area.folder(FINISHED) / "a.yaml"
    assert area.create({"a": {"id": "a", "pipeline": "p"}}, OWNER) == []  # finished: existing
    jobs = area.summarized_jobs("p")
    jobs.mkdir(parents=True)
    os.replace(area.folder(FINISHED) / "a.yaml", jobs / "a.yaml")
    assert area.locate("a", "p") == jobs / "a.yaml"
    assert area.done_path("a", "p") == jobs / "a.yaml"


@pytest.mark.parametrize("job_id", ["../evil", "a/b", ".hidden", "a@b", "", "x" * 201, "a b"])
def test_invalid_ids(job_id: str) -> None:
    assert not is_valid_id(job_id)


@pytest.mark.parametrize("job_id", ["debug", "debug__digits__tune__lr=0.1_seed=0", "p-1.5+x"])
def test_valid_ids(job_id: str) -> None:
    assert is_valid_id(job_id)
