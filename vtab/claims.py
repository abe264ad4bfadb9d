"""One claim's life: open the job, write it, settle it, or end it (crash, retry, give back).

A `ClaimHandle` holds one claimed job file and the document read from it. The runner's claim
loop makes handles, one per claim (several at once for a batch of sibling jobs), and each
handle ends on its own: a batch's jobs are finished, crashed or given back one by one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtab import provenance, yamlio
from vtab.errors import ConfigError, RunnerEnvironmentError, VtabError
from vtab.pipeline import Finish, Wait, check_plan, prepare_root, validate
from vtab.workarea import (
    CRASHED,
    FINISHED,
    SUFFIX,
    WAITING,
    Claim,
    LeaseLost,
    describe_owner,
    is_valid_id,
    is_whole,
)

if TYPE_CHECKING:  # the handle reports back to the runner that made it
    from vtab.runner import Runner

log = logging.getLogger("vtab.runner")


class ClaimHandle:
    """A claimed job file and its document, and every way its claim can end."""

    def __init__(self, runner: Runner, claim: Claim) -> None:
        self.runner = runner
        self.area = runner.area
        self.claim = claim
        self.doc: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        return self.claim.job_id

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """Read and check the claimed job, count the attempt, write the lease into it."""
        doc = self._read_checked()
        if "error" in doc:  # moved back from crashed/ by hand: a fresh series of attempts
            doc.setdefault("previous_errors", []).append(doc.pop("error"))
            doc["attempts"] = 0
            doc.pop("environment_failures", None)
        doc["attempts"] = int(doc.get("attempts") or 0) + 1
        runner = self.runner
        doc["lease"] = {"runner": runner.id, "host": runner.settings.host, "pid": os.getpid(),
                        "device": runner.device, "claimed_at": provenance.now_iso()}
        self.doc = doc
        if doc["attempts"] > runner.settings.max_attempts:
            raise VtabError(f"gave up after {runner.settings.max_attempts} attempts at stage "
                            f"{doc['current_stage']!r}; the errors are under 'errors'")
        self.write()
        return doc

    def _read_checked(self) -> dict[str, Any]:
        raw = self.area.read_bytes(self.claim)
        if not is_whole(raw):  # not written by a runner, nor ended by hand: cp may be writing
            self.runner.check_settled(self.claim)
        doc = yamlio.parse_mapping(raw, str(self.claim.path))
        if "id" not in doc:
            doc = prepare_root(doc, self.claim.job_id)
            # Every job the pipeline will run, against its kind's schema, before any fork,
            # and before its name is taken: a pipeline refused here can be fixed and queued.
            check_plan(doc, self.runner.settings.max_grid_points, deep=False).raise_errors(
                "checked when the pipeline was first claimed, before anything was forked")
            self._check_name_is_free(doc)
            return doc
        validate(doc)  # its ids too: no key of a job leads out of the work area
        return doc

    def _check_name_is_free(self, root: dict[str, Any]) -> None:
        """A pipeline's name is its root's id, reserved for it for the life of the work area.

        The reservation names the pipeline's content and the claim that made it. It is taken
        over (one atomic step, see WorkArea.take_over) only where nothing can be lost: by the
        same pipeline once it finished (a re-run computes nothing new) or after the claim that
        reserved it ended before the root was written (its runner died); by another pipeline
        only if the first one never forked and is not in flight (it crashed early: fixed and
        queued again). Of two pipelines queued at once under one name exactly one is taken.
        """
        name = root["id"]
        owner = {"pipeline": name, "fingerprint": fingerprint(root), "instance": self.claim.token}
        held = self.area.reserve(name, owner)
        if held is None:
            self._check_older_files(root)  # jobs of an area older than reservations
            return
        where = next((p for p in self.area.places(name, name) if p != self.claim.path), None)
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

    def _check_older_files(self, root: dict[str, Any]) -> None:
        """Files with this id from before reservations existed: the same rule, by content."""
        for other in self.area.places(root["id"], root["pipeline"]):
            if other == self.claim.path:
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

    # -- progress --------------------------------------------------------------------------------

    def write(self) -> None:
        self.area.write(self.claim, self.doc)

    def advance(self, stage: str) -> None:
        """The job moves on to `stage`: its attempts there start from zero."""
        self.doc["current_stage"], self.doc["attempts"] = stage, 0
        self.doc.pop("environment_failures", None)
        self.write()

    def settle(self, outcome: Wait | Finish) -> None:
        """Record the outcome in the job, then move the file where the content says."""
        doc = self.doc
        doc["attempts"] = 0
        doc.pop("environment_failures", None)
        doc.pop("lease", None)
        if isinstance(outcome, Finish):
            doc["finished_at"] = provenance.now_iso()
            doc["finished_in"] = outcome.folder
        self.write()
        self.area.publish_outputs(self.claim, doc["pipeline"], doc["id"])  # still ours
        self.place()

    def place(self) -> None:
        """Move a settled job (finished or waiting) into its folder, then release who waits.

        Content is written before the move, so a runner that dies in between leaves a job
        whose next holder only has to move it: nothing runs twice.
        """
        doc, runner = self.doc, self.runner
        if "finished_in" not in doc:
            self.area.move(self.claim, WAITING, doc["id"])
            log.info("%s: waits for %d jobs", doc["id"], len(doc["waiting_for"]["children"]))
            runner.try_release(doc["id"])
            return
        folder = self.area.end_folder(doc["finished_in"], doc.get("pipeline"))
        self.area.move(self.claim, folder, doc["id"])
        runner.jobs_done += 1
        result = f" result={doc['result']:.4f}" if isinstance(doc.get("result"), float) else ""
        log.info("%s: finished%s", doc["id"], result)
        if doc.get("parent") and not runner.try_release(doc["parent"]):
            runner.remember_parent(doc["parent"], doc["id"], doc.get("pipeline"))

    # -- endings ---------------------------------------------------------------------------------

    def lost(self) -> None:
        """The claim file is gone: taken over by another runner, or deleted by hand."""
        self.area.discard_outputs(self.claim.path)
        doc = self.doc
        if doc is None:
            log.warning("%s: its file vanished before this runner read it (taken over by another "
                        "runner or deleted by hand); nothing to keep", self.job_id)
            return
        job_id = doc["id"]
        if self.area.locate(job_id, doc.get("pipeline")) is not None:
            log.warning("%s was taken over by another runner; dropping this copy", job_id)
            return
        doc["error"] = self.error_record(
            VtabError(f"the job's file {self.claim.path} was deleted while this runner held it; "
                      "its last state is kept here"))
        doc.pop("lease", None)
        self.runner.note_crash(self.area.keep_crashed(job_id, doc), doc.get("pipeline"),
                               doc["error"])
        log.error("%s: its file was deleted while running; saved to crashed/", job_id)

    def environment_failed(self, exc: RunnerEnvironmentError) -> None:
        """The runner's environment failed the job: give it back uncounted (the runner stops).

        A job that fails so on `max_attempts` runners in a row is crashed after all: every
        runner failing alike points at the job (a batch no GPU can hold), and without a limit
        it would stop every runner that claims it.
        """
        doc = self.doc
        if doc is None:
            self.give_back()
            return
        failures = int(doc.get("environment_failures") or 0) + 1
        doc["environment_failures"] = failures
        if failures >= self.runner.settings.max_attempts:
            self.crash(exc, note=(
                f"{failures} runners in a row could not run it because of their environment "
                "(see errors); if the job asks for more than any of them has, change its "
                "config, else fix the runners; then move it back into the work area"))
            return
        doc.setdefault("errors", []).append({
            **self.error_record(exc),
            "note": "the runner's environment, not the job: not counted as an attempt; the "
                    f"runner gave the job back and stopped ({failures} in a row)"})
        self.give_back()

    def give_back(self) -> None:
        """The runner stops: the attempt does not count, the job goes back to the queue."""
        if self.doc is not None:
            self.doc["attempts"] = max(0, int(self.doc.get("attempts") or 1) - 1)
        self._write_and_move(self.area.root)
        log.info("%s: returned to the queue (this runner stops)", self.job_id)

    def retry_or_crash(self, exc: Exception) -> None:
        doc, max_attempts = self.doc, self.runner.settings.max_attempts
        attempts = int((doc or {}).get("attempts") or 0)
        if doc is None or attempts >= max_attempts:
            self.crash(exc, note=f"crashed after {attempts} attempts (max_attempts "
                                 f"{max_attempts})")
            return
        log.warning("%s: attempt %d failed (%s: %s); queued again", self.job_id, attempts,
                    type(exc).__name__, exc)
        doc.setdefault("errors", []).append(self.error_record(exc))
        self._write_and_move(self.area.root)

    def crash(self, exc: BaseException, note: str | None = None) -> None:
        if self.doc is None:  # it failed before its attempt was counted
            try:
                self.doc = self.area.read(self.claim)
                self.doc["attempts"] = int(self.doc.get("attempts") or 0) + 1
            except (OSError, VtabError, TypeError, ValueError):
                self.crash_unreadable(exc)
                return
        doc = self.doc
        doc["error"] = self.error_record(exc)
        if note:
            doc["error"]["note"] = note
        log.error("%s crashed: %s", self.job_id, doc["error"]["message"])
        job_id = doc["id"] if is_valid_id(doc.get("id")) else self.job_id
        target = self._write_and_move(self.area.folder(CRASHED), job_id)
        if target is not None:
            self.runner.note_crash(target, doc.get("pipeline"), doc["error"])
            if is_valid_id(doc.get("parent")):  # a parent may go on without its crashed child
                self.runner.try_release(doc["parent"])

    def crash_unreadable(self, exc: BaseException) -> None:
        """Keep the file byte for byte; its error goes beside it in ``<id>.error.txt``."""
        try:
            target = self.area.move(self.claim, CRASHED)
            report = {"error": {**self.error_record(exc, with_doc=False),
                                "note": "the job's yaml could not be read or written; fix it "
                                        "and move it back into the work area"}}
            yamlio.write_mapping(target.with_name(target.stem + ".error.txt"), report)
        except (LeaseLost, OSError):
            log.exception("%s: could not move it to crashed/", self.job_id)
            return
        self.runner.note_crash(target, None, report["error"])
        log.error("%s crashed: %s", self.job_id, exc)

    def _write_and_move(self, folder: Path, job_id: str | None = None) -> Path | None:
        """Write the document (when there is one) without its lease, then move the claim to
        `folder`; where it went, or None when the lease was lost (another runner holds it)."""
        self.area.discard_outputs(self.claim.path)  # a job that did not finish publishes nothing
        try:
            if self.doc is not None:
                self.doc.pop("lease", None)
                self.write()
            return self.area.move(self.claim, folder, job_id or (self.doc or {}).get("id"))
        except LeaseLost:
            return None

    def error_record(self, exc: BaseException, with_doc: bool = True) -> dict[str, Any]:
        doc = (self.doc if with_doc else None) or {}
        runner = self.runner
        record = {"type": type(exc).__name__, "message": str(exc),
                  "file": self.job_id + SUFFIX, "stage": doc.get("current_stage"),
                  "attempt": doc.get("attempts"), "host": runner.settings.host,
                  "runner": runner.id, "at": provenance.now_iso(),
                  "traceback": "".join(traceback.format_exception(exc)).rstrip()}
        if isinstance(exc, ConfigError):
            record["key"] = exc.key
            record["message"] = str(exc.in_file(record["file"]))
        return record


def fingerprint(root: Mapping[str, Any]) -> str:
    """What makes two pipelines the same: their stages and config, as expanded."""
    content = json.dumps({k: root.get(k) for k in ("current_stage", "config", "stages")},
                         sort_keys=True, default=str)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()
