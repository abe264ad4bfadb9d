"""Pipelines: a job is a yaml holding a small state machine of stages.

A stage is one of
- ``grid``: fork one child job per point of a hyperparameter grid; the
  children start at ``child_stage``, and this job waits until all of them are
  finished, then goes on at its ``next_stage``;
- ``processor``: a registered non-training step (select the best setting,
  aggregate seeds, summarize);
- ``hyperparams``: a registered job kind (a linear probe, say) run with the
  job's config and the stage's overrides.

docs/PIPELINES.md describes the format for users.
"""

from __future__ import annotations

import itertools
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtab.config import flatten, merged, resolve_env
from vtab.errors import ConfigError
from vtab.provenance import environment, now_iso
from vtab.registry import Registry
from vtab.workarea import FINISHED, WorkArea, is_valid_id

STAGE_KINDS = ("grid", "processor", "hyperparams")
STAGE_KEYS = {
    "grid": {"grid", "child_stage", "next_stage"},
    "processor": {"processor", "next_stage"},
    "hyperparams": {"hyperparams", "next_stage"},
}
ROOT_KEYS = {"name", "current_stage", "config", "stages", "description"}
# Written by runners into any job, a pipeline not yet expanded included (after a crash).
BOOKKEEPING_KEYS = {"attempts", "lease", "errors", "error", "previous_errors", "history"}
DEFAULT_MAX_GRID_POINTS = 10_000
DEFAULT_KIND = "linear_probe"


@dataclass(frozen=True)
class Advance:
    """Go on with `stage` (in the same claim)."""

    stage: str


@dataclass(frozen=True)
class Wait:
    """Children were created; the job waits for them in waiting/."""


@dataclass(frozen=True)
class Finish:
    """The job is done; it goes to `folder`, relative to the work area."""

    folder: str = FINISHED


Outcome = Advance | Wait | Finish


@dataclass
class StageContext:
    """What a stage may use besides its own job document."""

    area: WorkArea
    device: str = "cpu"
    cache_dir: Path | None = None
    num_workers: int = 0
    progress: bool = True
    max_grid_points: int = DEFAULT_MAX_GRID_POINTS
    runner: str = ""
    host: str = field(default_factory=socket.gethostname)  # the runner's --host_id
    job: Mapping[str, Any] = field(default_factory=dict)  # the document being run

    def outputs_dir(self) -> Path:
        return self.area.root / "outputs" / self.job["pipeline"] / self.job["id"]

    def features_cache(self) -> Path:
        return self.cache_dir or self.area.root / "cache" / "features"


# A job kind runs one training/evaluation and returns what goes into the job's yaml.
JobKind = Callable[[dict[str, Any], StageContext], dict[str, Any]]
KINDS: Registry[JobKind] = Registry("job kind", "hyperparams.kind")
# A kind's config check: raises ConfigError without doing any work. Forks run it on every child,
# so that a mistake in the pipeline crashes the one job that forks instead of each of hundreds.
ConfigCheck = Callable[[dict[str, Any]], None]
KIND_CHECKS: dict[str, ConfigCheck] = {}


def register_kind(name: str, check: ConfigCheck | None = None) -> Callable[[JobKind], JobKind]:
    if check is not None:
        KIND_CHECKS[name] = check
    return KINDS.register(name)

# A processor edits its job document and may end it (Finish) or fork (Wait).
Processor = Callable[[dict[str, Any], dict[str, Any], StageContext], "Outcome | None"]
PROCESSORS: Registry[Processor] = Registry("processor", "processor")
# The options each processor reads (besides ``kind``) and a check of their values, so that a
# mistake is refused when the pipeline is queued, not after the grid it processes has trained.
OptionsCheck = Callable[[Mapping[str, Any]], None]
PROCESSOR_OPTIONS: dict[str, tuple[tuple[str, ...], OptionsCheck | None]] = {}


def register_processor(name: str, *options: str,
                       check: OptionsCheck | None = None) -> Callable[[Processor], Processor]:
    PROCESSOR_OPTIONS[name] = (options, check)
    return PROCESSORS.register(name)


