"""Runners: processes that claim jobs from a work area and drive them through their stages.

One runner per device. A runner never dies of a bad job: input errors crash
the job (the error goes into its yaml), unexpected errors are retried up to a
limit. SIGTERM, SIGINT and SIGUSR1 (SLURM's usual warning signal) return the
job in hand to the queue at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from vtab import kinds, processors, provenance, yamlio  # noqa: F401  (registers kinds and processors)
from vtab.errors import ConfigError, RunnerEnvironmentError, VtabError
from vtab.pipeline import (
    DEFAULT_MAX_GRID_POINTS,
    Advance,
    Finish,
    StageContext,
    Wait,
    check_plan,
    execute_stage,
    join,
    missing_children,
    prepare_root,
    validate,
)
from vtab.workarea import (
    CRASHED,
    FINISHED,
    RUNNING,
    SUFFIX,
    WAITING,
    AreaSettings,
    Claim,
    LeaseLost,
    LeaseWatcher,
    StorageError,
    UnsafeFolder,
    WorkArea,
    describe_owner,
    is_valid_id,
    is_whole,
)

log = logging.getLogger("vtab.runner")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Exit codes (README, "Exit codes"); a stop signal N gives 128 + N.
DRAINED_EXIT = 0  # everything this runner worked on ended finished or summarized
CANNOT_RUN_EXIT = 2  # this runner cannot run jobs here (devices, install, storage); bad arguments
BLOCKED_EXIT = 3  # drained, but jobs are left in waiting/ on crashed or missing children
CRASHED_EXIT = 4  # drained, but jobs this runner worked on crashed and are still in crashed/


class NotSettled(Exception):
    """A queued file that may still be being written: it goes back untouched, for later."""

    def __init__(self, seconds: float, written_ago: float | None) -> None:
        super().__init__(f"may still be being written; looked at again in {seconds:.1f} s")
        self.seconds = seconds
        self.written_ago = written_ago


class StopRequested(BaseException):
    """Raised in the main thread by a stop signal while a job body runs.

    A BaseException, so that a job's own ``except Exception`` does not swallow it.
    """


@dataclass
class RunnerSettings:
    # The work area's own (meta/settings.yaml) when None; a value given must agree with it.
    lease_timeout: float | None = None
    settle_time: float | None = None
    poll_interval: float = 0.5
    sweep_interval: float = 1.0
    max_attempts: int = 3
    idle_limit: float | None = None
    max_jobs: int | None = None
    num_workers: int = 0
    cache_dir: Path | None = None
    max_grid_points: int = DEFAULT_MAX_GRID_POINTS
    progress: bool = True
    storage_backoff: float = 5.0  # seconds to wait after a failed write, doubled each time
    storage_failures: int = 5  # consecutive failed writes after which the runner stops
    host: str = field(default_factory=socket.gethostname)
    trusted_modules: tuple[str, ...] = ()

    def area_settings(self) -> dict[str, float]:
        """The settings this runner asks of the work area (those given)."""
        wanted = {"lease_timeout": self.lease_timeout, "settle_time": self.settle_time}
        return {key: value for key, value in wanted.items() if value is not None}


class Heartbeat(threading.Thread):
    """Touches every claim this runner holds, so other runners see it alive."""

    def __init__(self, area: WorkArea, interval: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.area = area
        self.interval = interval
        self._claims: set[Claim] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def hold(self, claim: Claim) -> None:
        with self._lock:
            self._claims.add(claim)

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self._claims.discard(claim)

    def tokens(self) -> set[str]:
        with self._lock:
            return {c.token for c in self._claims}

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            with self._lock:
                claims = list(self._claims)
            for claim in claims:
                try:
                    self.area.heartbeat(claim)
                except LeaseLost:  # moved on by this runner a moment ago, or taken over
                    # (a takeover is reported where the job's own next step fails)
                    log.debug("heartbeat: %s is no longer held", claim.job_id)
                    self.drop(claim)
                except OSError as exc:  # a storage hiccup: the next beat may succeed
                    log.warning("heartbeat of %s failed: %s", claim.job_id, exc)

    def stop(self) -> None:
        self._stop_event.set()


class Runner:
    """Drains a work area: claim, run stages, move; reap stale claims; release joins."""

    def __init__(self, area: WorkArea, settings: RunnerSettings, device: str = "cpu",
                 name: str | None = None) -> None:
        self.area = area
        self.settings = settings
        self.device = device
        self.id = name or f"{settings.host}:{os.getpid()}:{device}"
        self.ctx = StageContext(area=area, device=device, cache_dir=settings.cache_dir,
                                num_workers=settings.num_workers, progress=settings.progress,
                                max_grid_points=settings.max_grid_points, runner=self.id,
                                host=settings.host, trusted_modules=settings.trusted_modules)
        self.stop_signal: int | None = None
        self.broken: str | None = None  # why this runner cannot run jobs at all
        try:
            self.protocol = area.settings(settings.area_settings())  # ConfigError if they differ
        except StorageError as exc:  # a full disk, say: run() stops at once and says why
            self.protocol = AreaSettings(**settings.area_settings())
            self.broken = f"the work area's settings cannot be written: {exc}"
        self.watcher = LeaseWatcher(self.protocol.lease_timeout)
        self.heartbeat = Heartbeat(area, self.protocol.lease_timeout / 6)
        self.crashed: dict[Path, tuple[str, str]] = {}  # crash record -> (pipeline, first error)
        self._storage_failures = 0
        self._interruptible = False
        self._last_sweep = 0.0
        self._strays_seen: set[str] = set()
        self._later: dict[str, float] = {}  # queued names left alone until then (monotonic)
        self._watched: dict[str, tuple[float, Any]] = {}  # unsettled files: since, (size, ino)
        # Parents that were not waiting when a child of theirs finished: looked for at the end.
        self._parents: dict[str, tuple[str, Any]] = {}
        self.jobs_done = 0
        self.claims = 0
        self.busy_seconds = 0.0  # time spent on claimed jobs

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Work until the area is drained, the idle limit passes or a stop signal comes."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self.heartbeat.start()
        log.info("runner %s started on %s", self.id, self.area.root)
        started = time.monotonic()
        try:
            return self._loop()
        finally:
            up = time.monotonic() - started
            # The last line: what this runner did with its time (an allocation's, under SLURM).
            log.info("runner %s: %d job(s) run, %d claim(s); busy %.0f s, idle %.0f s of %.0f s",
                     self.id, self.jobs_done, self.claims, self.busy_seconds,
                     up - self.busy_seconds, up)
            self.heartbeat.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        idle_since = time.monotonic()
        quiet_checks = 0
        while self.stop_signal is None and self.broken is None:
            before = time.monotonic()
            if self.step():
                idle_since, quiet_checks = time.monotonic(), 0
                self.busy_seconds += idle_since - before
                if self.settings.max_jobs is not None and self.claims >= self.settings.max_jobs:
                    log.info("handled %d jobs (--max_jobs); exiting", self.claims)
                    break
                continue
            quiet_checks = quiet_checks + 1 if self._drained() else 0
            if quiet_checks >= 2:  # twice in a row, so a job in flight between folders is seen
                if self._report_blocked() + self._report_orphans():
                    return self._exit_code(blocked=True)
                log.info("work area drained after %d jobs of this runner: nothing queued, "
                         "running or waiting; exiting", self.jobs_done)
                break
            limit = self.settings.idle_limit
            if limit is not None and time.monotonic() - idle_since > limit:
                log.info("no work for %.0f s (--idle_limit); exiting", limit)
                break
            self._pause(self.settings.poll_interval)
        return self._exit_code(blocked=False)

    def _exit_code(self, blocked: bool) -> int:
        """What happened, the worst first: a stop signal, a runner that cannot run jobs here,
        waiting jobs blocked on crashed ones, jobs of this runner that crashed, else drained."""
        if self.stop_signal is not None:
            log.info("stopped by signal %d after %d jobs", self.stop_signal, self.jobs_done)
            return 128 + self.stop_signal
        if self.broken is not None:
            log.error("this runner cannot run jobs, stopping: %s", self.broken)
            return CANNOT_RUN_EXIT
        if blocked:
            return BLOCKED_EXIT
        return CRASHED_EXIT if self._report_crashed() else DRAINED_EXIT

    def _report_crashed(self) -> bool:
        """Name the pipelines whose jobs this runner crashed (those still in crashed/)."""
        still = {path: entry for path, entry in self.crashed.items() if path.exists()}
        by_pipeline: dict[str, list[tuple[str, str]]] = {}
        for path, (pipeline, error) in still.items():
            by_pipeline.setdefault(pipeline, []).append((path.stem, error))
        for pipeline, jobs in sorted(by_pipeline.items()):
            first_id, first_error = jobs[0]
            log.error("pipeline %s: %d job(s) crashed; the first, %s: %s", pipeline, len(jobs),
                      first_id, first_error)
        if still:
            log.error("%d job(s) crashed (in %s; fix the cause and move them back into the "
                      "work area to retry); exiting with code %d", len(still),
                      self.area.folder(CRASHED), CRASHED_EXIT)
        return bool(still)

    def step(self) -> bool:
        """One unit of work: a sweep when due, then one claim. True if anything happened."""
        moved = False
        if time.monotonic() - self._last_sweep >= self.settings.sweep_interval:
            moved = self.sweep()
            if self.broken is not None:  # the sweep found the area unsafe: claim nothing
                return moved
        now = time.monotonic()
        later = {name for name, when in self._later.items() if when > now}
        try:
            claim = self.area.claim_next(later) if self.stop_signal is None else None
        except StorageError as exc:
            self._storage_trouble(None, exc)
            return False
        except UnsafeFolder as exc:  # running/ swapped for a link since the last sweep
            self.broken = str(exc)
            return False
        if claim is None:
            return moved
        if self.process(claim):
            self.claims += 1
            return True
        return moved

    def sweep(self) -> bool:
        """Return stale claims to the queue and release waiting jobs whose children are done."""
        self._last_sweep = time.monotonic()
        moved = False
        try:
            self.area.check_folders()
            self.area.settings(self.protocol.model_dump())  # changed under this runner?
        except VtabError as exc:
            self.broken = f"{exc} (the work area changed under this runner)"
            return False
        except StorageError:  # cannot write the settings back: the writes below will say so
            pass
        try:
            self._warn_about_strays()
            for stale in self.watcher.stale(self.area.folder(RUNNING), self.heartbeat.tokens()):
                moved |= self.recover(stale)
            for path in self.area.listing(WAITING):
                moved |= self.try_release(path.name[: -len(SUFFIX)])
        except StorageError as exc:  # a claim taken here stays in running/ until its lease ends
            self._storage_trouble(None, exc)
        except UnsafeFolder as exc:
            self.broken = str(exc)
        return moved

    def _warn_about_strays(self) -> None:
        """Say once what is queued under a job's name but is not one (a link, a FIFO, a name
        that is not a job id): it is left alone, and would otherwise wait there unexplained."""
        for name, why in self.area.strays():
            if name not in self._strays_seen:
                self._strays_seen.add(name)
                log.warning("%s in the work area is not a job and is left alone: %s", name, why)

    def _drained(self) -> bool:
        return not self.area.queued() and not self.area.listing(RUNNING) and not self.sweep()

    def _report_blocked(self) -> int:
        """Name the waiting jobs that nothing will release; return how many there are."""
        blocked = self.area.listing(WAITING)
        for path in blocked:
            try:
                missing = missing_children(doc := yamlio.load_mapping(path), self.area)
            except Exception:  # broken by hand
                log.warning("%s cannot be read as a waiting job (edited by hand?)", path)
                continue
            folders: dict[str, list[str]] = {}
            for child in missing:
                found = self.area.locate(child, doc.get("pipeline"))
                folders.setdefault(found.parent.name if found else "missing", []).append(child)
            detail = "; ".join(f"{name}: {', '.join(ids)}" for name, ids in sorted(folders.items()))
            log.warning("%s waits for %d job(s) that will not finish by themselves (%s); move "
                        "crashed jobs back into %s to retry", path.name, len(missing), detail,
                        self.area.root)
        if blocked:
            log.error("nothing more can run: %d job(s) in waiting/ wait on crashed or missing "
                      "jobs; exiting with code %d", len(blocked), BLOCKED_EXIT)
        return len(blocked)

    def _report_orphans(self) -> int:
        """Name the parents of jobs this runner finished that are nowhere in the work area (their
        files were deleted or moved by hand): their pipelines cannot go on."""
        missing = {parent: child for parent, (child, pipeline) in self._parents.items()
                   if self.area.locate(parent, pipeline) is None}
        for parent, child in sorted(missing.items()):
            log.error("%s finished, but its parent %s is nowhere in the work area (deleted or "
                      "moved by hand?): its pipeline cannot go on", child, parent)
        return len(missing)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        if self._interruptible:
            self._interruptible = False
            raise StopRequested

    # -- one job -------------------------------------------------------------------------------

    def process(self, claim: Claim) -> bool:
        """Drive a claimed job as far as it goes; never let it kill the runner. False if the
        job was put back untouched, to be looked at later (a file still being written)."""
        with self._holding(claim):
            try:
                handled = self._drive(claim)
            except StorageError as exc:
                self._storage_trouble(claim, exc)
            except Exception as exc:  # the job's error could not be recorded in its yaml
                log.exception("%s: recording the error failed", claim.job_id)
                self._crash_unreadable(claim, exc)
            else:
                self._storage_failures = 0
                return handled
        return True

    def _drive(self, claim: Claim) -> bool:
        doc: dict[str, Any] | None = None
        try:
            doc = self._open(claim)
            if doc is not None:
                self._run_stages(claim, doc)
        except NotSettled as exc:
            self._not_yet(claim, exc)
            return False
        except StopRequested:
            self._give_back(claim, doc)
        except RunnerEnvironmentError as exc:
            self.broken = str(exc)
            self._environment_failed(claim, doc, exc)
        except LeaseLost:
            self._lost(claim, doc)
        except VtabError as exc:
            self._crash(claim, doc, exc)
        except StorageError:
            raise  # not the job's fault: the caller keeps the job and backs off
        except Exception as exc:
            self._retry_or_crash(claim, doc, exc)
        return True

    def _not_yet(self, claim: Claim, exc: NotSettled) -> None:
        """Put a file that may still be being written back as it was, and leave it alone for a
        while (other runners judge it alike)."""
        name = claim.job_id + SUFFIX
        with contextlib.suppress(LeaseLost):
            self.area.put_back(claim)
        if name not in self._later:
            ago = "" if exc.written_ago is None else f" ({exc.written_ago:.1f} s since written)"
            log.info("%s%s does not end with '...' and may still be being written (a copy in "
                     "progress): it runs once it has been left alone for %g s (settle_time)",
                     name, ago, self.protocol.settle_time)
        self._later[name] = time.monotonic() + exc.seconds

    @contextlib.contextmanager
    def _holding(self, claim: Claim) -> Iterator[None]:
        """Heartbeat `claim` while the block runs."""
        self.heartbeat.hold(claim)
        try:
            yield
        finally:
            self.heartbeat.drop(claim)

    def _lost(self, claim: Claim, doc: dict[str, Any] | None) -> None:
        """The claim file is gone: taken over by another runner, or deleted by hand."""
        self.area.discard_outputs(claim.path)
        if doc is None:
            log.warning("%s: its file vanished before this runner read it (taken over by another "
                        "runner or deleted by hand); nothing to keep", claim.job_id)
            return
        job_id = doc["id"]
        if self.area.locate(job_id, doc.get("pipeline")) is not None:
            log.warning("%s was taken over by another runner; dropping this copy", job_id)
            return
        doc["error"] = self._error_record(
            VtabError(f"the job's file {claim.path} was deleted while this runner held it; "
                      "its last state is kept here"), claim, doc)
        doc.pop("lease", None)
        self._note_crash(self.area.keep_crashed(job_id, doc), doc.get("pipeline"), doc["error"])
        log.error("%s: its file was deleted while running; saved to crashed/", job_id)

    def _storage_trouble(self, claim: Claim | None, exc: StorageError) -> None:
        """The work area cannot be written: leave the job as it was last written, back off.

        The job goes back to the queue by a rename (which needs no free space) with the
        content of its last successful write, so nothing is lost; it is retried when the
        storage recovers. After several failures in a row the runner stops.
        """
        self._storage_failures += 1
        log.error("storage problem (%d in a row): %s", self._storage_failures, exc)
        if claim is not None:
            try:
                self.area.requeue(claim)
            except (LeaseLost, StorageError) as again:
                log.error("could not return %s to the queue (its lease will expire): %s",
                          claim.job_id, again)
        if self._storage_failures >= self.settings.storage_failures:
            self.broken = f"{self._storage_failures} storage failures in a row, the last: {exc}"
            return
        self._pause(self.settings.storage_backoff * 2 ** (self._storage_failures - 1))

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake up for a stop signal."""
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _open(self, claim: Claim) -> dict[str, Any]:
        """Read and check a claimed job, count the attempt."""
        doc = self._read_checked(claim)
        if "error" in doc:  # moved back from crashed/ by hand: a fresh series of attempts
            doc.setdefault("previous_errors", []).append(doc.pop("error"))
            doc["attempts"] = 0
            doc.pop("environment_failures", None)
        doc["attempts"] = int(doc.get("attempts") or 0) + 1
        doc["lease"] = {"runner": self.id, "host": self.settings.host, "pid": os.getpid(),
                        "device": self.device, "claimed_at": provenance.now_iso()}
        if doc["attempts"] > self.settings.max_attempts:
            raise VtabError(f"gave up after {self.settings.max_attempts} attempts at stage "
                            f"{doc['current_stage']!r}; the errors are under 'errors'")
        self.area.write(claim, doc)
        return doc

    def _read_checked(self, claim: Claim) -> dict[str, Any]:
        raw = self.area.read_bytes(claim)
        if not is_whole(raw):  # not written by a runner, nor ended by hand: cp may be writing
            self._check_settled(claim)
        doc = yamlio.parse_mapping(raw, str(claim.path))
        if "id" not in doc:
            doc = prepare_root(doc, claim.job_id)
            # Every job the pipeline will run, against its kind's schema, before any fork,
            # and before its name is taken: a pipeline refused here can be fixed and queued.
            check_plan(doc, self.settings.max_grid_points, deep=False).raise_errors(
                "checked when the pipeline was first claimed, before anything was forked")
            self._check_name_is_free(claim, doc)
            return doc
        validate(doc)  # its ids too: no key of a job leads out of the work area
        return doc

    def _check_settled(self, claim: Claim) -> None:
        """Raise NotSettled unless the file has been left alone for settle_time: by the
        filesystem's clock (last write to the claim), or else as watched on this runner's
        clock (size and inode unchanged), for filesystems whose renames keep the change time."""
        settle = self.protocol.settle_time
        ago = self.area.written_ago(claim)
        if settle == 0 or (ago is not None and ago >= settle):
            return
        now = time.monotonic()
        seen = (claim.found.st_size, claim.found.st_ino) if claim.found else None
        since, before = self._watched.get(claim.job_id, (now, seen))
        if before != seen:
            since = now
        self._watched[claim.job_id] = (since, seen)
        left = min(settle - (ago or 0.0), settle - (now - since))
        if left > 0:
            raise NotSettled(left, ago)
        del self._watched[claim.job_id]

    def _check_name_is_free(self, claim: Claim, root: dict[str, Any]) -> None:
        """A pipeline's name is its root's id, reserved for it for the life of the work area.

        The reservation names the pipeline's content and the claim that made it. It is taken
        over (one atomic step, see WorkArea.take_over) only where nothing can be lost: by the
        same pipeline once it finished (a re-run computes nothing new) or after the claim that
        reserved it ended before the root was written (its runner died); by another pipeline
        only if the first one never forked and is not in flight (it crashed early: fixed and
        queued again). Of two pipelines queued at once under one name exactly one is taken.
        """
        name = root["id"]
        owner = {"pipeline": name, "fingerprint": _fingerprint(root), "instance": claim.token}
        held = self.area.reserve(name, owner)
        if held is None:
            self._check_older_files(claim, root)  # jobs of an area older than reservations
            return
        where = next((p for p in self.area.places(name, name) if p != claim.path), None)
        in_flight = self.area.holds_claim(str(held.get("instance"))) or (
            where is not None and where.parent.name != CRASHED)
        seen = f" ({where.relative_to(self.area.root)})" if where else ""
        same = held.get("fingerprint") == owner["fingerprint"] and not held.get("parent")
        if same and self.area.done_path(name, name) is not None:
            free = True  # a re-run of the finished pipeline
        elif same:
            free = not in_flight  # its first claim ended before writing it: a runner died
        else:  # another pipeline: only in place of one that crashed before it forked
            free = ("fingerprint" in held and not held.get("forked") and not in_flight
                    and self.area.done_path(name, name) is None)
        if free and self.area.take_over(name, held, owner):
            return
        if same:
            raise ConfigError("name", f"{name!r} names this same pipeline, queued before and not "
                                      f"finished{seen or ' (another copy is being started)'}; "
                                      "to retry a crashed one, move its file back from crashed/")
        other = describe_owner(held) if "fingerprint" not in held else "another pipeline"
        raise ConfigError("name", f"{name!r} already names {other} in this work area{seen}, "
                                  "which has forked jobs or is in flight; give this one "
                                  "another name")

    def _check_older_files(self, claim: Claim, root: dict[str, Any]) -> None:
        """Files with this id from before reservations existed: the same rule, by content."""
        for other in self.area.places(root["id"], root["pipeline"]):
            if other == claim.path:
                continue
            try:
                found = yamlio.load_mapping(other)
            except (OSError, VtabError):
                found = {}
            if found.get("id") not in (None, root["id"]):
                continue  # another job's file that only looks alike (crashed/a+2.yaml)
            same = {k: found.get(k) for k in ("config", "stages")} == {
                k: root[k] for k in ("config", "stages")}
            if same and other.parent.name in (FINISHED, "jobs"):
                continue
            what = "this pipeline, still in flight," if same else "another pipeline"
            raise ConfigError("name", f"{root['id']!r} already names {what} in this work area "
                                      f"({other.relative_to(self.area.root)}); give this one "
                                      "another name")

    def _run_stages(self, claim: Claim, doc: dict[str, Any]) -> None:
        if "finished_in" in doc or "waiting_for" in doc:
            self._place(claim, doc)  # settled by a runner that died before moving it
            return
        ctx = replace(self.ctx, job=doc, staging=self.area.staging(claim))
        while True:
            stage = doc["current_stage"]
            started, started_at = time.monotonic(), provenance.now_iso()
            log.info("%s: stage %s", doc["id"], stage)
            self._interruptible = True
            try:
                if self.stop_signal is not None:  # it came while the job was read or written
                    raise StopRequested
                outcome = execute_stage(doc, ctx)
            finally:
                self._interruptible = False
            if self.stop_signal is not None and not isinstance(outcome, Finish):
                raise StopRequested  # the signal came between two stages: stop here
            doc.setdefault("history", []).append({
                "stage": stage, "runner": self.id, "started_at": started_at,
                "seconds": round(time.monotonic() - started, 3)})
            if isinstance(outcome, Advance):
                doc["current_stage"], doc["attempts"] = outcome.stage, 0
                doc.pop("environment_failures", None)
                self.area.write(claim, doc)
                continue
            self._settle(claim, doc, outcome)
            return

    def _settle(self, claim: Claim, doc: dict[str, Any], outcome: Wait | Finish) -> None:
        """Record the outcome in the job, then move the file where the content says."""
        doc["attempts"] = 0
        doc.pop("environment_failures", None)
        doc.pop("lease", None)
        if isinstance(outcome, Finish):
            doc["finished_at"] = provenance.now_iso()
            doc["finished_in"] = outcome.folder
        self.area.write(claim, doc)
        self.area.publish_outputs(claim, doc["pipeline"], doc["id"])  # still ours: just written
        self._place(claim, doc)

    def _place(self, claim: Claim, doc: dict[str, Any]) -> None:
        """Move a settled job (finished or waiting) into its folder, then release who waits.

        Content is written before the move, so a runner that dies in between leaves a job
        whose next holder only has to move it: nothing runs twice.
        """
        if "finished_in" not in doc:
            self.area.move(claim, WAITING, doc["id"])
            log.info("%s: waits for %d jobs", doc["id"], len(doc["waiting_for"]["children"]))
            self.try_release(doc["id"])
            return
        folder = self.area.end_folder(doc["finished_in"], doc.get("pipeline"))
        self.area.move(claim, folder, doc["id"])
        self.jobs_done += 1
        result = f" result={doc['result']:.4f}" if isinstance(doc.get("result"), float) else ""
        log.info("%s: finished%s", doc["id"], result)
        if doc.get("parent") and not self.try_release(doc["parent"]):
            self._parents[doc["parent"]] = (doc["id"], doc.get("pipeline"))

    def try_release(self, job_id: object) -> bool:
        """If `job_id` waits and all its children are finished, move it on (exactly once).

        Releasing is a claim from waiting/: only one runner can win it, and the
        children are checked again under the claim.
        """
        if not is_valid_id(job_id):  # a parent key that names no job file: nothing to release
            return False
        path = self.area.folder(WAITING) / (f"{job_id}{SUFFIX}")
        try:
            if missing_children(yamlio.load_mapping(path), self.area):
                return False
        except Exception:  # gone (released by another runner), or broken by hand: not ours
            return False
        claim = self.area.claim(path)
        if claim is None:
            return False
        with self._holding(claim):
            return self._release(claim)

    def _release(self, claim: Claim) -> bool:
        try:
            doc = self.area.read(claim)
            if missing_children(doc, self.area):
                self.area.move(claim, WAITING, doc["id"])
                return False
            outcome = join(doc)
            log.info("%s: all children finished", doc["id"])
            if isinstance(outcome, Advance):
                doc["current_stage"], doc["attempts"] = outcome.stage, 0
                self.area.write(claim, doc)
                self.area.requeue(claim, doc["id"])
            else:
                self._settle(claim, doc, outcome)
            return True
        except LeaseLost:
            return False
        except StorageError:
            raise
        except Exception as exc:
            self._crash(claim, None, exc)
            return True

    def recover(self, stale: Path) -> bool:
        """Take over a claim whose runner stopped heartbeating and queue it again."""
        claim = self.area.claim(stale)
        if claim is None:
            return False
        self.area.discard_outputs(stale)  # what the dead runner staged
        with self._holding(claim):
            return self._requeue_lost(claim)

    def _requeue_lost(self, claim: Claim) -> bool:
        try:
            raw = self.area.read_bytes(claim)
            if not is_whole(raw):  # never written by a runner: maybe still being copied
                self.area.requeue(claim)  # as it is: a rewrite would call it whole
                return True
            doc = yamlio.parse_mapping(raw, str(claim.path))
            lease = doc.pop("lease", {}) or {}
            doc.setdefault("errors", []).append({
                "type": "LeaseExpired", "at": provenance.now_iso(), "detected_by": self.id,
                "message": f"runner {lease.get('runner', 'unknown')} stopped heartbeating for "
                           f"{self.protocol.lease_timeout:g} s",
                "stage": doc.get("current_stage"), "attempt": doc.get("attempts")})
            self.area.write(claim, doc)
            self.area.requeue(claim, doc.get("id", claim.job_id))
            log.warning("%s: its runner %s stopped heartbeating; queued again",
                        claim.job_id, lease.get("runner", "unknown"))
        except LeaseLost:
            return False
        except (OSError, VtabError):
            self.area.requeue(claim)  # unreadable content: give it back as it is
        return True

    # -- endings -------------------------------------------------------------------------------

    def _environment_failed(self, claim: Claim, doc: dict[str, Any] | None,
                            exc: RunnerEnvironmentError) -> None:
        """The runner's environment failed the job: give it back uncounted (this runner stops).

        A job that fails so on `max_attempts` runners in a row is crashed after all: every
        runner failing alike points at the job (a batch no GPU can hold), and without a limit
        it would stop every runner that claims it.
        """
        if doc is None:
            self._give_back(claim, doc)
            return
        failures = int(doc.get("environment_failures") or 0) + 1
        doc["environment_failures"] = failures
        if failures >= self.settings.max_attempts:
            self._crash(claim, doc, exc, note=(
                f"{failures} runners in a row could not run it because of their environment "
                "(see errors); if the job asks for more than any of them has, change its "
                "config, else fix the runners; then move it back into the work area"))
            return
        doc.setdefault("errors", []).append({
            **self._error_record(exc, claim, doc),
            "note": "the runner's environment, not the job: not counted as an attempt; the "
                    f"runner gave the job back and stopped ({failures} in a row)"})
        self._give_back(claim, doc)

    def _give_back(self, claim: Claim, doc: dict[str, Any] | None) -> None:
        """The runner stops: the attempt does not count, the job goes back to the queue."""
        if doc is not None:
            doc["attempts"] = max(0, int(doc.get("attempts") or 1) - 1)
        self._write_and_move(claim, doc, self.area.root)
        log.info("%s: returned to the queue (this runner stops)", claim.job_id)

    def _write_and_move(self, claim: Claim, doc: dict[str, Any] | None, folder: Path,
                        job_id: str | None = None) -> Path | None:
        """Write `doc` (when there is one) without its lease, then move the claim to `folder`;
        where it went, or None when the lease was lost (another runner holds the job now)."""
        self.area.discard_outputs(claim.path)  # a job that did not finish publishes nothing
        try:
            if doc is not None:
                doc.pop("lease", None)
                self.area.write(claim, doc)
            return self.area.move(claim, folder, job_id or (doc or {}).get("id"))
        except LeaseLost:
            return None

    def _error_record(self, exc: BaseException, claim: Claim,
                      doc: dict[str, Any] | None) -> dict[str, Any]:
        record = {"type": type(exc).__name__, "message": str(exc),
                  "file": claim.job_id + SUFFIX, "stage": (doc or {}).get("current_stage"),
                  "attempt": (doc or {}).get("attempts"), "host": self.settings.host,
                  "runner": self.id, "at": provenance.now_iso(),
                  "traceback": "".join(traceback.format_exception(exc)).rstrip()}
        if isinstance(exc, ConfigError):
            record["key"] = exc.key
            record["message"] = str(exc.in_file(record["file"]))
        return record

    def _retry_or_crash(self, claim: Claim, doc: dict[str, Any] | None, exc: Exception) -> None:
        attempts = int((doc or {}).get("attempts") or 0)
        if doc is None or attempts >= self.settings.max_attempts:
            self._crash(claim, doc, exc, note=f"crashed after {attempts} attempts "
                                               f"(max_attempts {self.settings.max_attempts})")
            return
        log.warning("%s: attempt %d failed (%s: %s); queued again", claim.job_id, attempts,
                    type(exc).__name__, exc)
        doc.setdefault("errors", []).append(self._error_record(exc, claim, doc))
        self._write_and_move(claim, doc, self.area.root)

    def _crash(self, claim: Claim, doc: dict[str, Any] | None, exc: BaseException,
               note: str | None = None) -> None:
        if doc is None:  # it failed before its attempt was counted
            try:
                doc = self.area.read(claim)
                doc["attempts"] = int(doc.get("attempts") or 0) + 1
            except (OSError, VtabError, TypeError, ValueError):
                self._crash_unreadable(claim, exc)
                return
        doc["error"] = self._error_record(exc, claim, doc)
        if note:
            doc["error"]["note"] = note
        log.error("%s crashed: %s", claim.job_id, doc["error"]["message"])
        job_id = doc["id"] if is_valid_id(doc.get("id")) else claim.job_id
        target = self._write_and_move(claim, doc, self.area.folder(CRASHED), job_id)
        if target is not None:
            self._note_crash(target, doc.get("pipeline"), doc["error"])

    def _note_crash(self, path: Path, pipeline: object, error: dict[str, Any]) -> None:
        """Remember a crash record this runner made, for its exit code and last words."""
        first_line = (str(error.get("message")).splitlines() or [""])[0]
        self.crashed[path] = (pipeline if isinstance(pipeline, str) else path.stem,
                              f"{error.get('type')}: {first_line}")

    def _crash_unreadable(self, claim: Claim, exc: BaseException) -> None:
        """Keep the file byte for byte; its error goes beside it in ``<id>.error.txt``."""
        try:
            target = self.area.move(claim, CRASHED)
            report = {"error": {**self._error_record(exc, claim, None),
                                "note": "the job's yaml could not be read or written; fix it "
                                        "and move it back into the work area"}}
            yamlio.write_mapping(target.with_name(target.stem + ".error.txt"), report)
        except (LeaseLost, OSError):
            log.exception("%s: could not move it to crashed/", claim.job_id)
            return
        self._note_crash(target, None, report["error"])
        log.error("%s crashed: %s", claim.job_id, exc)


# -- command line --------------------------------------------------------------------------


def _fingerprint(root: Mapping[str, Any]) -> str:
    """What makes two pipelines the same: their stages and config, as expanded."""
    content = json.dumps({k: root.get(k) for k in ("current_stage", "config", "stages")},
                         sort_keys=True, default=str)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()
