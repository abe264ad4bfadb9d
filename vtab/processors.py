"""Processors: the non-training stages that read the results of a job's children.

- ``select_best``: group the children of a fork by their setting (every swept
  axis but the seed), rank settings by the mean over seeds, and write the best
  setting into the job's config;
- ``aggregate``: mean and std over seeds of the children's results (one child
  per seed);
- ``summarize``: collect the per-dataset results of a whole pipeline (one child
  per dataset) into ``summarized/<pipeline>/summary.yaml`` and move all its
  jobs there.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import sys
from collections.abc import Mapping
from typing import Any, Literal

from vtab import yamlio
from vtab.checkpoints import LABEL as CHECKPOINT_LABEL
from vtab.config import get_path, typed
from vtab.errors import ConfigError, VtabError, did_you_mean
from vtab.events import write_scalars
from vtab.faults import crash_point
from vtab.pipeline import (
    Finish,
    StageContext,
    apply_selection,
    checkpoint_axes,
    expand_grid,
    grid_axes,
    register_processor,
)
from vtab.provenance import now_iso
from vtab.results import parse_sweep, sweep_scalars
from vtab.schema import Field, Section
from vtab.workarea import SUMMARIZED, WorkArea, describe_owner

log = logging.getLogger(__name__)
NO_SWEEP_EVENTS = ("tensorboard is not installed: the checkpoint sweep is in summary.yaml only "
                   "(pip install 'vtab[tensorboard]' for TensorBoard events)")
SUMMARY_KEYS = ("result", "std", "seeds", "metrics", "variants", "evaluated_on", "selected",
                "selected_labels", "selected_on", "tuning")


def _where(doc: Mapping[str, Any]) -> str:
    """The dotted key of the running processor, for errors."""
    return f"stages.{doc['current_stage']}.processor"


class FromFork(Section):
    grid_stage: str | None = Field(None, description="the grid stage whose children are read; "
                                                     "default: the job's latest fork")


class SelectBestOptions(FromFork):
    seed_key: str = Field("seed", description="the config key that tells seeds apart; settings "
                                              "are grouped without it")
    mean_over: list[str] = Field([], max_length=16,
                                 description="other swept keys the mean is taken over besides "
                                             "the seed (dataset: pick one checkpoint for "
                                             "several tasks)")
    metric: str = Field("result", description="the dotted key of each child to rank by "
                                              "(result, metrics.macro_f1, ...)")
    mode: Literal["max", "min"] = Field("max", description="whether higher or lower is better")


class AggregateOptions(FromFork):
    seed_key: str = Field("seed", description="the config key that tells seeds apart")


def _grid_read(stage: str, options: FromFork, forked: list[str]) -> str:
    """The grid stage whose children the processor at `stage` reads, checked against the plan."""
    where = f"stages.{stage}.processor"
    if options.grid_stage is None:
        if not forked:
            raise ConfigError(where, "no grid stage forks children before this processor, so "
                                     "it has nothing to read")
        return forked[-1]
    if options.grid_stage not in forked:
        raise ConfigError(f"{where}.grid_stage",
                          f"{options.grid_stage!r} is not a grid stage this job forks before "
                          f"it{did_you_mean(options.grid_stage, forked)} (forked by then: "
                          f"{', '.join(forked) or 'none'})")
    return options.grid_stage


def _seed_key_problems(doc: Mapping[str, Any], stage: str,
                       options: SelectBestOptions | AggregateOptions,
                       grid: str) -> list[ConfigError]:
    """A seed key set by hand must be an axis of the grid read: else no seed is told apart."""
    axes = grid_axes(doc, grid)
    named = [("seed_key", options.seed_key)] if "seed_key" in options.model_fields_set else []
    named += [(f"mean_over[{i}]", key)
              for i, key in enumerate(getattr(options, "mean_over", []))]
    return [ConfigError(f"stages.{stage}.processor.{option}",
                        f"{key!r} is not swept by grid stage {grid!r}"
                        f"{did_you_mean(key, axes)} (its axes: {', '.join(axes)})")
            for option, key in named if key not in axes]


Foreseen = tuple[list[dict[str, Any]], list[ConfigError]]


def _foresee(doc: dict[str, Any], stage: str, options: FromFork,
             forked: list[str]) -> Foreseen:
    """The documents a processor can leave, and the problems of its options in the plan:
    select_best one per setting it may pick (the grid's points without the seed), aggregate
    and summarize the job as it is."""
    try:
        grid = _grid_read(stage, options, forked)
    except ConfigError as exc:
        return [doc], [exc]
    seeded = isinstance(options, SelectBestOptions | AggregateOptions)
    problems = _seed_key_problems(doc, stage, options, grid) if seeded else []
    if not isinstance(options, SelectBestOptions):
        return [doc], problems
    branches: dict[str, dict[str, Any]] = {}
    # The walk has forked this grid under the runner's limit already: no limit again here.
    for point in expand_grid(doc["stages"][grid]["grid"], f"stages.{grid}.grid", sys.maxsize):
        setting = {k: v for k, v in point.items() if k not in _averaged(options)}
        if repr(setting) not in branches:
            branch = {**copy.deepcopy(doc), "assumed": {**doc.get("assumed", {}), stage: setting}}
            apply_selection(branch, grid, setting)
            branches[repr(setting)] = branch
    return list(branches.values()), problems


def _averaged(options: SelectBestOptions) -> set[str]:
    """The keys a setting is grouped without: the seed's, and those the mean is taken over."""
    return {options.seed_key, *options.mean_over}


def _read_stage(doc: Mapping[str, Any], options: FromFork) -> str:
    """The grid stage whose children the processor reads."""
    forks = doc.get("forks") or {}
    stage = options.grid_stage or (next(reversed(forks)) if forks else None)
    if stage not in forks:
        raise ConfigError(f"{_where(doc)}.grid_stage",
                          f"no children were forked by stage {stage!r} "
                          f"(forks so far: {', '.join(forks) or 'none'})")
    return stage


def _fork_children(doc: Mapping[str, Any], options: FromFork) -> list[str]:
    """The finished children of the stage read; those that crashed where the stage skips
    crashed children are left out (``left_out``), and if that is all of them, nothing is read."""
    stage = _read_stage(doc, options)
    left_out = set((doc.get("left_out") or {}).get(stage, []))
    kept = [c for c in doc["forks"][stage] if c not in left_out]
    if not kept:
        raise VtabError(f"{_where(doc)}: every child of stage {stage!r} crashed "
                        f"({', '.join(sorted(left_out))}); there is nothing to read")
    return kept


def _load_child(area: WorkArea, parent: Mapping[str, Any], job_id: str) -> dict[str, Any]:
    """A finished child of `parent`: only a job whose id was reserved for it (a job's forks
    may have been edited by hand to name another pipeline's jobs)."""
    owner = area.owner_of(job_id)
    if owner is not None and owner != {"pipeline": parent["pipeline"], "parent": parent["id"]}:
        raise ConfigError("forks", f"{job_id!r} is not a job {parent['id']!r} forked (it is "
                                   f"{describe_owner(owner)})")
    path = area.done_path(job_id, parent["pipeline"])
    if path is None:
        raise VtabError(f"child job {job_id} is not finished (not in finished/ or summarized/)")
    return yamlio.load_mapping(path)


def _children(doc: Mapping[str, Any], options: FromFork,
              ctx: StageContext) -> list[dict[str, Any]]:
    return [_load_child(ctx.area, doc, c) for c in _fork_children(doc, options)]


def _value(child: Mapping[str, Any], key: str) -> float:
    try:
        return typed(child, key, float)
    except ConfigError as exc:
        raise VtabError(f"child job {child.get('id')}: {exc}") from None


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std; NaN for both when a value is not finite (statistics.pstdev
    raises on NaN and inf instead of returning NaN)."""
    if not all(map(math.isfinite, values)):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _one_per_key(doc: Mapping[str, Any], what: str, hint: str,
                 entries: list[tuple[Any, str, Any]]) -> dict[Any, Any]:
    """``{key: value}`` over (key, child id, value).

    Two children with one key are an error: one would silently overwrite the other.
    """
    out: dict[Any, Any] = {}
    owners: dict[Any, str] = {}
    for key, child_id, value in entries:
        if not isinstance(key, str | int | float | bool):
            raise ConfigError(_where(doc), f"the child {child_id} has a {type(key).__name__} as "
                                           f"its {what}: a {what} must be a single value")
        if key in owners:
            raise ConfigError(_where(doc), f"the children {owners[key]} and {child_id} have the "
                                           f"same {what} {key!r}: {hint}")
        owners[key] = child_id
        out[key] = value
    return out


def _scored_settings(child: Mapping[str, Any], point: dict[str, Any]) -> list[
        tuple[dict[str, Any], Mapping[str, Any]]]:
    """(setting, what holds its result) of a child: its grid point, or one per variant of its
    result (a layer, a k), the variant's own config setting added to the point."""
    variants = child.get("variants")
    if variants is None:
        return [(point, child)]
    where = f"child job {child.get('id')}"
    if not isinstance(variants, Mapping):
        raise VtabError(f"{where}: variants must be a mapping")
    found = []
    for name, scored in variants.items():
        # Without its setting a variant would be ranked together with its siblings.
        if not (isinstance(scored, Mapping) and isinstance(scored.get("setting"), Mapping)
                and scored["setting"]):
            raise VtabError(f"{where}: variant {name!r} lacks the setting that selects it")
        found.append(({**point, **scored["setting"]}, {**scored, "id": child.get("id")}))
    return found


def _variant_names(children: list[dict[str, Any]]) -> list[str] | None:
    """The variant names all `children` report, or None when none reports variants."""
    names = [tuple(c["variants"]) if isinstance(c.get("variants"), Mapping) else None
             for c in children]
    if not any(names):
        return None
    if len(set(names)) != 1:
        raise VtabError(f"the children {', '.join(c['id'] for c in children)} report different "
                        "variants (layers, k): they cannot be averaged")
    return list(names[0])


def _mean_std_of(children: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std of the result and of each metric over `children` (one per seed)."""
    mean, std = _mean_std([_value(c, "result") for c in children])
    metrics = {}
    for name in sorted({m for c in children for m in (c.get("metrics") or {})}):
        m_mean, m_std = _mean_std([_value(c, f"metrics.{name}") for c in children])
        metrics[name] = {"mean": m_mean, "std": m_std}
    return {"result": mean, "std": std, "metrics": metrics}


@register_processor("select_best", SelectBestOptions, foresee=_foresee)
def select_best(doc: dict[str, Any], options: SelectBestOptions, ctx: StageContext) -> None:
    """Pick the setting with the best mean over seeds; ties go to the first in grid order.

    A NaN mean ranks last: `max`/`min` would keep or skip it depending on where it stands.
    """
    metric, higher = options.metric, options.mode == "max"
    groups: dict[tuple[tuple[str, str], ...], tuple[dict[str, Any], list[float]]] = {}
    children = _children(doc, options, ctx)
    for child in children:
        point = {k: v for k, v in child.get("point", {}).items() if k not in _averaged(options)}
        for setting, scored in _scored_settings(child, point):
            key = tuple((k, repr(v)) for k, v in setting.items())
            groups.setdefault(key, (setting, []))[1].append(_value(scored, metric))
    tuning = []
    for setting, values in groups.values():
        mean, std = _mean_std(values)
        tuning.append({"setting": setting, "mean": mean, "std": std, "n": len(values)})
    # Children left out (crashed, skip_crashed) leave a setting fewer values: a mean over
    # fewer seeds or tasks does not compare, and is not selected.
    most = max(row["n"] for row in tuning)
    ranked = [row for row in tuning if not math.isnan(row["mean"]) and row["n"] == most]
    if len(ranked) < len([row for row in tuning if not math.isnan(row["mean"])]):
        log.warning("%s: settings with fewer than %d results are not selected: %s",
                    doc["id"], most, "; ".join(repr(row["setting"]) for row in tuning
                                                if row["n"] < most))
    if not ranked:
        raise VtabError(f"{_where(doc)}: the mean {metric} of every setting is NaN; "
                        "there is nothing to select")
    best = (max if higher else min)(ranked, key=lambda row: row["mean"])
    doc["selected"] = best["setting"]
    how = _evaluated_on_all(doc, children)
    doc["selected_on"] = {"split": how["split"],
                          "metric": how["metric"] if metric == "result" else metric}
    doc["tuning"] = tuning
    grid = _read_stage(doc, options)
    sweep = _sweep(doc, grid, tuning, higher, _averaged(options))
    if sweep:
        doc["sweep"] = {"grid_stage": grid, **doc["selected_on"], "mode": options.mode,
                        "points": sweep}
    apply_selection(doc, grid, best["setting"])


def _sweep(doc: Mapping[str, Any], grid: str, tuning: list[dict[str, Any]], higher: bool,
           averaged: set[str]) -> list[dict[str, Any]]:
    """For a grid with a checkpoint axis (not one averaged over): each step's best mean (over
    the other settings), by step; else nothing."""
    axes = {k: v for k, v in checkpoint_axes(doc, grid).items() if k not in averaged}
    if not axes:
        return []
    key, axis = next(iter(axes.items()))
    where = f"stages.{grid}.grid.{key}"
    best: dict[int, dict[str, Any]] = {}
    for row in tuning:
        step = axis.step_of(row["setting"][key], where)
        kept = best.get(step)
        better = kept is None or math.isnan(kept["mean"]) or (
            row["mean"] > kept["mean"] if higher else row["mean"] < kept["mean"])
        if better:
            best[step] = {CHECKPOINT_LABEL: step, "checkpoint": row["setting"][key],
                          **{k: row[k] for k in ("mean", "std", "n")}}
    return [best[step] for step in sorted(best)]


@register_processor("aggregate", AggregateOptions, foresee=_foresee)
def aggregate(doc: dict[str, Any], options: AggregateOptions, ctx: StageContext) -> None:
    """Mean and std over the seeds of the final runs, one child per seed."""
    seed_key = options.seed_key
    children = _children(doc, options, ctx)
    names = _variant_names(children)

    def results_of(child: Mapping[str, Any]) -> Any:
        if names is None:
            return _value(child, "result")
        return {name: _value({**child["variants"][name], "id": child["id"]}, "result")
                for name in names}

    doc["seeds"] = _one_per_key(
        doc, seed_key, "aggregate averages over seeds only; sweep only the seed in its grid",
        [(get_path(c, f"config.{seed_key}", c["id"]), c["id"], results_of(c)) for c in children])
    doc["evaluated_on"] = _evaluated_on_all(doc, children)
    if names is None:
        doc.update(_mean_std_of(children))
        return
    doc["variants"] = {name: _mean_std_of([{**c["variants"][name], "id": c["id"]}
                                           for c in children]) for name in names}


def evaluated_on(job: Mapping[str, Any]) -> dict[str, Any]:
    """The split and metric behind a job's result: recorded by aggregate, or what it ran with."""
    if "evaluated_on" in job:
        return dict(job["evaluated_on"])
    return {"split": get_path(job, "run_config.data.eval_split", None),
            "metric": get_path(job, "run_config.metric", None)}


def _evaluated_on_all(doc: Mapping[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    """The split and metric all `children` were evaluated on: children that differ would make
    one number of two things."""
    first = evaluated_on(children[0]) if children else {"split": None, "metric": None}
    for child in children[1:]:
        if evaluated_on(child) != first:
            raise ConfigError(_where(doc), f"the children {children[0]['id']} and {child['id']} "
                                           f"differ in their evaluation split or metric ({first} "
                                           f"and {evaluated_on(child)}): they cannot be averaged "
                                           "or compared")
    return first


@register_processor("summarize", FromFork, foresee=_foresee)
def summarize(doc: dict[str, Any], options: FromFork, ctx: StageContext) -> Finish:
    """Write the pipeline's summary and move every job of the pipeline beside it.

    Entries are keyed by their grid point: by dataset, within one row per value of the other
    coordinates the children carry (a checkpoint's step, a swept backbone)."""
    pipeline = doc["pipeline"]
    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for child in _children(doc, options, ctx):
        # A row is a grid point besides the dataset; a checkpoint each dataset's job selected
        # for itself is said in its entry (selected_labels), not made a row of its own.
        own = child.get("selected_labels") or {}
        labels = {k: v for k, v in (child.get("labels") or {}).items()
                  if k != "dataset" and k not in own}
        groups.setdefault(repr(labels), (labels, []))[1].append(child)
    rows = [{"labels": labels, "datasets": _datasets(doc, children),
             **_row_backbone(children)}
            for labels, children in groups.values()]
    config = doc.get("config", {})
    shared = _shared([entry.get("evaluated_on") or {}
                      for row in rows for entry in row["datasets"].values()])
    summary = {
        "pipeline": pipeline,
        "finished_at": now_iso(),
        "metric": shared.get("metric"),  # what the table says it shows; null where they differ
        "split": shared.get("split"),
        # The backbone the children ran with where they share one (each row's, with rows).
        "backbone": rows[0].get("backbone", config.get("backbone", {})),
        # One row: its coordinates (if any) and datasets at the top, as a summary of datasets.
        **({k: v for k, v in rows[0].items() if v and k != "backbone"} if len(rows) == 1
           else {"rows": rows}),
        **{key: doc[key] for key in ("sweep", "left_out") if key in doc},
    }
    folder = ctx.area.real_dir(ctx.area.folder(SUMMARIZED) / pipeline)
    _move_tree(ctx.area, doc)
    yamlio.write_mapping(folder / "summary.yaml", summary)
    try:  # beside the jobs' curves: tensorboard --logdir summarized/<p>
        sweep = parse_sweep(summary, pipeline)
        if sweep is not None:
            write_scalars(folder / "tensorboard" / "sweep", sweep_scalars(sweep),
                          NO_SWEEP_EVENTS)
    except Exception as exc:  # a by-product: the summary stands
        log.warning("the checkpoint sweep's events of %s not written: %s", pipeline, exc)
    return Finish(f"{SUMMARIZED}/{pipeline}/jobs")


def _datasets(doc: Mapping[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per dataset of children that share every other coordinate."""
    return _one_per_key(
        doc, "dataset", "the summary has one entry per dataset and grid point; sweep the "
                        "dataset in the grid it summarizes (tune and aggregate inside each "
                        "dataset's job)",
        [(get_path(c, "config.dataset", c["id"]), c["id"],
          {**{k: c[k] for k in SUMMARY_KEYS if k in c}, "evaluated_on": evaluated_on(c)})
         for c in children])


def _row_backbone(children: list[dict[str, Any]]) -> dict[str, Any]:
    """``{backbone: ...}`` when the children of a row share their config's backbone."""
    found = {repr(get_path(c, "config.backbone", None)): get_path(c, "config.backbone", None)
             for c in children}
    (backbone,) = found.values() if len(found) == 1 else (None,)
    return {"backbone": backbone} if backbone else {}


def _shared(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The keys on which all `entries` agree (a summary's datasets may differ in split)."""
    keys = {key for entry in entries for key in entry}
    return {key: entries[0].get(key) for key in keys
            if len({repr(entry.get(key)) for entry in entries}) == 1}


def _forked(job: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(child, parent) of every child `job` forked and did not leave out (a crashed child stays
    in crashed/, where it can be retried)."""
    left_out = {c for ids in (job.get("left_out") or {}).values() for c in ids}
    return [(c, job["id"]) for ids in (job.get("forks") or {}).values() for c in ids
            if c not in left_out]


def _move_tree(area: WorkArea, root: Mapping[str, Any]) -> None:
    """Move all descendants of `root` from finished/ into ``summarized/<p>/jobs``, and their
    outputs beside.

    Only the root's own descendants, each once: a child is followed only if its id was
    reserved for the job that forked it (files planted in finished/ lead nowhere).
    """
    pipeline = root["pipeline"]
    jobs = area.real_dir(area.summarized_jobs(pipeline))
    pending = _forked(root)
    seen: set[str] = set()
    while pending:
        job_id, parent = pending.pop()
        if job_id in seen:
            continue
        seen.add(job_id)
        owner = area.owner_of(job_id)
        if owner is not None and owner != {"pipeline": pipeline, "parent": parent}:
            raise ConfigError(f"forks of {parent}", f"{job_id!r} is not a job {parent!r} forked "
                                                     f"(it is {describe_owner(owner)})")
        path = area.done_path(job_id, pipeline)
        if path is None:
            raise VtabError(f"job {job_id} of pipeline {pipeline} is not finished")
        child = yamlio.load_mapping(path)
        pending.extend(_forked(child))
        if path.parent != jobs:
            os.replace(path, jobs / path.name)
            crash_point()
    area.summarize_outputs(pipeline)