# -- validation ------------------------------------------------------------------------------


def stage_kind(stages: Mapping[str, Any], name: str) -> str:
    spec = stages[name]
    kinds = [k for k in STAGE_KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"stages.{name}", f"needs exactly one of {', '.join(STAGE_KINDS)}; "
                                            f"found {', '.join(kinds) or 'none'}")
    return kinds[0]


def validate(doc: Mapping[str, Any]) -> None:
    """Check the stage machine of a job document; raise ConfigError naming the key."""
    stages = doc.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigError("stages", "must be a non-empty mapping of stage names to stages")
    if not isinstance(doc.get("config", {}), Mapping):
        raise ConfigError("config", "must be a mapping")
    current = doc.get("current_stage")
    if not isinstance(current, str) or current not in stages:
        raise ConfigError("current_stage", f"{current!r} is not one of the stages "
                                           f"({', '.join(map(str, stages))})")
    for name, spec in stages.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"stages.{name}", "must be a mapping")
        kind = stage_kind(stages, name)
        unknown = set(spec) - STAGE_KEYS[kind]
        if unknown:
            raise ConfigError(f"stages.{name}.{sorted(unknown)[0]}",
                              f"unknown key for a {kind} stage (known: "
                              f"{', '.join(sorted(STAGE_KEYS[kind]))})")
        for ref in ("next_stage", "child_stage"):
            if ref in spec and spec[ref] not in stages:
                raise ConfigError(f"stages.{name}.{ref}",
                                  f"{spec[ref]!r} is not one of the stages")
        if kind == "grid" and "child_stage" not in spec:
            raise ConfigError(f"stages.{name}.child_stage",
                              "a grid stage must name the stage its children start at")
        _validate_stage_body(name, kind, spec)
    _check_acyclic(stages)


def _validate_stage_body(name: str, kind: str, spec: Mapping[str, Any]) -> None:
    body = spec[kind]
    if kind == "grid":
        if not isinstance(body, Mapping) or not body:
            raise ConfigError(f"stages.{name}.grid", "must be a non-empty mapping of axes")
    elif kind == "hyperparams":
        if not isinstance(body, Mapping):
            raise ConfigError(f"stages.{name}.hyperparams", "must be a mapping")
        KINDS.get(body.get("kind", DEFAULT_KIND))
    else:
        processor_name(name, body)


def processor_name(stage: str, body: Any) -> str:
    name = body.get("kind") if isinstance(body, Mapping) else body
    try:
        PROCESSORS.get(name)
    except ConfigError as exc:
        suffix = ".kind" if isinstance(body, Mapping) else ""
        raise ConfigError(f"stages.{stage}.processor{suffix}", exc.message) from None
    options = {k: v for k, v in body.items() if k != "kind"} if isinstance(body, Mapping) else {}
    known, check = PROCESSOR_OPTIONS.get(name, ((), None))
    for key in options:
        if key not in known:
            raise ConfigError(f"stages.{stage}.processor.{key}",
                              f"unknown option of {name} (known: {', '.join(known) or 'none'})")
    if check is not None:
        try:
            check(options)
        except ConfigError as exc:
            raise ConfigError(f"stages.{stage}.processor.{exc.key}", exc.message) from None
    return name


