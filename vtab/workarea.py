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
import json
import os
import random
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtab import fsutil, yamlio
from vtab.errors import ConfigError, VtabError
from vtab.faults import crash_point
from vtab.schema import Field, Section
from vtab.schema import validate as validate_schema

RUNNING, WAITING, FINISHED, CRASHED, SUMMARIZED = (
    "running", "waiting", "finished", "crashed", "summarized")
FOLDERS = (RUNNING, WAITING, FINISHED, CRASHED, SUMMARIZED)
OUTPUTS = "outputs"
META = "meta"  # the area's own records: settings.yaml, ids/ (one file per job id ever created)
IDS = f"{META}/ids"
SETTINGS = f"{META}/settings.yaml"


class AreaSettings(Section):
    """What every runner of one work area must agree on, kept in ``meta/settings.yaml``: a
    runner that judged leases by a timeout of its own would take over its neighbours' jobs."""

    lease_timeout: float = Field(60.0, ge=0.2, le=86_400, description=(
        "seconds without a heartbeat after which a claimed job is taken back"))
    settle_time: float = Field(10.0, ge=0, le=3_600, description=(
        "seconds a queued file that does not end with '...' must be left unchanged before it "
        "runs: a copy may still be writing it"))
SUFFIX = ".yaml"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]{0,199}")


class LeaseLost(Exception):
    """The claim file is gone: another runner took the job over."""


class StorageError(Exception):
    """A write or rename in the work area failed (full disk, no permission, I/O error)."""


class UnsafeFolder(VtabError):
    """A folder of the work area is a link or a file: using it could lead out of the area."""


class IdTaken(ConfigError):
    """A job id that is reserved for another job of this work area."""

    def __init__(self, job_id: str, owner: Mapping[str, Any]) -> None:
        self.job_id, self.owner = job_id, dict(owner)
        super().__init__("id", f"{job_id!r} already names {describe_owner(owner)} in this work "
                               "area; a job id names one job for the life of the area")


def describe_owner(owner: Mapping[str, Any]) -> str:
    """Who an id is reserved for, in words."""
    if "unreadable" in owner:
        return f"a job whose reservation cannot be read ({owner['unreadable']})"
    if owner.get("parent"):
        return f"a job of pipeline {owner.get('pipeline')!r} (forked by {owner['parent']!r})"
    return f"the pipeline {owner.get('pipeline')!r}"


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


ID_RULE = "letters, digits and ._=+,- (no '/', '..' or '@'), at most 200 characters"


