"""What a work area holds right now, and what a pipeline will expand to."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vtab import kinds, processors, yamlio  # noqa: F401  (registers kinds and processors)
from vtab.errors import ConfigError, RunnerEnvironmentError, VtabError
from vtab.pipeline import (
    DEFAULT_MAX_GRID_POINTS,
    check_plan,
    children_of,
    count_jobs,
    jobs_phrase,
    missing_children,
    prepare_root,
    stage_kind,
)
from vtab.workarea import (
    CRASHED,
    FINISHED,
    RUNNING,
    SUFFIX,
    SUMMARIZED,
    WAITING,
    StorageError,
    WorkArea,
)

SHOWN = 20  # jobs listed per folder before "... and N more"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return yamlio.load_mapping(path)
    except (OSError, VtabError):
        return None


def _capped(lines: list[str]) -> Iterator[str]:
    yield from lines[:SHOWN]
    if len(lines) > SHOWN:
        yield f"    ... and {len(lines) - SHOWN} more"


def _running_line(path: Path, now: float) -> str:
    doc = _read(path) or {}
    lease = doc.get("lease") or {}
    try:
        age = f"{now - path.stat().st_mtime:.0f}s ago"
    except FileNotFoundError:
        age = "gone"
    return (f"    {path.name[: -len(SUFFIX)]}  stage={doc.get('current_stage', '?')} "
            f"attempt={doc.get('attempts', '?')} runner={lease.get('runner', '?')} "
            f"heartbeat {age}")


def _waiting_line(area: WorkArea, path: Path) -> str:
    doc = _read(path)
    if doc is None:
        return f"    {path.name}  (unreadable)"
    children = (doc.get("waiting_for") or {}).get("children", [])
    missing = missing_children(doc, area)
    crashed = [c for c in missing if (area.folder(CRASHED) / (c + SUFFIX)).exists()]
    note = f", {len(crashed)} crashed: {', '.join(crashed[:3])}" if crashed else ""
    return (f"    {doc.get('id', path.stem)}  {len(children) - len(missing)}/{len(children)} "
            f"children finished{note}")


def _crashed_line(path: Path) -> str:
    doc = _read(path) or {}
    message = str((doc.get("error") or {}).get("message", "(no error recorded)"))
    return f"    {path.stem}  {message.splitlines()[0][:160] if message else ''}"


def _not_jobs(folder: Path) -> list[str]:
    """Files in the work area's root that look meant as jobs but are not (``x.yml``, ``x.txt``)."""
    with os.scandir(folder) as entries:  # d_type from the listing: no stat per queued job
        return sorted(e.name for e in entries if not e.name.startswith(".")
                      and not e.name.endswith(SUFFIX) and e.is_file())


def _stray_lines(area: WorkArea, folder: str) -> Iterator[str]:
    """What is named like a job in `folder` but is not one; runners leave it alone."""
    strays = area.strays(folder)
    if strays:
        yield f"    not jobs, left alone by runners ({len(strays)}):"
        yield from _capped([f"      {name}: {why}" for name, why in strays])


def status_lines(area: WorkArea) -> Iterator[str]:
    now = time.time()
    queued = area.queued()
    running = area.listing(RUNNING)
    waiting = area.listing(WAITING)
    crashed = area.listing(CRASHED)
    yield f"work area {area.root}"
    yield f"  queued:   {len(queued)}"
    yield from _capped([f"    {p.stem}" for p in sorted(queued)])
    ignored = _not_jobs(area.root)
    if ignored:
        yield f"    not queued (only *.yaml files are jobs): {', '.join(ignored[:SHOWN])}"
    yield from _stray_lines(area, "")
    yield f"  running:  {len(running)}"
    yield from _capped([_running_line(p, now) for p in sorted(running)])
    yield from _stray_lines(area, RUNNING)
    yield f"  waiting:  {len(waiting)}"
    yield from _capped([_waiting_line(area, p) for p in sorted(waiting)])
    yield from _stray_lines(area, WAITING)
    yield f"  finished: {len(area.listing(FINISHED))}"
    yield from _stray_lines(area, FINISHED)
    yield f"  crashed:  {len(crashed)}"
    yield from _capped([_crashed_line(p) for p in sorted(crashed)])
    yield from _stray_lines(area, CRASHED)
    unreadable = [p for p in area.folder(CRASHED).glob("*.error.txt")  # still there, not retried
                  if p.with_name(p.name.removesuffix(".error.txt") + SUFFIX).exists()]
    if unreadable:
        yield f"    ({len(unreadable)} unreadable files, errors in crashed/*.error.txt)"
    summarized = sorted(p.parent.name for p in area.folder(SUMMARIZED).glob("*/summary.yaml"))
    yield f"  summarized pipelines: {', '.join(summarized) or 'none'}"
    if not queued and not running and waiting:
        yield "  nothing is queued or running: the waiting jobs wait on crashed or missing jobs"


