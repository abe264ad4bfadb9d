"""Runners: processes that claim jobs from a work area and drive them through their stages.

One runner per device. A runner never dies of a bad job: input errors crash
the job (the error goes into its yaml), unexpected errors are retried up to a
limit. SIGTERM, SIGINT and SIGUSR1 (SLURM's usual warning signal) return the
job in hand to the queue at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from vtab import kinds, processors, provenance, yamlio  # noqa: F401  (registers kinds and processors)
from vtab.claims import ClaimHandle
from vtab.errors import RunnerEnvironmentError, VtabError
from vtab.pipeline import (
    DEFAULT_MAX_GRID_POINTS,
    KINDS,
    Advance,
    Finish,
    Outcome,
    StageContext,
    batch_key,
    execute_batch,
    execute_stage,
    join,
    kinds_named,
    missing_children,
)
from vtab.workarea import (
    CRASHED,
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
    is_valid_id,
    is_whole,
)

log = logging.getLogger("vtab.runner")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEFAULT_MAX_BATCH = 64
WARM_LOOK_INTERVAL = 1.0  # seconds between an idle runner's looks for job kinds to warm up
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


@dataclass(frozen=True)
class StageRun:
    """A stage that ran: recorded in the job's history."""

    stage: str
    started_at: str
    seconds: float
    batch: int = 1  # jobs that ran it in one pass
    # Where an error of the pass was raised: each job's record shows it once (re-raising one
    # exception for each job would add frames to its traceback every time).
    traceback: TracebackType | None = None

    def record(self, runner: str) -> dict[str, Any]:
        entry = {"stage": self.stage, "runner": runner, "started_at": self.started_at,
                 "seconds": round(self.seconds, 3)}
        return entry if self.batch == 1 else {**entry, "jobs_in_pass": self.batch}


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
    max_batch: int = DEFAULT_MAX_BATCH  # sibling jobs run in one pass; 1: one job per claim
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


