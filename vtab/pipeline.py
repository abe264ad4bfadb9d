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

import contextlib
import copy
import itertools
import json
import re
import socket
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtab.checkpoints import LABEL as CHECKPOINT_LABEL
from vtab.checkpoints import CheckpointAxis, is_checkpoint_axis
from vtab.config import delete_path, flat_entries, merged, resolve_env, set_path
from vtab.errors import Advice, ConfigError, VtabError, did_you_mean
from vtab.outcome import RunOutcome, has_scores
from vtab.provenance import environment, now_iso, peak_memory_mib
from vtab.registry import Registry
from vtab.schema import Section
from vtab.schema import validate as validate_schema
from vtab.workarea import (
    CRASHED,
    FINISHED,
    SUFFIX,
    WorkArea,
    checked_id,
    describe_owner,
    is_valid_id,
)

STAGE_KINDS = ("grid", "processor", "hyperparams")
STAGE_KEYS = {
    "grid": {"grid", "child_stage", "next_stage", "skip_crashed"},
    "processor": {"processor", "next_stage"},
    "hyperparams": {"hyperparams", "next_stage"},
}
ROOT_KEYS = {"name", "current_stage", "config", "stages", "description"}
# Written by runners into any job, a pipeline not yet expanded included (after a crash), with
# their types: anything else under these names would break the runners.
BOOKKEEPING_TYPES: dict[str, type] = {
    "attempts": int, "environment_failures": int, "lease": dict, "errors": list, "error": dict,
    "previous_errors": list, "history": list}
BOOKKEEPING_KEYS = set(BOOKKEEPING_TYPES)
DEFAULT_MAX_GRID_POINTS = 10_000
DEFAULT_KIND = "linear_probe"
MAX_PLANNED_JOBS = 100_000  # a pipeline's jobs in all, checked one by one when it is queued
MAX_PLANNED_BYTES = 1 << 30  # what its job files may hold in all


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
    staging: Path | None = None  # where the job's outputs go while it runs (its claim's)
    # Modules whose functions may build backbones (backbone.source: module): the runner's
    # operator's choice, since such a job runs code it names.
    trusted_modules: tuple[str, ...] = ()

    def outputs_dir(self) -> Path:
        return self.staging or self.area.outputs(self.job["pipeline"], self.job["id"])

    def artefacts(self) -> list[str]:
        """The files the job wrote into its outputs folder so far, relative to it."""
        folder = self.outputs_dir()
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def features_cache(self) -> Path:
        return self.cache_dir or self.area.root / "cache" / "features"


# A kind runs with its validated config (an instance of its schema); an inspection returns
# problems and advice about a config without doing the work.
RunKind = Callable[[Any, StageContext], RunOutcome]
Inspect = Callable[[Any], list[ConfigError | Advice]]
# Sibling jobs whose configs give equal keys can run in one pass (`run_many`); None: alone.
BatchKey = Callable[[Any], Hashable | None]
# Configs with equal batch keys, one context each -> each job's output, or the error that ends it.
RunMany = Callable[[list[Any], list[StageContext]], list["RunOutcome | Exception"]]


@dataclass(frozen=True)
class JobKind:
    """What a ``hyperparams`` stage runs: the schema of its config and the code that runs it.

    `inspect` looks beyond the config without doing the work (data files, model names, weights
    in the local cache); `complete` fills in values that depend on more than the config (a
    backbone's own input size, the precision on this device), so that ``run_config`` records
    the value that ran.
    """

    name: str
    schema: type[Section]
    run: RunKind
    inspect: Inspect | None = None
    complete: Callable[[Any, str], Any] | None = None  # (config, device) -> config
    batch_key: BatchKey | None = None
    run_many: RunMany | None = None
    # Imports what the kind's runs need (torch, for the evaluation kinds), so that a runner can
    # do it while idle rather than when its first job of the kind is in hand.
    warm: Callable[[], object] | None = None


KINDS: Registry[JobKind] = Registry("job kind", "hyperparams.kind")


def register_kind(name: str, schema: type[Section], *,
                  inspect: Inspect | None = None,
                  complete: Callable[[Any, str], Any] | None = None,
                  batch_key: BatchKey | None = None,
                  run_many: RunMany | None = None,
                  warm: Callable[[], object] | None = None,
                  ) -> Callable[[RunKind], RunKind]:
    if (batch_key is None) != (run_many is None):
        raise ValueError(f"job kind {name}: batch_key and run_many come together")

    def add(run: RunKind) -> RunKind:
        KINDS.register(name)(JobKind(name, schema, run, inspect, complete, batch_key, run_many,
                                     warm))
        return run

    return add