def _check_acyclic(stages: Mapping[str, Any]) -> None:
    """Following next_stage and child_stage must always end: a cycle never would."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            loop = [*path[path.index(name):], name]
            raise ConfigError(f"stages.{path[-1]}", f"stages form a cycle: {' -> '.join(loop)}")
        state[name] = 1
        for ref in ("next_stage", "child_stage"):
            if ref in stages[name]:
                visit(stages[name][ref], [*path, name])
        state[name] = 2

    for name in stages:
        visit(name, [])


# -- expansion ---------------------------------------------------------------------------------


def prepare_root(doc: dict[str, Any], file_stem: str) -> dict[str, Any]:
    """Turn a pipeline as a user wrote it into a root job: id, pipeline name, resolved values."""
    unknown = set(doc) - ROOT_KEYS - BOOKKEEPING_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown top-level key in a pipeline (known: "
                                              f"{', '.join(sorted(ROOT_KEYS))})")
    name = doc.get("name", file_stem)
    if not isinstance(name, str) or not is_valid_id(name):
        raise ConfigError("name", f"{name!r} cannot name a pipeline: use letters, digits and "
                                  "._=+,- (no '/', '..' or '@'), at most 200 characters")
    used: dict[str, str] = {}
    resolved = resolve_env({"config": doc.get("config", {}), "stages": doc.get("stages")},
                           used=used)
    root = {"pipeline": name, "id": name, "parent": None, "current_stage": doc.get("current_stage"),
            "config": resolved["config"], "stages": resolved["stages"], "env": used,
            **{k: v for k, v in doc.items() if k in BOOKKEEPING_KEYS}}
    validate(root)
    return root


def expand_grid(grid: Mapping[str, Any], key: str, limit: int) -> list[dict[str, Any]]:
    """Cartesian product over the list-valued entries of `grid` (dotted paths for nesting).

    Scalar entries are set in every point; they are not axes.
    """
    entries = list(flatten(grid))
    axes = [(k, v) for k, v in entries if isinstance(v, list)]
    for axis, values in axes:
        if not values:
            raise ConfigError(f"{key}.{axis}", "is an empty list: the grid would have no points")
    size = 1
    for _, values in axes:
        size *= len(values)
    if size > limit:
        raise ConfigError(key, f"expands to {size} jobs, more than the limit of {limit} "
                               "(raise it with --max_grid_points if this is meant)")
    fixed = {k: v for k, v in entries if not isinstance(v, list)}
    names = [k for k, _ in axes]
    return [{**fixed, **dict(zip(names, combo, strict=True))}
            for combo in itertools.product(*(v for _, v in axes))]


def point_label(stage: str, point: Mapping[str, Any], axes: list[str]) -> str:
    """A readable, deterministic file-name fragment for one grid point.

    A point of strings only (a dataset name) is its values; anything else is
    ``<stage>__<leaf>=<value>_...`` over the swept axes.
    """
    values = [point[a] for a in axes]
    if values and all(isinstance(v, str) for v in values):
        text = "_".join(values)
    else:
        text = stage + "__" + "_".join(f"{a.rsplit('.', 1)[-1]}={_fmt(point[a])}" for a in axes)
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", text)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)  # shortest exact: 0.01, 1e-05


def children_of(doc: Mapping[str, Any], stage: str, limit: int) -> list[dict[str, Any]]:
    """The child job documents a grid stage forks."""
    spec = doc["stages"][stage]
    points = expand_grid(spec["grid"], f"stages.{stage}.grid", limit)
    axes = [k for k, v in flatten(spec["grid"]) if isinstance(v, list)]
    children = []
    seen: dict[str, Mapping[str, Any]] = {}
    for point in points:
        child_id = _child_id(doc, stage, point, axes, seen)
        children.append({
            "pipeline": doc["pipeline"], "id": child_id, "parent": doc["id"],
            "current_stage": spec["child_stage"], "point": point,
            "config": merged(doc.get("config", {}), point), "stages": doc["stages"],
            "env": doc.get("env", {}),
        })
    return children


def _child_id(doc: Mapping[str, Any], stage: str, point: Mapping[str, Any], axes: list[str],
              seen: dict[str, Mapping[str, Any]]) -> str:
    """The id of a point's child; a point whose id an earlier point in `seen` took is an error."""
    child_id = f"{doc['id']}__{point_label(stage, point, axes)}"
    if not is_valid_id(child_id):
        raise ConfigError(f"stages.{stage}.grid", f"the job id {child_id!r} is not valid "
                                                  "(too long or odd characters)")
    if child_id in seen:
        swept = [{a: p[a] for a in axes} for p in (seen[child_id], point)]
        raise ConfigError(f"stages.{stage}.grid",
                          f"the points {swept[0]} and {swept[1]} both name the job {child_id!r} "
                          "(ids keep only letters, digits and ._=+,-): make the values distinct")
    seen[child_id] = point
    return child_id