class Looks:
    """Documents of files looked at without claiming them, parsed once per version of a file.

    A waiting parent is looked at whenever one of its children finishes and on every sweep, a
    queued sibling whenever a claim looks for a batch; re-parsing them dominated a protocol's
    queue time. A file's version is its inode, size and modification time; anything acted on is
    read again under a claim. A file that cannot be read raises the same error for as long as
    it is the same version (a planted file that takes seconds to refuse costs them once). The
    oldest entries go past `limit`. Callers must not change the documents returned.
    """

    def __init__(self, limit: int = 512) -> None:
        self.limit = limit
        self._docs: dict[Path, tuple[tuple[int, int, int], dict[str, Any] | Exception]] = {}

    def read(self, path: Path) -> dict[str, Any]:
        found = os.stat(path, follow_symlinks=False)
        version = (found.st_ino, found.st_size, found.st_mtime_ns)
        seen = self._docs.pop(path, None)
        if seen is not None and seen[0] == version:
            doc = seen[1]
        else:
            try:
                doc = yamlio.load_mapping(path)
            except Exception as exc:
                doc = exc
        self._docs[path] = (version, doc)  # newest last
        while len(self._docs) > self.limit:
            del self._docs[next(iter(self._docs))]
        if isinstance(doc, Exception):  # without its earlier raises' frames, which would pile up
            raise doc.with_traceback(None)
        return doc


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
        self._batch_limit = settings.max_batch  # halved after a pass the device could not run
        self._looks = Looks()  # files looked at without a claim (waiting parents, siblings)
        self._warmed: set[str] = set()  # job kinds whose code this runner imported (idle or not)
        self._next_warm_look = 0.0
        self._warm_looks = Looks(limit=64)  # apart: claims in running/ are named per claim
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
            log.info("runner %s: %d job(s) run, %d claim(s); busy %.0f s, idle %.0f s of %.0f s; "
                     "peak memory %.0f MiB", self.id, self.jobs_done, self.claims,
                     self.busy_seconds, up - self.busy_seconds, up,
                     provenance.peak_memory_mib())
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
            self._warm_up()
            limit = self.settings.idle_limit
            if limit is not None and time.monotonic() - idle_since > limit:
                log.info("no work for %.0f s (--idle_limit); exiting", limit)
                break
            self._pause(self.settings.poll_interval)
        return self._exit_code(blocked=False)

    def _warm_up(self) -> None:
        """While idle, import the code of the job kinds that jobs running or waiting elsewhere
        name (torch, for the evaluation kinds: seconds). A runner that imports it only once a
        fork's children reach the queue holds the one child it claimed meanwhile, while other
        runners take its siblings into their passes (rule 9a). The import is done here, in the
        runner's own thread, rather than beside the jobs it may run: nothing half-imported is
        ever seen by a job, and a stop signal is acted on once it is done."""
        cold = {name for name, kind in KINDS.items() if kind.warm is not None} - self._warmed
        if not cold or time.monotonic() < self._next_warm_look:
            return
        named: set[str] = set()
        try:
            for path in [*self.area.listing(RUNNING), *self.area.listing(WAITING)]:
                if cold <= named:
                    break
                with contextlib.suppress(Exception):  # gone or unreadable: nothing to learn
                    named |= kinds_named(self._warm_looks.read(path))
        except (OSError, StorageError) as exc:  # the next sweep says what is wrong
            log.debug("looking for job kinds to warm up failed: %s", exc)
        for name in sorted(cold & named):
            if self.stop_signal is not None or self.broken is not None:
                return
            self._warmed.add(name)
            try:
                KINDS.get(name).warm()
            except Exception as exc:  # a job of the kind meets it again, and ends as it says
                log.warning("importing the code of job kind %s ahead of its jobs failed: %s: "
                            "%s", name, type(exc).__name__, exc)
        self._next_warm_look = time.monotonic() + WARM_LOOK_INTERVAL

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

    # -- one claim, or a batch of siblings --------------------------------------------------------

    def process(self, claim: Claim) -> bool:
        """Drive a claimed job as far as it goes (with the queued siblings that can share its
        next pass); never let it kill the runner. False if the job was put back untouched, to
        be looked at later (a file still being written)."""
        handle = ClaimHandle(self, claim)
        failures = self._storage_failures
        with contextlib.ExitStack() as held:
            held.enter_context(self._holding(claim))
            try:
                opened = self._guarded(handle, handle.open)
            except NotSettled as exc:
                self._not_yet(claim, exc)
                return False
            if not opened:
                return True
            siblings, misfits = self._claim_siblings(handle, held)
            self.claims += len(siblings) + len(misfits)  # step() counts the first
            if siblings:
                self._run_batch([handle, *siblings])
            for one in misfits if siblings else [handle, *misfits]:
                self._guarded(one, functools.partial(self._run_stages, one))
        if self._storage_failures == failures:  # every write of these claims went through
            self._storage_failures = 0
        return True

    def _guarded(self, handle: ClaimHandle, step: Callable[[], object]) -> bool:
        """Run one step of a claimed job; if it fails, end the claim as its error says (the
        error goes into the job's yaml). True if the step completed. NotSettled is raised."""
        try:
            try:
                step()
                return True
            except (NotSettled, StorageError):
                raise
            except BaseException as exc:
                if not self._end(handle, exc):
                    raise
        except StorageError as exc:  # not the job's fault: the job is kept, the runner backs off
            self._storage_trouble(handle.claim, exc)
        except NotSettled:
            raise
        except Exception as exc:  # the job's error could not be recorded in its yaml
            log.exception("%s: recording the error failed", handle.job_id)
            handle.crash_unreadable(exc)
        return False

    def _end(self, handle: ClaimHandle, exc: BaseException) -> bool:
        """End a claim as `exc` says; False for an exception that is not the job's to end."""
        if isinstance(exc, StopRequested):
            handle.give_back()
        elif isinstance(exc, RunnerEnvironmentError):
            self.broken = str(exc)
            handle.environment_failed(exc)
        elif isinstance(exc, LeaseLost):
            handle.lost()
        elif isinstance(exc, VtabError):
            handle.crash(exc)
        elif isinstance(exc, Exception):
            handle.retry_or_crash(exc)
        else:
            return False
        return True

    def _claim_siblings(self, handle: ClaimHandle, held: contextlib.ExitStack,
                        ) -> tuple[list[ClaimHandle], list[ClaimHandle]]:
        """Claim the queued siblings of `handle`'s job that can run its next stage in the same
        pass (same parent, equal batch keys), up to max_batch jobs in all. Returns them, and
        those claimed that turned out unable to join (changed since they were looked at):
        they run alone."""
        doc = handle.doc
        limit = self._batch_limit
        if self.settings.max_jobs is not None:
            limit = min(limit, self.settings.max_jobs - self.claims)
        key = batch_key(doc, self.device) if limit > 1 and doc.get("parent") else None
        if key is None or self.stop_signal is not None or self.broken is not None:
            return [], []
        prefix = f"{doc['parent']}__"  # children's ids extend their parent's (pipeline.py)
        joined: list[ClaimHandle] = []
        misfits: list[ClaimHandle] = []
        for path in self.area.queued():
            if (len(joined) + len(misfits) + 1 >= limit or self.stop_signal is not None
                    or self.broken is not None):
                break
            if not path.name.startswith(prefix) or not self._may_join(path, doc, key):
                continue
            claim = self.area.claim(path)
            if claim is None:  # another runner was faster
                continue
            held.enter_context(self._holding(claim))
            sibling = ClaimHandle(self, claim)
            try:
                if not self._guarded(sibling, sibling.open):
                    continue
            except NotSettled as exc:
                self._not_yet(claim, exc)
                continue
            same = (sibling.doc.get("parent") == doc["parent"]
                    and batch_key(sibling.doc, self.device) == key)
            (joined if same else misfits).append(sibling)
        return joined, misfits

    def _may_join(self, path: Path, doc: Mapping[str, Any], key: Hashable) -> bool:
        """A look at a queued file, before claiming it: a sibling that can join the batch."""
        try:
            other = self._looks.read(path)
        except Exception:  # gone, being written, or broken: whoever claims it says why
            return False
        return (other.get("parent") == doc["parent"] and other.get("pipeline") == doc["pipeline"]
                and batch_key(other, self.device) == key)

    def _run_batch(self, batch: list[ClaimHandle]) -> None:
        """Run the current stage of sibling jobs in one pass, then let each go on alone.

        Every job ends on its own: one whose config or evaluation fails crashes (or is retried)
        alone; a stop signal gives each back; a lost claim is dropped alone. An error of the
        shared pass ends every job of the batch with that error, except a failure of the
        device (out of memory, say), which the batch's size may have caused: its jobs go back
        uncounted and this runner's batches are halved from then on.
        """
        stage = batch[0].doc["current_stage"]
        log.info("%s and %d sibling(s): stage %s in one pass", batch[0].job_id, len(batch) - 1,
                 stage)
        started, started_at = time.monotonic(), provenance.now_iso()
        try:
            self._interruptible = True
            if self.stop_signal is not None:
                raise StopRequested
            ends: list[Outcome | BaseException] = execute_batch(
                [h.doc for h in batch], [self._context(h) for h in batch])
        except BaseException as exc:
            if not isinstance(exc, (StopRequested, Exception)):
                raise
            if isinstance(exc, RunnerEnvironmentError):
                self._batch_limit = max(1, len(batch) // 2)
                log.warning("a pass of %d jobs failed on %s (%s): they go back uncounted, and "
                            "this runner's batches are at most %d jobs from now on", len(batch),
                            self.device, exc, self._batch_limit)
                for handle in batch:
                    self._guarded(handle, handle.give_back)
                return
            ends = [exc] * len(batch)
        finally:
            self._interruptible = False
        ran = StageRun(stage, started_at, time.monotonic() - started, len(batch),
                       next((e.__traceback__ for e in ends if isinstance(e, BaseException)),
                            None))
        for handle, end in zip(batch, ends, strict=True):
            self._guarded(handle, functools.partial(self._run_stages, handle, (ran, end)))

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

    def check_settled(self, claim: Claim) -> None:
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

    def _context(self, handle: ClaimHandle) -> StageContext:
        return replace(self.ctx, job=handle.doc, staging=self.area.staging(handle.claim))

    def _run_stages(self, handle: ClaimHandle,
                    done: tuple[StageRun, Outcome | BaseException] | None = None) -> None:
        """Run the job's stages until it waits or ends; `done`: its current stage already ran
        (in a batch), with this outcome or error."""
        doc = handle.doc
        if done is None and ("finished_in" in doc or "waiting_for" in doc):
            handle.place()  # settled by a runner that died before moving it
            return
        ctx = self._context(handle)
        while True:
            ran, outcome = done or self._run_stage(doc, ctx)
            done = None
            self._warmed |= kinds_named(doc, ran.stage)  # its code is imported: no look needed
            if isinstance(outcome, BaseException):
                raise outcome.with_traceback(ran.traceback or outcome.__traceback__)
            if self.stop_signal is not None and not isinstance(outcome, Finish):
                raise StopRequested  # the signal came between two stages: stop here
            doc.setdefault("history", []).append(ran.record(self.id))
            if isinstance(outcome, Advance):
                handle.advance(outcome.stage)
                continue
            handle.settle(outcome)
            return

    def _run_stage(self, doc: dict[str, Any], ctx: StageContext) -> tuple[StageRun, Outcome]:
        stage = doc["current_stage"]
        started, started_at = time.monotonic(), provenance.now_iso()
        log.info("%s: stage %s", doc["id"], stage)
        self._interruptible = True
        try:
            # A stop signal that came while the job was read or written; or this runner broke
            # (its device, its storage) while a job claimed with others waited: give it back.
            if self.stop_signal is not None or self.broken is not None:
                raise StopRequested
            outcome = execute_stage(doc, ctx)
        finally:
            self._interruptible = False
        return StageRun(stage, started_at, time.monotonic() - started), outcome

    def remember_parent(self, parent: str, child: str, pipeline: object) -> None:
        """A parent that was not waiting when its child finished: looked for at the end."""
        self._parents[parent] = (child, pipeline)

    def note_crash(self, path: Path, pipeline: object, error: dict[str, Any]) -> None:
        """Remember a crash record this runner made, for its exit code and last words."""
        first_line = (str(error.get("message")).splitlines() or [""])[0]
        self.crashed[path] = (pipeline if isinstance(pipeline, str) else path.stem,
                              f"{error.get('type')}: {first_line}")

    def try_release(self, job_id: object) -> bool:
        """If `job_id` waits and all its children are finished, move it on (exactly once).

        Releasing is a claim from waiting/: only one runner can win it, and the
        children are checked again under the claim.
        """
        if not is_valid_id(job_id):  # a parent key that names no job file: nothing to release
            return False
        path = self.area.folder(WAITING) / (f"{job_id}{SUFFIX}")
        try:
            if missing_children(self._looks.read(path), self.area):
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
            outcome = join(doc, self.area)
            log.info("%s: all children finished", doc["id"])
            if isinstance(outcome, Advance):
                doc["current_stage"], doc["attempts"] = outcome.stage, 0
                self.area.write(claim, doc)
                self.area.requeue(claim, doc["id"])
            else:
                handle = ClaimHandle(self, claim)
                handle.doc = doc
                handle.settle(outcome)
            return True
        except LeaseLost:
            return False
        except StorageError:
            raise
        except Exception as exc:
            ClaimHandle(self, claim).crash(exc)
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