Processor = Callable[[dict[str, Any], Any, StageContext], "Outcome | None"]
# For checking a plan before anything runs: the documents a processor at `stage` can leave
# (select_best: one per setting it may select), given the grid stages the job forked so far,
# and the problems of its options in this plan (a grid_stage never forked).
Foresee = Callable[[dict[str, Any], str, Any, list[str]],
                   tuple[list[dict[str, Any]], list[ConfigError]]]


@dataclass(frozen=True)
class ProcessorKind:
    """A non-training step: it edits its job document and may end it (Finish) or fork (Wait).

    Its options are checked against `options` when the pipeline is read, so that a mistake is
    refused before the grid it processes has trained; `foresee` checks them against the plan.
    """

    name: str
    options: type[Section]
    run: Processor
    foresee: Foresee | None = None


PROCESSORS: Registry[ProcessorKind] = Registry("processor", "processor")


def register_processor(name: str, options: type[Section], *,
                       foresee: Foresee | None = None) -> Callable[[Processor], Processor]:
    def add(run: Processor) -> Processor:
        PROCESSORS.register(name)(ProcessorKind(name, options, run, foresee))
        return run

    return add


# -- validation ------------------------------------------------------------------------------


def stage_kind(stages: Mapping[str, Any], name: str) -> str:
    spec = stages[name]
    kinds = [k for k in STAGE_KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"stages.{name}", f"needs exactly one of {', '.join(STAGE_KINDS)}; "
                                            f"found {', '.join(kinds) or 'none'}")
    return kinds[0]


def validate(doc: Mapping[str, Any]) -> None:
    """Check the stage machine of a job document; raise one ConfigError naming every problem."""
    stages = doc.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigError("stages", "must be a non-empty mapping of stage names to stages")
    problems = []
    if not isinstance(doc.get("config", {}), Mapping):
        problems.append(ConfigError("config", "must be a mapping"))
    current = doc.get("current_stage")
    if not isinstance(current, str) or current not in stages:
        problems.append(ConfigError("current_stage", f"{current!r} is not one of the stages "
                                                     f"({', '.join(map(str, stages))})"))
    for name, spec in stages.items():
        try:
            _validate_stage(stages, name, spec)
        except ConfigError as exc:
            problems.append(exc)
    problems += job_key_problems(doc)
    if not problems:  # a cycle can only be followed through stages that are whole
        _check_acyclic(stages)
    if problems:
        raise ConfigError.combine(problems)


def job_key_problems(doc: Mapping[str, Any]) -> list[ConfigError]:
    """The keys runners write into a job, checked like any other key when it is read: those
    that name files (id, pipeline, parent, forks, waiting_for) must be job ids, so that no job
    can lead a runner out of the work area; the others must have their types."""
    problems = [ConfigError(key, f"is written by runners and must be a {kind.__name__} (got "
                                 f"{type(doc[key]).__name__}); remove it from the pipeline")
                for key, kind in BOOKKEEPING_TYPES.items()
                if key in doc and (not isinstance(doc[key], kind) or isinstance(doc[key], bool))]
    problems += [ConfigError(key, f"is a count runners keep and cannot be negative (got "
                                  f"{doc[key]})")
                 for key in ("attempts", "environment_failures")
                 if isinstance(doc.get(key), int) and doc[key] < 0]
    ids: list[tuple[str, object]] = [(k, doc[k]) for k in ("id", "pipeline") if k in doc]
    if doc.get("parent") is not None:
        ids.append(("parent", doc["parent"]))
    forks = doc.get("forks", {})
    if not isinstance(forks, Mapping):
        problems.append(ConfigError("forks", "must be a mapping of stage names to job ids"))
        forks = {}
    for stage, children in forks.items():
        ids += _id_list(f"forks.{stage}", children, problems)
    waiting = doc.get("waiting_for")
    if waiting is not None:
        if not isinstance(waiting, Mapping) or not isinstance(waiting.get("stage"), str):
            problems.append(ConfigError("waiting_for", "must be a mapping with a stage and "
                                                       "its children"))
        else:
            ids += _id_list("waiting_for.children", waiting.get("children"), problems)
    for key, value in ids:
        try:
            checked_id(value, key)
        except ConfigError as exc:
            problems.append(exc)
    return problems


def _id_list(key: str, value: object, problems: list[ConfigError]) -> list[tuple[str, object]]:
    if not isinstance(value, list):
        problems.append(ConfigError(key, "must be a list of job ids"))
        return []
    return [(f"{key}[{index}]", item) for index, item in enumerate(value)]