# -- execution -------------------------------------------------------------------------------


def execute_stage(doc: dict[str, Any], ctx: StageContext) -> Outcome:
    """Run the job's current stage; the caller writes `doc` and moves the file."""
    stage = doc["current_stage"]
    spec = doc["stages"][stage]
    kind = stage_kind(doc["stages"], stage)
    if kind == "grid":
        return _fork(doc, stage, ctx)
    if kind == "processor":
        options = dict(spec["processor"]) if isinstance(spec["processor"], Mapping) else {}
        options.pop("kind", None)
        outcome = PROCESSORS.get(processor_name(stage, spec["processor"]))(doc, options, ctx)
        return outcome if outcome is not None else after(doc, stage)
    _run_kind(doc, stage, spec["hyperparams"], ctx)
    return after(doc, stage)


def after(doc: Mapping[str, Any], stage: str) -> Outcome:
    """What follows `stage`: its next_stage, or the end of the job."""
    nxt = doc["stages"][stage].get("next_stage")
    return Advance(nxt) if nxt else Finish()


def _fork(doc: dict[str, Any], stage: str, ctx: StageContext) -> Outcome:
    children = children_of(doc, stage, ctx.max_grid_points)
    _check_not_forked_before(doc, stage, [c["id"] for c in children])
    for child in children:
        _check_kind_config(child)
    for child in children:
        ctx.area.create(child["id"], child)  # idempotent: a retried fork skips existing children
    ids = [c["id"] for c in children]
    doc.setdefault("forks", {})[stage] = ids
    doc["waiting_for"] = {"stage": stage, "children": ids}
    return Wait()


def _check_not_forked_before(doc: Mapping[str, Any], stage: str, ids: list[str]) -> None:
    """Points of strings carry no stage name: two grids of one job could fork the same id."""
    for other, forked in (doc.get("forks") or {}).items():
        if other != stage and (same := set(ids) & set(forked)):
            raise ConfigError(f"stages.{stage}.grid", f"would fork {sorted(same)[0]!r}, which "
                                                      f"stage {other!r} already forked")


def _kind_call(doc: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kind a hyperparams stage runs and the config it gets."""
    settings = {k: v for k, v in overrides.items() if k != "kind"}
    return overrides.get("kind", DEFAULT_KIND), merged(doc.get("config", {}), settings)


def _check_kind_config(child: Mapping[str, Any]) -> None:
    stage = child["current_stage"]
    if stage_kind(child["stages"], stage) != "hyperparams":
        return
    name, config = _kind_call(child, child["stages"][stage]["hyperparams"])
    check = KIND_CHECKS.get(name)
    if check is None:
        return
    try:
        check(config)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (in the config of the child {child['id']}, "
                                   "checked before it was queued)") from None


def _run_kind(doc: dict[str, Any], stage: str, overrides: Mapping[str, Any],
              ctx: StageContext) -> None:
    if doc.get("result_stage") == stage and "result" in doc:
        return  # re-running a job that already has its result does not train again
    name, config = _kind_call(doc, overrides)
    kind = KINDS.get(name)
    started = time.monotonic()
    output = kind(config, ctx)
    doc.update(output)
    doc["run_config"] = {"kind": name, **config}  # exactly what ran: config + stage overrides
    doc.setdefault("timings", {})["total_s"] = round(time.monotonic() - started, 3)
    doc["result_stage"] = stage
    doc["provenance"] = {**environment(ctx.device), "host": ctx.host, "runner": ctx.runner,
                         "finished_at": now_iso()}


def missing_children(doc: Mapping[str, Any], area: WorkArea) -> list[str]:
    """Children the job waits for that are not finished yet."""
    waiting = doc.get("waiting_for") or {}
    return [c for c in waiting.get("children", []) if area.done_path(c, doc["pipeline"]) is None]


def join(doc: dict[str, Any]) -> Outcome:
    """All children are finished: the job goes on after the stage that forked them."""
    stage = doc.pop("waiting_for")["stage"]
    return after(doc, stage)
