"""The work-area protocol: job files moved between folders by atomic renames.

This module is the whole protocol (docs/PROTOCOL.md describes it for other
tools); it knows files, claims and leases, nothing about pipelines.

- A queued job is ``<area>/<id>.yaml``.
- Claiming renames it to ``running/<id>@<token>.yaml``, where the token is
  new for every claim. Only one rename of a file can succeed, so exactly one
  runner wins; the others get ENOENT and try another job.
- The holder renews its lease by touching its claim file (the heartbeat).
  Other runners judge a lease by whether that file's stamp changes over their
  own clock, never by comparing clocks across hosts.
- A stale claim is taken over by renaming it to a new token (the reaper's own
  claim), so recovering it is itself a claim that can fail over.
- Every content update is a write to a temporary file and a rename onto the
  claim path; every change of folder is one rename of the claim path. Once a
  claim has been taken over, the old holder's renames fail with ENOENT and it
  learns it has lost the job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtab import yamlio
from vtab.errors import ConfigError
from vtab.faults import crash_point

RUNNING, WAITING, FINISHED, CRASHED, SUMMARIZED = (
    "running", "waiting", "finished", "crashed", "summarized")
FOLDERS = (RUNNING, WAITING, FINISHED, CRASHED, SUMMARIZED)
SUFFIX = ".yaml"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]{0,199}")


class LeaseLost(Exception):
    """The claim file is gone: another runner took the job over."""


class StorageError(Exception):
    """A write or rename in the work area failed (full disk, no permission, I/O error)."""


@contextlib.contextmanager
def _storage(action: str, path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot {action} {path}: {exc.strerror or exc}") from exc


def is_valid_id(job_id: object) -> bool:
    """Ids become file names: no separators, no leading dot, no ``@``, bounded length."""
    return isinstance(job_id, str) and bool(_ID.fullmatch(job_id)) and ".." not in job_id


@dataclass(frozen=True)
class Claim:
    """A job held by this process: its id and the claim file in ``running/``."""

    job_id: str
    path: Path
    token: str


@dataclass
class LeaseWatcher:
    """Finds claims whose heartbeat stopped, judged on this process's clock.

    A claim is stale when its file stamp has not changed for `timeout`
    seconds of observation. A newly started watcher therefore waits a full
    timeout before it calls anything stale, which is what makes the judgement
    independent of the clocks of other hosts.
    """

    timeout: float
    _seen: dict[str, tuple[tuple[int, int, int], float]] = field(default_factory=dict)

    def stale(self, running_dir: Path, own_tokens: set[str]) -> list[Path]:
        now = time.monotonic()
        current: dict[str, tuple[tuple[int, int, int], float]] = {}
        stale: list[Path] = []
        for name in _yaml_names(running_dir):
            path = running_dir / name
            if _token_of(path) in own_tokens:
                continue
            stamp = _stamp(path)
            if stamp is None:
                continue
            previous = self._seen.get(path.name)
            since = previous[1] if previous and previous[0] == stamp else now
            current[path.name] = (stamp, since)
            if now - since >= self.timeout:
                stale.append(path)
        self._seen = current
        return stale


class WorkArea:
    """One work area folder shared by all runners."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.root / name

    # -- listing -----------------------------------------------------------

    def queued(self) -> list[Path]:
        return [self.root / name for name in _yaml_names(self.root)]

    def listing(self, folder: str) -> list[Path]:
        directory = self.root / folder
        return [directory / name for name in _yaml_names(directory)]

    def locate(self, job_id: str, pipeline: str | None = None) -> Path | None:
        """Where the job with `job_id` is now, or None if nowhere.

        Folders are searched in the order a job passes through them, so a job moving
        forward during the search is still found; a second pass catches one moving back.
        """
        for _ in range(2):
            found = self._find(job_id, pipeline)
            if found is not None:
                return found
        return None

    def _find(self, job_id: str, pipeline: str | None) -> Path | None:
        return next(self.places(job_id, pipeline), None)

    def places(self, job_id: str, pipeline: str | None = None) -> Iterator[Path]:
        """Every file that holds `job_id`, in lifecycle order (more than one only by mistake)."""
        name = job_id + SUFFIX
        if (self.root / name).exists():
            yield self.root / name
        yield from sorted(self.root.joinpath(RUNNING).glob(f"{glob_escape(job_id)}@*{SUFFIX}"))
        for path in (self.root / WAITING / name, self.root / FINISHED / name,
                     self.root / CRASHED / name):
            if path.exists():
                yield path
        if pipeline is not None and (self.summarized_jobs(pipeline) / name).exists():
            yield self.summarized_jobs(pipeline) / name

    def end_folder(self, relative: object) -> Path:
        """The folder a finished job names (``finished`` or ``summarized/<p>/jobs``)."""
        parts = str(relative).split("/")
        if parts == [FINISHED] or (len(parts) == 3 and parts[0] == SUMMARIZED
                                   and is_valid_id(parts[1]) and parts[2] == "jobs"):
            return self.root.joinpath(*parts)
        raise ConfigError("finished_in", f"{relative!r} is not a folder a finished job can go "
                                         f"to ({FINISHED} or {SUMMARIZED}/<pipeline>/jobs)")

    def summarized_jobs(self, pipeline: str) -> Path:
        return self.root / SUMMARIZED / pipeline / "jobs"

    def done_path(self, job_id: str, pipeline: str) -> Path | None:
        """The file of a finished job (in finished/ or already summarized)."""
        for path in (self.root / FINISHED / (job_id + SUFFIX),
                     self.summarized_jobs(pipeline) / (job_id + SUFFIX)):
            if path.exists():
                return path
        return None

    # -- creating ----------------------------------------------------------

    def create(self, job_id: str, content: dict[str, Any]) -> bool:
        """Queue a new job unless a job with this id exists anywhere.

        Only the holder of the parent job creates its children, so the check
        and the write do not race with each other.
        """
        if self.locate(job_id, content.get("pipeline")) is not None:
            return False
        target = self.root / (job_id + SUFFIX)
        with _storage("write", target):
            yamlio.write_mapping(target, content)
        crash_point()
        return True

    # -- claiming ----------------------------------------------------------

    def claim_next(self) -> Claim | None:
        """Claim any queued job; random order keeps many runners from colliding."""
        names = _yaml_names(self.root)
        random.shuffle(names)
        for name in names:
            claim = self.claim(self.root / name)
            if claim is not None:
                return claim
        return None

    def claim(self, path: Path) -> Claim | None:
        """Rename `path` into running/ under a fresh token; None if someone was faster."""
        token = secrets.token_hex(4)
        job_id = _id_of(path)
        target = self.root / RUNNING / f"{job_id}@{token}{SUFFIX}"
        try:
            with _storage("claim", path):
                os.rename(path, target)
        except FileNotFoundError:
            return None
        crash_point()
        claim = Claim(job_id, target, token)
        with contextlib.suppress(LeaseLost):
            self.heartbeat(claim)  # a claimed file's stamp must move even if it was renamed old
        return claim

    def heartbeat(self, claim: Claim) -> None:
        try:
            os.utime(claim.path)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None

    def read(self, claim: Claim) -> dict[str, Any]:
        return yamlio.load_mapping(claim.path)

    def write(self, claim: Claim, content: dict[str, Any]) -> None:
        """Replace the claimed job's content, if the claim is still ours.

        The claim file is only ever replaced, never created: a holder whose claim was taken
        over while it wrote gets LeaseLost instead of bringing its claim back to life.
        """
        self.heartbeat(claim)
        crash_point()
        try:
            with _storage("write", claim.path):
                yamlio.write_mapping(claim.path, content, must_exist=True)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None
        crash_point()

    def move(self, claim: Claim, folder: str | Path, job_id: str | None = None) -> Path:
        """End the claim by renaming the claim file into `folder` (a name or a path)."""
        directory = self.root / folder if isinstance(folder, str) else folder
        target = directory / ((job_id or claim.job_id) + SUFFIX)
        crash_point()
        try:
            with _storage("move a job to", target):
                directory.mkdir(parents=True, exist_ok=True)
                os.rename(claim.path, target)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None
        crash_point()
        return target

    def requeue(self, claim: Claim, job_id: str | None = None) -> Path:
        return self.move(claim, self.root, job_id)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _yaml_names(folder: Path) -> list[str]:
    """Names of the job files in `folder` (names only: building paths for thousands is slow)."""
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries
                    if e.name.endswith(SUFFIX) and not e.name.startswith(".") and _is_file(e)]
    except FileNotFoundError:
        return []


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:  # vanished between the listing and the check
        return False


def _id_of(path: Path) -> str:
    return path.name[: -len(SUFFIX)].split("@", 1)[0]


def _token_of(path: Path) -> str:
    stem = path.name[: -len(SUFFIX)]
    return stem.split("@", 1)[1] if "@" in stem else ""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """The claim file's change stamp, read through an open file descriptor.

    Opening the file makes an NFS client revalidate its attributes
    (close-to-open consistency) instead of answering from its cache.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            return None
        try:  # unreadable (permissions, I/O): its attributes still tell whether it changes
            st = os.stat(path)
        except OSError:
            return None
    else:
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    return (st.st_mtime_ns, st.st_ino, st.st_size)