def _validate_stage(stages: Mapping[str, Any], name: str, spec: Any) -> None:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"stages.{name}", "must be a mapping")
    kind = stage_kind(stages, name)
    problems = []
    for key in sorted(set(spec) - STAGE_KEYS[kind]):
        problems.append(ConfigError(f"stages.{name}.{key}", f"unknown key for a {kind} stage"
                                    f"{did_you_mean(key, STAGE_KEYS[kind])} (known: "
                                    f"{', '.join(sorted(STAGE_KEYS[kind]))})"))
    for ref in ("next_stage", "child_stage"):
        if ref in spec and spec[ref] not in stages:
            problems.append(ConfigError(f"stages.{name}.{ref}", f"{spec[ref]!r} is not one of "
                                        f"the stages{did_you_mean(spec[ref], map(str, stages))}"))
    if kind == "grid" and "child_stage" not in spec:
        problems.append(ConfigError(f"stages.{name}.child_stage",
                                    "a grid stage must name the stage its children start at"))
    try:
        _validate_stage_body(name, kind, spec)
    except ConfigError as exc:
        problems.append(exc)
    if problems:
        raise ConfigError.combine(problems)


def _validate_stage_body(name: str, kind: str, spec: Mapping[str, Any]) -> None:
    body = spec[kind]
    if kind == "grid":
        if not isinstance(body, Mapping) or not body:
            raise ConfigError(f"stages.{name}.grid", "must be a non-empty mapping of axes")
        if not isinstance(spec.get("skip_crashed", False), bool):
            raise ConfigError(f"stages.{name}.skip_crashed", "must be true or false")
        grid_entries(body, f"stages.{name}.grid")  # checkpoint axes are well formed
    elif kind == "hyperparams":
        if not isinstance(body, Mapping):
            raise ConfigError(f"stages.{name}.hyperparams", "must be a mapping")
        _job_kind(name, body)
    else:
        processor_call(name, body)


def _job_kind(stage: str, body: Mapping[str, Any]) -> JobKind:
    try:
        return KINDS.get(body.get("kind", DEFAULT_KIND))
    except ConfigError as exc:
        raise ConfigError(f"stages.{stage}.hyperparams.kind", exc.message) from None


def processor_call(stage: str, body: Any) -> tuple[ProcessorKind, Section]:
    """The processor a stage names and its options, checked."""
    name = body.get("kind") if isinstance(body, Mapping) else body
    try:
        processor = PROCESSORS.get(name)
    except ConfigError as exc:
        suffix = ".kind" if isinstance(body, Mapping) else ""
        raise ConfigError(f"stages.{stage}.processor{suffix}", exc.message) from None
    options = {k: v for k, v in body.items() if k != "kind"} if isinstance(body, Mapping) else {}
    return processor, validate_schema(processor.options, options,
                                      prefix=f"stages.{stage}.processor")


def kinds_named(doc: Mapping[str, Any], stage: str | None = None) -> set[str]:
    """The job kinds that a job's hyperparams stages name (registered or not; the default kind
    where a stage names none), or only `stage`'s."""
    stages = doc.get("stages")
    if not isinstance(stages, Mapping):
        return set()
    specs = stages.values() if stage is None else [stages.get(stage)]
    bodies = [spec["hyperparams"] for spec in specs
              if isinstance(spec, Mapping) and isinstance(spec.get("hyperparams"), Mapping)]
    return {name for body in bodies
            if isinstance(name := body.get("kind", DEFAULT_KIND), str)}


def kind_call(doc: Mapping[str, Any], stage: str) -> tuple[JobKind, Section]:
    """The kind a hyperparams stage runs and its config (the job's with the stage's overrides
    on top), checked against the kind's schema: every key is read, or this raises."""
    kind, config = _kind_and_config(doc, stage)
    return kind, _checked(kind, config)


def _kind_and_config(doc: Mapping[str, Any], stage: str) -> tuple[JobKind, dict[str, Any]]:
    overrides = doc["stages"][stage]["hyperparams"]
    settings = {k: v for k, v in overrides.items() if k != "kind"}
    return _job_kind(stage, overrides), merged(doc.get("config", {}), settings,
                                               f"stages.{stage}.hyperparams")


def _checked(kind: JobKind, config: Mapping[str, Any]) -> Section:
    others = {f"job kind '{name}'": other.schema for name, other in KINDS.items()
              if name != kind.name}
    return validate_schema(kind.schema, config, elsewhere=others)