def plan_lines(doc: dict[str, Any], limit: int, indent: int = 0) -> Iterator[str]:
    """The stages a job goes through; one child of each fork is shown as an example."""
    pad = "  " * indent
    stage = doc["current_stage"]
    while stage:
        spec = doc["stages"][stage]
        kind = stage_kind(doc["stages"], stage)
        if kind == "grid":
            children = children_of(doc, stage, limit)
            names = ", ".join(c["id"] for c in children[:3])
            more = f", ... ({len(children)} in all)" if len(children) > 3 else ""
            yield f"{pad}{stage}: grid -> {len(children)} jobs: {names}{more}"
            yield f"{pad}  each job, e.g. {children[0]['id']}:"
            yield from plan_lines(children[0], limit, indent + 2)
        elif kind == "processor":
            body = spec["processor"]
            yield f"{pad}{stage}: processor {body if isinstance(body, str) else body['kind']}"
        else:
            body = dict(spec["hyperparams"])
            kind_name = body.pop("kind", "linear_probe")
            settings = " ".join(f"{k}={v}" for k, v in body.items())
            yield f"{pad}{stage}: run {kind_name} {settings}".rstrip()
        stage = spec.get("next_stage")


def plan(path: Path, limit: int) -> int:
    """Print what the pipeline at `path` expands to and check every job it would run: its
    config against its kind's schema, its data, backbone and weights. 1 if anything is wrong."""
    try:
        root = prepare_root(yamlio.load_mapping(path, follow_link=True), path.stem)
        report = check_plan(root, limit, deep=True)
    except (OSError, VtabError, RunnerEnvironmentError) as exc:
        message = str(exc)
        print(message if str(path) in message else f"{path}: {message}", file=sys.stderr)
        return 1
    with contextlib.suppress(ConfigError):  # it cannot be expanded: the problems below say why
        print("\n".join([f"pipeline {root['pipeline']} ({path})", *plan_lines(root, limit),
                         f"{count_jobs(root, limit)} jobs in all"]))
    for (key, message), jobs in report.advice.items():
        print(f"warning: key '{key}': {message} ({jobs_phrase(jobs)})", file=sys.stderr)
    if report.errors:
        print(f"{path}: {len(report.errors)} problem(s) in the {report.runs} runs this pipeline "
              "would make; fix them before queuing it:", file=sys.stderr)
        for (key, message), jobs in report.errors.items():
            print(f"  key '{key}': {message} ({jobs_phrase(jobs)})", file=sys.stderr)
        return 1
    print(f"checked the {report.runs} runs it would make (after select_best, with every setting "
          "it may pick): every key, data folder, split file, backbone and checkpoint is in order")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="main_status.py",
        description="Show what a work area holds (queued, running with heartbeat age, waiting, "
                    "finished, crashed), or with --plan what a pipeline yaml expands to.")
    parser.add_argument("--work_area", type=Path, default=Path("./work"),
                        help="the work area folder (default: ./work)")
    parser.add_argument("--plan", type=Path, metavar="PIPELINE_YAML",
                        help="do not look at a work area: print the stages and jobs this "
                             "pipeline expands to, with environment variables resolved, and "
                             "check every job it would run (keys, data folders and split "
                             "files, backbone names, checkpoints, cached weights); exit code 1 "
                             "with every problem listed if anything is wrong")
    parser.add_argument("--max_grid_points", type=int, default=DEFAULT_MAX_GRID_POINTS,
                        help="the grid size limit to check against (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.plan is not None:
        return plan(args.plan, args.max_grid_points)
    if not args.work_area.is_dir():
        print(f"{args.work_area}: no such work area", file=sys.stderr)
        return 1
    try:
        area = WorkArea(args.work_area)
    except (VtabError, StorageError) as exc:
        print(f"{args.work_area}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(status_lines(area)))
    return 0