def checked_id(value: object, key: str = "id") -> str:
    """`value` if it is a valid job id, else a ConfigError on `key`: every path the work area
    builds from a job's words (its id, parent, pipeline, forks) goes through here."""
    if not is_valid_id(value):
        raise ConfigError(key, f"{value!r} is not a valid job id ({ID_RULE}); a job's ids name "
                               "files in the work area and can never lead out of it")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Claim:
    """A job held by this process: its id and the claim file in ``running/``.

    `found` is the file's status as the claim found it, before the claim touched it: its
    modification time is its last write, its change time the claim's rename, both on the
    filesystem's clock (see `written_ago`).
    """

    job_id: str
    path: Path
    token: str
    found: os.stat_result | None = field(default=None, compare=False)


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
        for name in _yaml_names(running_dir, claims=True):
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
        with contextlib.suppress(FileExistsError):
            self.root.mkdir(parents=True)
        if not self.root.is_dir():
            raise UnsafeFolder(f"{self.root} is not a folder: a work area is a folder")
        self.check_folders()

    def check_folders(self) -> None:
        """Make the area's folders where they are missing; UnsafeFolder if one is a link or a
        file (runners check this between jobs: a folder swapped for a link would lead out)."""
        for folder in (*FOLDERS, IDS):
            self.real_dir(self.root / folder)

    def real_dir(self, path: Path) -> Path:
        """`path`, a folder inside the area, made where missing: every part of it below the
        area's root must be a real folder, never a link, so that nothing written, moved or
        removed through it lands outside the area."""
        here = self.root
        for part in path.relative_to(self.root).parts:
            here = here / part
            try:
                found = os.lstat(here)
            except FileNotFoundError:
                with _storage("make the folder", here):
                    here.mkdir(exist_ok=True)
                    found = os.lstat(here)
            if not stat.S_ISDIR(found.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a folder"
                raise UnsafeFolder(f"{here} is {what}: a work area's folders must be real "
                                   "folders inside it (nothing was written there)")
        return path

    def folder(self, name: str) -> Path:
        return self.root / name

    def settings(self, wanted: Mapping[str, float] | None = None) -> AreaSettings:
        """The area's settings. The first runner writes them (`wanted` over the defaults); a
        runner that wants another value than the area's is refused with a ConfigError naming
        the setting, so that runners never judge leases differently."""
        wanted = dict(wanted or {})
        first = validate_schema(AreaSettings, wanted)  # bad values refused before anything
        path = self.root / SETTINGS
        with _storage("write", path):
            fsutil.create_new(path, yamlio.dump(first.model_dump()))
        try:
            current = validate_schema(AreaSettings, yamlio.load_mapping(path))
        except ConfigError as exc:
            raise exc.in_file(str(path)) from None
        for key, value in wanted.items():
            if getattr(current, key) != value:
                raise ConfigError(key, f"this work area's {key} is {getattr(current, key):g} "
                                       f"({path}), not {value:g}: all its runners use the area's "
                                       "value. Leave the option out, or change the file while no "
                                       "runner runs.")
        return current

    # -- listing -----------------------------------------------------------

    def queued(self) -> list[Path]:
        return [self.root / name for name in _yaml_names(self.root)]

    def listing(self, folder: str) -> list[Path]:
        directory = self.root / folder
        return [directory / name for name in _yaml_names(directory, claims=folder == RUNNING)]

    def strays(self, folder: str = "") -> list[tuple[str, str]]:
        """(name, why) of what is named like a job in `folder` (the queue by default) but is
        not one: links, folders, FIFOs, names that are not job ids. Runners leave them alone."""
        return sorted((name, why) for name, why in _scan(self.root / folder, folder == RUNNING)
                      if why not in (None, _GONE))

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
        name = checked_id(job_id) + SUFFIX
        if (self.root / name).exists():
            yield self.root / name
        yield from sorted(self.root.joinpath(RUNNING).glob(f"{glob_escape(job_id)}@*{SUFFIX}"))
        for path in (self.root / WAITING / name, self.root / FINISHED / name,
                     self.root / CRASHED / name):
            if path.exists():
                yield path
        if pipeline is not None and (self.summarized_jobs(pipeline) / name).exists():
            yield self.summarized_jobs(pipeline) / name

    def end_folder(self, relative: object, pipeline: object) -> Path:
        """The folder a finished job names: ``finished`` or its own pipeline's
        ``summarized/<pipeline>/jobs``."""
        parts = str(relative).split("/")
        if parts == [FINISHED] or parts == [SUMMARIZED, str(pipeline), "jobs"]:
            return self.real_dir(self.root.joinpath(*parts))
        raise ConfigError("finished_in", f"{relative!r} is not a folder this job can go to "
                                         f"({FINISHED} or {SUMMARIZED}/{pipeline}/jobs)")

    def summarized_jobs(self, pipeline: str) -> Path:
        return self.root / SUMMARIZED / checked_id(pipeline, "pipeline") / "jobs"

    def done_path(self, job_id: str, pipeline: str) -> Path | None:
        """The file of a finished job (in finished/ or already summarized)."""
        for path in (self.root / FINISHED / (checked_id(job_id) + SUFFIX),
                     self.summarized_jobs(pipeline) / (job_id + SUFFIX)):
            if path.exists():
                return path
        return None

    # -- creating ----------------------------------------------------------

    def create(self, jobs: Mapping[str, dict[str, Any]], owner: Mapping[str, Any]) -> list[str]:
        """Queue new jobs (id -> content), except those whose id exists anywhere; returns the
        ids queued.

        Every id is reserved for `owner` first (`reserve`); an id reserved for someone else is
        an `IdTaken` error, before any job is queued. Only the holder of the parent job creates
        its children, so the check and the write do not race with each other. All files are
        written first, then renamed into the queue one after another: a runner that claims the
        first child finds its siblings there to run in one pass with it (rule 9a), not only
        those written so far. Temporary files of these jobs that a creator killed before its
        renames left behind are removed.
        """
        new: dict[str, dict[str, Any]] = {}
        for job_id, content in jobs.items():
            held = self.reserve(job_id, owner)
            if held is not None and held != dict(owner):
                raise IdTaken(job_id, held)
            if self.locate(job_id, content.get("pipeline")) is None:
                new[job_id] = content
        if new:
            with _storage("write new jobs into", self.root):
                self._remove_temporaries({job_id + SUFFIX for job_id in new})
                yamlio.write_mappings([(self.root / (job_id + SUFFIX), content)
                                       for job_id, content in new.items()],
                                      checkpoint=crash_point)
        return list(new)

    def _remove_temporaries(self, names: set[str]) -> None:
        with os.scandir(self.root) as entries:
            stale = [entry.path for entry in entries if fsutil.temp_target(entry.name) in names]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- identities --------------------------------------------------------

    def reserve(self, job_id: str, owner: Mapping[str, Any]) -> dict[str, Any] | None:
        """Reserve `job_id` for `owner` for the life of the work area.

        None if this call reserved it; else the owner it was reserved for before (`owner`
        itself when a retried fork or a recovered claim comes again). Exactly one of several
        runners reserving one id at once gets None, over NFS too (a hard link).
        """
        path = self.real_dir(self.root / IDS) / checked_id(job_id)
        with _storage("reserve the id of", path):
            if fsutil.create_new(path, json.dumps(dict(owner), sort_keys=True)):
                crash_point()
                return None
        return self.owner_of(job_id)

    def owner_of(self, job_id: str) -> dict[str, Any] | None:
        """Who `job_id` is reserved for; None if nobody (jobs of areas older than reservations).

        A reservation that cannot be read counts as someone else's.
        """
        path = self.root / IDS / checked_id(job_id)
        try:
            owner = json.loads(yamlio.read_bounded(path))  # never through a link or a FIFO
        except FileNotFoundError:
            return None
        except (OSError, ValueError, VtabError):
            return {"unreadable": str(path)}
        return owner if isinstance(owner, dict) else {"unreadable": str(path)}

    def take_over(self, job_id: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        """Reserve `job_id` for `new` in place of `old`, if it is still `old`'s: of runners
        taking over at once, one wins (the rename of the old reservation away)."""
        path = self.root / IDS / checked_id(job_id)
        aside = fsutil.temp_path_for(path)
        if self.owner_of(job_id) != dict(old):
            return False
        try:
            with _storage("take over the id of", path):
                os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            held = json.loads(yamlio.read_bounded(aside))
            if held != dict(old):  # it changed in between: put it back, untouched
                os.rename(aside, path)
                return False
            with _storage("reserve the id of", path):
                return fsutil.create_new(path, json.dumps(dict(new), sort_keys=True))
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()

    def update_owner(self, job_id: str, owner: Mapping[str, Any]) -> None:
        """Rewrite the reservation of `job_id`, which the caller holds (to note a fork)."""
        path = self.root / IDS / checked_id(job_id)
        with _storage("write", path):
            fsutil.atomic_write(path, json.dumps(dict(owner), sort_keys=True))

    def holds_claim(self, token: str) -> bool:
        """Whether a claim with `token` is in running/ (its runner holds a job)."""
        return any(self.root.joinpath(RUNNING).glob(f"*@{glob_escape(token)}{SUFFIX}"))

    def keep_crashed(self, job_id: str, content: dict[str, Any]) -> Path:
        """Write `content` as a new file in crashed/, never over an existing crash record."""
        tmp = fsutil.temp_path_for(self.real_dir(self.folder(CRASHED)) / (checked_id(job_id)
                                                                         + SUFFIX))
        with _storage("write", tmp):
            yamlio.write_mapping(tmp, content)
            return self._place_anew(tmp, self.folder(CRASHED), job_id)

    def _place_anew(self, source: Path, directory: Path, job_id: str) -> Path:
        """Rename `source` into `directory` as ``<id>.yaml``, or ``<id>+2.yaml`` and so on when
        that name is taken: a crash record is never replaced."""
        for number in range(1, 10_000):
            target = directory / (job_id + (f"+{number}" if number > 1 else "") + SUFFIX)
            try:
                fsutil.rename_no_replace(source, target)
            except FileExistsError:
                continue
            return target
        raise StorageError(f"{directory} holds 10000 crash records of {job_id}")

    # -- claiming ----------------------------------------------------------

    def claim_next(self, skip: set[str] | frozenset[str] = frozenset()) -> Claim | None:
        """Claim any queued job but those named in `skip`; random order keeps many runners
        from colliding."""
        names = [name for name in _yaml_names(self.root) if name not in skip]
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
        target = self.real_dir(self.root / RUNNING) / f"{job_id}@{token}{SUFFIX}"
        try:
            with _storage("claim", path):
                os.rename(path, target)
        except FileNotFoundError:
            return None
        crash_point()
        try:
            found: os.stat_result | None = os.lstat(target)
        except OSError:  # taken over already: the next step says so
            found = None
        claim = Claim(job_id, target, token, found)
        with contextlib.suppress(LeaseLost):
            self.heartbeat(claim)  # a claimed file's stamp must move even if it was renamed old
        return claim

    @staticmethod
    def written_ago(claim: Claim) -> float | None:
        """Seconds from the claimed file's last write to its claim, on the filesystem's clock
        (the claim's rename set its change time); None if unknown. Filesystems that keep the
        change time on a rename make this small: callers also watch on their own clock."""
        if claim.found is None:
            return None
        return max(0.0, claim.found.st_ctime - claim.found.st_mtime)

    def put_back(self, claim: Claim) -> None:
        """Return a claim to the queue as it was found: its name and its modification time
        (unless it grew meanwhile: a copy went on writing it, and its time says so)."""
        if claim.found is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(claim.path).st_size == claim.found.st_size:
                    os.utime(claim.path, ns=(claim.found.st_atime_ns, claim.found.st_mtime_ns))
        self.requeue(claim)

    def heartbeat(self, claim: Claim) -> None:
        try:
            os.utime(claim.path)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None

    def read(self, claim: Claim) -> dict[str, Any]:
        return yamlio.load_mapping(claim.path)

    def read_bytes(self, claim: Claim) -> bytes:
        """The claimed file's bytes (bounded; never through a link: a claim is a plain file)."""
        try:
            return yamlio.read_bounded(claim.path)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None

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
        """End the claim by renaming the claim file into `folder` (a name or a path).

        Into crashed/ the name is one no file has yet: a crash record is never replaced.
        """
        directory = self.root / folder if isinstance(folder, str) else folder
        name = checked_id(job_id or claim.job_id)
        target = directory / (name + SUFFIX)
        crash_point()
        try:
            with _storage("move a job to", target):
                self.real_dir(directory)
                if directory == self.folder(CRASHED):
                    target = self._place_anew(claim.path, directory, name)
                else:
                    os.rename(claim.path, target)
        except FileNotFoundError:
            raise LeaseLost(claim.job_id) from None
        crash_point()
        return target

    # -- outputs -----------------------------------------------------------

    @staticmethod
    def staging(claim: Claim) -> Path:
        """Where a claim's job writes its outputs (per-sample predictions) while it runs:
        beside the claim, so that a runner that lost its job never writes where others read."""
        return _staged(claim.path)

    def outputs(self, pipeline: str, job_id: str) -> Path:
        """Where a finished job's outputs are, until its pipeline is summarized."""
        return self.root / OUTPUTS / checked_id(pipeline, "pipeline") / checked_id(job_id)

    def publish_outputs(self, claim: Claim, pipeline: str, job_id: str) -> None:
        """Move the claim's outputs into place; call while holding the claim (just written)."""
        staged = self.staging(claim)
        if not staged.is_dir():
            return
        target = self.outputs(pipeline, job_id)
        with _storage("move outputs to", target):
            self.real_dir(target.parent)
            if target.is_symlink() or target.is_file():
                target.unlink()  # planted: never followed
            shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's
            os.rename(staged, target)

    def summarize_outputs(self, pipeline: str) -> None:
        """Move every finished job's outputs of `pipeline` into ``summarized/<p>/outputs/``,
        where they stay. Moving again is harmless."""
        target = self.real_dir(self.folder(SUMMARIZED) / checked_id(pipeline, "pipeline")
                               / OUTPUTS)
        outputs = self.folder(OUTPUTS) / pipeline
        if outputs.is_dir():
            self.real_dir(outputs)  # a link planted there would move someone's files
            for entry in outputs.iterdir():
                with contextlib.suppress(OSError):  # already moved by an earlier attempt
                    os.replace(entry, target / entry.name)

    @staticmethod
    def discard_outputs(claim_path: Path) -> None:
        """Remove what a claim (ours, or a dead runner's) staged and will never publish."""
        shutil.rmtree(_staged(claim_path), ignore_errors=True)

    def requeue(self, claim: Claim, job_id: str | None = None) -> Path:
        return self.move(claim, self.root, job_id)


def artefact_folders(root: Path, job_id: str) -> list[Path]:
    """The folders under work area `root` that hold a finished job's artefacts (per-sample
    tables, curves): ``outputs/<p>/<id>`` until its pipeline is summarized, then
    ``summarized/<p>/outputs/<id>``. Read only: nothing is created."""
    checked_id(job_id)
    return sorted([*root.glob(f"{OUTPUTS}/*/{glob_escape(job_id)}"),
                   *root.glob(f"{SUMMARIZED}/*/{OUTPUTS}/{glob_escape(job_id)}")])


def _staged(claim_path: Path) -> Path:
    return claim_path.with_name(claim_path.name[: -len(SUFFIX)] + ".outputs")


def is_whole(raw: bytes) -> bool:
    """Whether a job file ends with YAML's end-of-document marker ``...`` (runners write it last):
    a file that does is complete; a copy cut short would not end with it."""
    lines = raw.rstrip().splitlines()
    return bool(lines) and lines[-1].rstrip() == b"..."


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


_TOKEN = re.compile(r"[0-9a-f]{8}")
_GONE = "gone"  # vanished between the listing and the look at it


def _yaml_names(folder: Path, claims: bool = False) -> list[str]:
    """Names of the job files in `folder` (names only: building paths for thousands is slow).

    Anything else named ``*.yaml`` is a stray (`WorkArea.strays`): never claimed, never read.
    `claims`: the folder holds claims (``<id>@<token>.yaml``), as running/ does.
    """
    return [name for name, why in _scan(folder, claims) if why is None]


def _scan(folder: Path, claims: bool) -> list[tuple[str, str | None]]:
    try:
        with os.scandir(folder) as entries:
            return [(e.name, _stray_reason(e, claims)) for e in entries
                    if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _stray_reason(entry: os.DirEntry[str], claims: bool) -> str | None:
    """Why an entry named like a job is not one; None if it is one. From the listing's file
    types (no stat): a link is never followed, whatever it points to."""
    try:
        if entry.is_symlink():
            return "a symbolic link: job files must be plain files"
        if entry.is_dir(follow_symlinks=False):
            return "a folder"
        if not entry.is_file(follow_symlinks=False):
            return "not a plain file (a FIFO, socket or device)"
    except OSError:
        return _GONE
    stem = entry.name[: -len(SUFFIX)]
    job_id, at, token = stem.partition("@")
    if claims:
        valid = is_valid_id(job_id) and _TOKEN.fullmatch(token)
        return None if valid else "not a claim (<job id>@<8 hex digits>.yaml)"
    if is_valid_id(stem):
        return None
    if at and is_valid_id(job_id):
        return ("a claim file moved out of running/: it belongs to the runner that held it; "
                "rename it to <job id>.yaml to queue the job again")
    return f"its name is not a job id ({ID_RULE})"


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