def _unreachable(stages: Mapping[str, Any], start: str) -> list[ConfigError]:
    """Stages the pipeline never reaches from `start`: nothing in them would ever run."""
    reached, pending = set(), [start]
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending += [stages[name][ref] for ref in ("next_stage", "child_stage")
                        if ref in stages[name]]
    return [ConfigError(f"stages.{name}", f"is never reached from current_stage {start!r} "
                                          "(through next_stage and child_stage): nothing in it "
                                          "would run; remove it")
            for name in stages if name not in reached]


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
    """Turn a pipeline as a user wrote it into a root job: id, pipeline name, resolved values.

    Dotted keys in ``config`` are nested (``optim.lr: 0.1`` is ``optim: {lr: 0.1}``), as in
    grids and stage overrides. Every problem found is raised at once.
    """
    problems = [ConfigError(key, f"unknown top-level key in a pipeline"
                                 f"{did_you_mean(key, ROOT_KEYS)} (known: "
                                 f"{', '.join(sorted(ROOT_KEYS))})")
                for key in sorted(set(doc) - ROOT_KEYS - BOOKKEEPING_KEYS, key=str)]
    name = doc.get("name", file_stem)
    bad_name = not is_valid_id(name)
    if bad_name:
        problems.append(ConfigError("name", f"{name!r} cannot name a pipeline: use letters, "
                                            "digits and ._=+,- (no '/', '..' or '@'), at most "
                                            "200 characters"))
    used: dict[str, str] = {}
    resolved = resolve_env({"config": doc.get("config", {}), "stages": doc.get("stages")},
                           used=used)
    config = resolved["config"]
    root = {"pipeline": name, "id": name, "parent": None, "current_stage": doc.get("current_stage"),
            "config": merged({}, config, "config") if isinstance(config, Mapping) else config,
            "stages": resolved["stages"], "env": used,
            **{k: v for k, v in doc.items() if k in BOOKKEEPING_KEYS}}
    try:
        validate(root)
        problems += _unreachable(root["stages"], root["current_stage"])
    except ConfigError as exc:  # an invalid name is said once, as the name's problem
        problems += [p for p in exc.problems if not (bad_name and p.key in ("id", "pipeline"))]
    if problems:
        raise ConfigError.combine(problems)
    return root


@dataclass(frozen=True)
class Axis:
    """A swept key of a grid: a list of values, or the files of a checkpoint axis."""

    key: str  # dotted config key
    values: list[Any]
    checkpoints: CheckpointAxis | None = None

    def label(self, value: Any, where: str) -> tuple[str, Any]:
        """(name, value) of a readable coordinate: ``step``, or the dotted key, and its value."""
        if self.checkpoints is not None:
            return CHECKPOINT_LABEL, self.checkpoints.step_of(value, where)
        return self.key, value

    def short(self, value: Any, where: str) -> tuple[str, Any]:
        """The coordinate as job ids write it: ``step``, or the key's last part."""
        name, shown = self.label(value, where)
        return name.rsplit(".", 1)[-1], shown


def grid_entries(grid: Mapping[str, Any], key: str) -> list[tuple[str, Any]]:
    """A grid's (dotted key, value) pairs: a list or a checkpoint axis (a `CheckpointAxis`) is
    swept; any other value is set in every point."""
    return [(k, CheckpointAxis.parse(v, f"{key}.{k}") if is_checkpoint_axis(v) else v)
            for k, v in flat_entries(grid, key, is_leaf=is_checkpoint_axis)]


def _is_axis(value: Any) -> bool:
    return isinstance(value, list | CheckpointAxis)


def grid_points(grid: Mapping[str, Any], key: str, limit: int) -> tuple[
        list[Axis], list[dict[str, Any]]]:
    """The axes of `grid` (checkpoint files looked up now) and the cartesian product of their
    values, each point with the fixed entries set."""
    entries = grid_entries(grid, key)
    axes = []
    for name, value in entries:
        if isinstance(value, CheckpointAxis):
            axes.append(Axis(name, [path for _, path in value.find(f"{key}.{name}")], value))
        elif isinstance(value, list):
            if not value:
                raise ConfigError(f"{key}.{name}", "is an empty list: the grid would have no "
                                                   "points")
            axes.append(Axis(name, value))
    size = 1
    for axis in axes:
        size *= len(axis.values)
    if size > limit:
        raise ConfigError(key, f"expands to {size} jobs, more than the limit of {limit} "
                               "(raise it with --max_grid_points if this is meant)")
    fixed = {k: v for k, v in entries if not _is_axis(v)}
    return axes, [{**fixed, **{a.key: v for a, v in zip(axes, combo, strict=True)}}
                  for combo in itertools.product(*(a.values for a in axes))]


def expand_grid(grid: Mapping[str, Any], key: str, limit: int) -> list[dict[str, Any]]:
    """Cartesian product over the swept entries of `grid` (dotted paths for nesting): lists,
    and checkpoint axes (vtab/checkpoints.py). Scalar entries are set in every point."""
    return grid_points(grid, key, limit)[1]


def point_label(stage: str, coordinates: list[tuple[str, Any]]) -> str:
    """A readable, deterministic file-name fragment for one grid point, from its (short name,
    value) coordinates.

    A point of strings only (a dataset name) is its values; a grid without axes (fixed values
    only, one point) is the stage's name; anything else is ``<stage>__<name>=<value>_...``.
    """
    values = [value for _, value in coordinates]
    if not values:
        text = stage
    elif all(isinstance(v, str) for v in values):
        text = "_".join(values)
    else:
        text = stage + "__" + "_".join(f"{name}={_fmt(value)}" for name, value in coordinates)
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", text)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)  # shortest exact: 0.01, 1e-05


def children_of(doc: Mapping[str, Any], stage: str, limit: int) -> list[dict[str, Any]]:
    """The child job documents a grid stage forks; each carries its readable coordinates
    (``labels``: its parent's, and its own point's)."""
    spec = doc["stages"][stage]
    where = f"stages.{stage}.grid"
    axes, points = grid_points(spec["grid"], where, limit)
    children = []
    seen: dict[str, Mapping[str, Any]] = {}
    for point in points:
        short = [axis.short(point[axis.key], where) for axis in axes]
        child_id = _child_id(doc, stage, point, [axis.key for axis in axes], short, seen)
        labels = {**doc.get("labels", {}),
                  **dict(axis.label(point[axis.key], where) for axis in axes)}
        children.append({
            "pipeline": doc["pipeline"], "id": child_id, "parent": doc["id"],
            "current_stage": spec["child_stage"], "point": point, "labels": labels,
            "config": merged(doc.get("config", {}), point), "stages": doc["stages"],
            "env": doc.get("env", {}),
            # Only in a plan's branches (a setting select_best may pick): kept for its messages.
            **({"assumed": doc["assumed"]} if "assumed" in doc else {}),
        })
    return children


def _child_id(doc: Mapping[str, Any], stage: str, point: Mapping[str, Any], axes: list[str],
              short: list[tuple[str, Any]], seen: dict[str, Mapping[str, Any]]) -> str:
    """The id of a point's child; a point whose id an earlier point in `seen` took is an error.

    A checkpoint the job selected is part of its children's ids: a pipeline queued again may
    select another one, whose jobs must not be mistaken for the first one's."""
    selected = "".join(f"__{name}={_fmt(value)}"
                       for name, value in (doc.get("selected_labels") or {}).items())
    child_id = f"{doc['id']}{selected}__{point_label(stage, short)}"
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


def checkpoint_axes(doc: Mapping[str, Any], grid_stage: str) -> dict[str, CheckpointAxis]:
    """The checkpoint axes of a grid stage, by dotted key (none where the job has no such
    grid stage)."""
    grid = (doc.get("stages") or {}).get(grid_stage, {}).get("grid")
    if not isinstance(grid, Mapping):
        return {}
    return {k: v for k, v in grid_entries(grid, f"stages.{grid_stage}.grid")
            if isinstance(v, CheckpointAxis)}


def apply_selection(doc: dict[str, Any], grid_stage: str, setting: Mapping[str, Any]) -> None:
    """Write a selected `setting` of `grid_stage`'s points into the job's config; a selected
    checkpoint becomes one of the job's coordinates (``labels``, and its later children's ids)."""
    where = f"stages.{grid_stage}.grid"
    checkpoints = checkpoint_axes(doc, grid_stage)
    for key, value in setting.items():
        set_path(doc["config"], key, value)
        if key in checkpoints:
            step = checkpoints[key].step_of(value, f"{where}.{key}")
            doc["labels"] = {**doc.get("labels", {}), CHECKPOINT_LABEL: step}
            doc["selected_labels"] = {**doc.get("selected_labels", {}), CHECKPOINT_LABEL: step}


# -- execution -------------------------------------------------------------------------------


def execute_stage(doc: dict[str, Any], ctx: StageContext) -> Outcome:
    """Run the job's current stage; the caller writes `doc` and moves the file."""
    stage = doc["current_stage"]
    kind = stage_kind(doc["stages"], stage)
    if kind == "grid":
        return _fork(doc, stage, ctx)
    if kind == "processor":
        processor, options = processor_call(stage, doc["stages"][stage]["processor"])
        outcome = processor.run(doc, options, ctx)
        return outcome if outcome is not None else after(doc, stage)
    _run_kind(doc, stage, ctx)
    return after(doc, stage)


def after(doc: Mapping[str, Any], stage: str) -> Outcome:
    """What follows `stage`: its next_stage, or the end of the job."""
    nxt = doc["stages"][stage].get("next_stage")
    return Advance(nxt) if nxt else Finish()


def _fork(doc: dict[str, Any], stage: str, ctx: StageContext) -> Outcome:
    spec = doc["stages"][stage]
    children = children_of(doc, stage, ctx.max_grid_points)
    _check_not_forked_before(doc, stage, [c["id"] for c in children])
    report = PlanReport()
    for child in children:
        if stage_kind(child["stages"], child["current_stage"]) == "hyperparams":
            report.add(child["id"], inspect_run(child, child["current_stage"], deep=True))
    report.raise_errors("checked before the children were queued")
    owner = {"pipeline": doc["pipeline"], "parent": doc["id"]}
    for child in children:  # every id is free, or this job's from a fork it retries
        held = ctx.area.owner_of(child["id"])
        if held not in (None, owner):
            raise ConfigError(f"stages.{stage}.grid", f"would fork {child['id']!r}, which already "
                                                      f"names {describe_owner(held)} in this "
                                                      "work area; nothing was forked")
    # A retried fork skips the children that exist.
    ctx.area.create({child["id"]: child for child in children}, owner)
    _note_forked(ctx.area, doc)
    ids = [c["id"] for c in children]
    doc.setdefault("forks", {})[stage] = ids
    doc["waiting_for"] = {"stage": stage, "children": ids,
                          **({"skip_crashed": True} if spec.get("skip_crashed") else {})}
    return Wait()


def _note_forked(area: WorkArea, doc: Mapping[str, Any]) -> None:
    """A pipeline that forked keeps its name for good (its jobs carry it): say so in its
    reservation, which another pipeline may take over only before that."""
    if doc.get("parent") is not None:
        return
    held = area.owner_of(doc["id"])
    if held is not None and "fingerprint" in held and not held.get("forked"):
        area.update_owner(doc["id"], {**held, "forked": True})


def _check_not_forked_before(doc: Mapping[str, Any], stage: str, ids: list[str]) -> None:
    """Points of strings carry no stage name: two grids of one job could fork the same id."""
    for other, forked in (doc.get("forks") or {}).items():
        if other != stage and (same := set(ids) & set(forked)):
            raise ConfigError(f"stages.{stage}.grid", f"would fork {sorted(same)[0]!r}, which "
                                                      f"stage {other!r} already forked")


def _run_kind(doc: dict[str, Any], stage: str, ctx: StageContext) -> None:
    if _has_result(doc, stage):
        return  # re-running a job that already has its result does not train again
    kind, config = _completed_call(doc, stage, ctx.device)
    started = time.monotonic()
    with _no_exit():
        output = kind.run(config, ctx)
    _record_run(doc, stage, kind, config, output, time.monotonic() - started, ctx)


def _has_result(doc: Mapping[str, Any], stage: str) -> bool:
    return doc.get("result_stage") == stage and has_scores(doc)


def _completed_call(doc: Mapping[str, Any], stage: str, device: str) -> tuple[JobKind, Section]:
    kind, config = kind_call(doc, stage)
    return kind, config if kind.complete is None else kind.complete(config, device)


@contextlib.contextmanager
def _no_exit() -> Iterator[None]:
    try:
        yield
    except SystemExit as exc:  # code a job named called sys.exit: the job fails, not the runner
        raise VtabError(f"the job tried to end its runner (SystemExit {exc.code!r})") from None


def _record_run(doc: dict[str, Any], stage: str, kind: JobKind, config: Section,
                outcome: RunOutcome, seconds: float, ctx: StageContext,
                batch: list[str] | None = None) -> None:
    doc.update(outcome.scores)
    # The time is the whole pass's when the job trained with siblings (`batch`).
    doc["report"] = {**outcome.report,
                     "timings": {**outcome.report.get("timings", {}), "total_s": round(seconds, 3)},
                     **({"batch": {"jobs": list(batch)}} if batch else {})}
    # Exactly what ran: every key the kind read, defaults filled in, nothing it ignored.
    doc["run_config"] = {"kind": kind.name, **config.model_dump(mode="json")}
    artefacts = ctx.artefacts()
    if artefacts:
        doc["artefacts"] = artefacts
    doc["result_stage"] = stage
    # The runner's peak so far, not this job's own: a peak that grows with the jobs a runner
    # has run (rather than with the largest split) shows here.
    doc["provenance"] = {**environment(ctx.device), "host": ctx.host, "runner": ctx.runner,
                         "finished_at": now_iso(),
                         "runner_peak_memory_mib": round(peak_memory_mib())}


def batch_key(doc: Mapping[str, Any], device: str) -> Hashable | None:
    """What a job at its current stage must share with its siblings to run in one pass with
    them; None when it runs alone (a stage that is no hyperparams stage, a kind that cannot
    batch, a config that does not check: it crashes alone)."""
    stage = doc.get("current_stage")
    if "finished_in" in doc or "waiting_for" in doc or _has_result(doc, str(stage)):
        return None
    try:
        if stage_kind(doc["stages"], stage) != "hyperparams":
            return None
        kind, config = _completed_call(doc, stage, device)
    except Exception:  # a job that cannot be read so far is run alone, where it says why
        return None
    if kind.batch_key is None:
        return None
    key = kind.batch_key(config)
    return None if key is None else (stage, kind.name, key)


def execute_batch(docs: list[dict[str, Any]],
                  ctxs: list[StageContext]) -> list[Outcome | Exception]:
    """Run the current hyperparams stage of sibling jobs with equal `batch_key`s in one pass.

    Each job gets its outcome, or the error that ends it alone (its config fails its checks,
    its own evaluation fails); an error of the shared pass is raised for the caller to end
    every job with.
    """
    stage = docs[0]["current_stage"]
    ends: list[Any] = [None] * len(docs)
    calls: dict[int, tuple[JobKind, Section]] = {}
    for i, doc in enumerate(docs):
        try:
            calls[i] = _completed_call(doc, stage, ctxs[i].device)
        except Exception as exc:
            ends[i] = exc
    if calls:
        kind = next(iter(calls.values()))[0]
        started = time.monotonic()
        with _no_exit():
            outputs = kind.run_many([config for _, config in calls.values()],
                                    [ctxs[i] for i in calls])
        seconds = time.monotonic() - started
        batch = [docs[i]["id"] for i in calls] if len(calls) > 1 else None
        for (i, (_, config)), output in zip(calls.items(), outputs, strict=True):
            if isinstance(output, Exception):
                ends[i] = output
                continue
            _record_run(docs[i], stage, kind, config, output, seconds, ctxs[i], batch)
            ends[i] = after(docs[i], stage)
    return ends  # every job has its end: an error above, or its output


# -- checking a whole pipeline -----------------------------------------------------------------


Problems = list[tuple[str, ConfigError]]  # (job id, error) found while walking a plan


def planned_runs(doc: dict[str, Any], limit: int,
                 problems: Problems | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (job, hyperparams stage) that `doc` will run, its forks expanded, in order.

    After a processor that changes the job (select_best), the stages that follow are walked
    once for each document it can leave (each setting it may select). A problem of the plan
    itself (colliding job ids, a processor whose options do not fit it) goes into `problems`
    when given, and that branch is not walked further; else it is raised.
    """
    yield from _walk(doc, doc["current_stage"], [], limit, problems)


def _walk(doc: dict[str, Any], stage: str | None, forked: list[str], limit: int,
          problems: Problems | None) -> Iterator[tuple[dict[str, Any], str]]:
    while stage:
        kind = stage_kind(doc["stages"], stage)
        after_this = doc["stages"][stage].get("next_stage")
        if kind == "hyperparams":
            yield doc, stage
            stage = after_this
            continue
        try:
            branches, found = _branches(doc, stage, kind, forked, limit)
        except ConfigError as exc:  # a grid that cannot fork: go on past it to find the rest
            branches, found = [], [exc]
        for error in found:
            if problems is None:
                raise error
            problems.append((doc["id"], error))
        if kind == "grid":
            for child in branches:
                yield from _walk(child, child["current_stage"], [], limit, problems)
            forked = [*forked, stage]
        else:
            for branch in branches:
                yield from _walk(branch, after_this, forked, limit, problems)
            return
        stage = after_this


def _branches(doc: dict[str, Any], stage: str, kind: str, forked: list[str],
              limit: int) -> tuple[list[dict[str, Any]], list[ConfigError]]:
    """The children a grid stage forks, or the documents a processor stage can leave; and the
    problems found on the way."""
    if kind == "grid":
        return children_of(doc, stage, limit), []
    processor, options = processor_call(stage, doc["stages"][stage]["processor"])
    if processor.foresee is None:
        return [doc], []
    return processor.foresee(doc, stage, options, forked)


def grid_axes(doc: Mapping[str, Any], stage: str) -> list[str]:
    """The swept keys of a grid stage (lists, checkpoint axes), dotted."""
    return [key for key, value in grid_entries(doc["stages"][stage]["grid"],
                                               f"stages.{stage}.grid") if _is_axis(value)]


def count_jobs(doc: dict[str, Any], limit: int) -> int:
    """Jobs the pipeline creates, itself included (forks after a selection are counted too)."""
    total, stage = 1, doc["current_stage"]
    while stage:
        if stage_kind(doc["stages"], stage) == "grid":
            children = children_of(doc, stage, limit)
            total += len(children) * count_jobs(children[0], limit)
        stage = doc["stages"][stage].get("next_stage")
    return total


def inspect_run(job: Mapping[str, Any], stage: str, *, deep: bool) -> list[ConfigError | Advice]:
    """The problems of one planned run: its config against the kind's schema, and when `deep`,
    what the kind's own inspection finds (data files, model names, cached weights)."""
    try:
        kind, raw = _kind_and_config(job, stage)
    except ConfigError as exc:
        return list(exc.problems)
    found: list[ConfigError | Advice] = []
    try:
        config: Section | None = _checked(kind, raw)
    except ConfigError as exc:
        found += exc.problems
        config = _without(kind, raw, exc.problems) if deep else None
    if config is not None and deep and kind.inspect is not None:
        found += kind.inspect(config)
    return found


def _without(kind: JobKind, raw: Mapping[str, Any], problems: list[ConfigError]) -> Section | None:
    """`raw` checked without the keys that have problems (defaults take their place), so that a
    misspelt key does not hide a missing dataset; None if that is not a valid config either."""
    trimmed = copy.deepcopy(dict(raw))
    for problem in problems:
        delete_path(trimmed, problem.key)
    try:
        return _checked(kind, trimmed)
    except ConfigError:
        return None


@dataclass
class PlanReport:
    """Problems found in planned jobs, each listed once with the jobs that have it."""

    errors: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    advice: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # the runs' job ids

    @property
    def runs(self) -> int:
        return len(self.checked)

    def add(self, job_id: str, findings: list[ConfigError | Advice]) -> None:
        for finding in findings:
            into = self.advice if isinstance(finding, Advice) else self.errors
            jobs = into.setdefault((finding.key, finding.message), [])
            if job_id not in jobs:
                jobs.append(job_id)

    def raise_errors(self, note: str) -> None:
        """One ConfigError with every problem; which jobs have them is said once per run of
        problems that the same jobs have."""
        if not self.errors:
            return
        entries = list(self.errors.items())
        problems = []
        for index, ((key, message), jobs) in enumerate(entries):
            last = index + 1 == len(entries) or entries[index + 1][1] != jobs
            where = f" ({jobs_phrase(jobs)}; {note})" if last else ""
            problems.append(ConfigError(key, message + where))
        raise ConfigError.combine(problems)


def jobs_phrase(jobs: list[str]) -> str:
    """``in the job a`` or ``in 24 jobs, e.g. a``."""
    return f"in the job {jobs[0]}" if len(jobs) == 1 else f"in {len(jobs)} jobs, e.g. {jobs[0]}"


def _label(job: Mapping[str, Any]) -> str:
    """The job's id, with the selections a plan branch assumes."""
    assumed = "; ".join(f"{stage} selects {', '.join(f'{k}={v}' for k, v in setting.items())}"
                        for stage, setting in (job.get("assumed") or {}).items())
    return f"{job['id']} (if {assumed})" if assumed else job["id"]


def check_plan(root: dict[str, Any], limit: int, *, deep: bool) -> PlanReport:
    """Check every job `root` will run against its kind's schema (and, when `deep`, the kind's
    inspection), before anything is forked."""
    try:
        total = count_jobs(root, limit)
    except ConfigError:  # a grid that cannot expand: the walk below reports it with the rest
        total = 0
    if total > MAX_PLANNED_JOBS:
        raise ConfigError("stages", f"the pipeline expands to {total} jobs in all, more than "
                                    f"{MAX_PLANNED_JOBS}: split it into several pipelines")
    size = len(json.dumps({k: root.get(k) for k in ("config", "stages")}, default=str))
    if total * size > MAX_PLANNED_BYTES:  # every job carries the config and the stages
        raise ConfigError("stages", f"the pipeline would write about {total * size // 2**20} MiB "
                                    f"of job files ({total} jobs of {size} bytes each), more "
                                    f"than {MAX_PLANNED_BYTES // 2**20} MiB: make its config "
                                    "smaller, or split it into several pipelines")
    report = PlanReport()
    problems: Problems = []
    for job, stage in planned_runs(root, limit, problems):
        report.checked.add(job["id"])  # once, however many settings select_best may pick
        report.add(_label(job), inspect_run(job, stage, deep=deep))
    for job_id, error in problems:
        report.add(job_id, list(error.problems))
    return report


def _unfinished(doc: Mapping[str, Any], area: WorkArea) -> list[str]:
    waiting = doc.get("waiting_for") or {}
    return [c for c in waiting.get("children", []) if area.done_path(c, doc["pipeline"]) is None]


def missing_children(doc: Mapping[str, Any], area: WorkArea) -> list[str]:
    """Children the job waits for that are not finished yet (nor crashed, where its grid
    stage skips crashed children)."""
    unfinished = _unfinished(doc, area)
    if not (doc.get("waiting_for") or {}).get("skip_crashed"):
        return unfinished
    return [c for c in unfinished if not (area.folder(CRASHED) / (c + SUFFIX)).exists()]


def join(doc: dict[str, Any], area: WorkArea) -> Outcome:
    """All children are finished: the job goes on after the stage that forked them. Children
    that crashed where the stage skips them are recorded under ``left_out``."""
    crashed = _unfinished(doc, area)
    stage = doc.pop("waiting_for")["stage"]
    if crashed:
        doc.setdefault("left_out", {})[stage] = crashed
    return after(doc, stage)
