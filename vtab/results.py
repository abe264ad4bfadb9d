"""Results tables: the summaries of finished pipelines turned into one table.

Each pipeline's summary lives in ``<root>/<pipeline>/summary.yaml``; its folder name is the row
label. Cells are percent. A group mean is the mean of its datasets' means (the VTAB convention) and
is computed only when the row has every dataset of the group: a mean over a subset would not be
comparable with anyone else's number. A missing dataset is an empty cell under its own header,
never a shifted column, and is named below the table.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtab.config import flatten
from vtab.errors import ConfigError, VtabError
from vtab.events import write_scalars
from vtab.fsutil import atomic_write
from vtab.vtab1k import VTAB1K_DATASETS, VTAB1K_GROUPS
from vtab.yamlio import load_mapping

SUMMARY = "summary.yaml"
# The aggregate columns: the three groups, then the 19-task mean (over datasets, not over groups).
AGGREGATES: dict[str, tuple[str, ...]] = {**VTAB1K_GROUPS, "mean": VTAB1K_DATASETS}
MISSING = "-"
_LABELS = ("pipeline", "backbone", "metric")
_SHORT_KEYS = {"weight_decay": "wd"}
_REQUIRED = object()


def one_per_pass(jobs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One job of each pass that ran: sibling jobs trained in one pass (their ``batch``) share
    its record of features and time, which counts once."""
    passes: dict[tuple[str, ...], Mapping[str, Any]] = {}
    for job in jobs:
        # Jobs finished before runs had a report kept `batch` at their top.
        batch = (job.get("report") or job).get("batch", {"jobs": [job["id"]]})
        passes.setdefault(tuple(batch["jobs"]), job)
    return list(passes.values())


class ResultsError(VtabError):
    """The results root cannot be read at all."""


@dataclass(frozen=True)
class Score:
    """One dataset's primary metric on its evaluation split, as fractions: mean and std over the
    final seeds."""

    mean: float
    std: float | None


@dataclass(frozen=True)
class PipelineResult:
    """What the table needs from one summary."""

    pipeline: str
    backbone: dict[str, Any]
    metric: str | None
    split: str | None  # the evaluation split of every dataset, when the summary records one
    scores: dict[str, Score]
    selected: dict[str, dict[str, Any]]  # dataset -> {dotted hyperparameter: value}
    selected_on: dict[str, str]  # dataset -> how it was selected ("result on val200")

    @property
    def backbone_label(self) -> str:
        name, weights = self.backbone.get("name"), self.backbone.get("weights")
        if name is None:
            return MISSING
        return str(name) if weights is None else f"{name} ({weights})"


@dataclass(frozen=True)
class SweepPoint:
    step: int
    mean: float  # a fraction
    std: float | None  # over seeds (and the tasks averaged), None for one value
    checkpoint: str


@dataclass(frozen=True)
class Sweep:
    """A checkpoint sweep's metric per training step, as selected on (``sweep`` of a summary)."""

    pipeline: str
    metric: str | None
    split: str | None
    points: tuple[SweepPoint, ...]
    higher_is_better: bool = True

    def best(self) -> SweepPoint | None:
        """The step the sweep selects by (ties: the first); None if every mean is NaN."""
        scored = [point for point in self.points if not math.isnan(point.mean)]
        if not scored:
            return None
        return (max if self.higher_is_better else min)(scored, key=lambda point: point.mean)


@dataclass
class Loaded:
    """The outcome of scanning a root: what was read and what was not, with reasons."""

    results: list[PipelineResult] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one message per malformed summary
    pending: list[str] = field(default_factory=list)  # pipeline folders without a summary yet


@dataclass(frozen=True)
class Row:
    result: PipelineResult
    aggregates: dict[str, float | None]  # None where the row lacks a dataset of the aggregate
    missing: tuple[str, ...]  # VTAB-1K datasets the row lacks, by name


@dataclass(frozen=True)
class Table:
    datasets: tuple[str, ...]  # VTAB-1K in the standard order (if any), then others by name
    aggregates: tuple[str, ...]  # names from AGGREGATES; empty when no VTAB-1K column is shown
    rows: tuple[Row, ...]


# ---------------------------------------------------------------------------------------------
# Loading


def load_summaries(root: Path, pattern: str | None = None) -> Loaded:
    """Read every ``<root>/<pipeline>/summary.yaml`` whose pipeline name matches `pattern`.

    Malformed summaries are not raised but listed in `Loaded.problems`, so one bad file cannot
    hide the others. Raises `ResultsError` when `root` is not a folder.
    """
    if not root.is_dir():
        raise ResultsError(f"results root {root} does not exist or is not a folder")
    loaded = Loaded()
    for folder in sorted(root.iterdir()):
        if not _is_pipeline_folder(folder, pattern):
            continue
        path = folder / SUMMARY
        if not path.is_file():
            loaded.pending.append(folder.name)
            continue
        try:
            results, sweep = _read(path)
        except (VtabError, OSError) as exc:
            loaded.problems.append(str(exc))
            continue
        loaded.results.extend(results)
        loaded.sweeps.extend([sweep] if sweep else [])
    return loaded


def _is_pipeline_folder(folder: Path, pattern: str | None) -> bool:
    # Dot-folders are temporary or hidden, never pipelines.
    if folder.name.startswith(".") or not folder.is_dir():
        return False
    return not pattern or fnmatch.fnmatchcase(folder.name, pattern)


def _read(path: Path) -> tuple[list[PipelineResult], Sweep | None]:
    """Read one summary: one result per row (a grid point besides the dataset) and variant
    (layer, k), and its checkpoint sweep if any; raises `VtabError` naming the file (and the key
    when a key is wrong)."""
    pipeline = path.parent.name
    try:
        data = load_mapping(path, follow_link=True)
        return _parse_summary(data, pipeline), parse_sweep(data, pipeline)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None


def parse_sweep(data: dict[str, Any], pipeline: str) -> Sweep | None:
    """The ``sweep`` of a summary, if it has one (a NaN run's mean stays NaN)."""
    sweep = _get(data, "sweep", dict, "a mapping", default=None)
    if sweep is None:
        return None
    points = []
    for index, point in enumerate(_get(sweep, "points", list, "a list", "sweep")):
        where = f"sweep.points[{index}]"
        if not isinstance(point, dict):
            raise ConfigError(where, f"expected a mapping, got {type(point).__name__}")
        step = _get(point, "step", int, "a whole number", where)
        nan = isinstance(point.get("mean"), float) and math.isnan(point["mean"])  # a NaN run
        points.append(SweepPoint(step, math.nan if nan else _fraction(point, "mean", where,
                                                                      _REQUIRED),
                                 None if nan or point.get("n") == 1 else
                                 _fraction(point, "std", where, None),
                                 str(_get(point, "checkpoint", str, "a path", where, ""))))
    mode = _get(sweep, "mode", str, "max or min", "sweep", "max")
    return Sweep(pipeline, _get(sweep, "metric", str, "a string", "sweep", None),
                 _get(sweep, "split", str, "a string", "sweep", None), tuple(points),
                 higher_is_better=mode != "min")


def _parse_summary(data: dict[str, Any], pipeline: str) -> list[PipelineResult]:
    """A summary of datasets (with the coordinates they share, ``labels``), or of ``rows``,
    each its coordinates and datasets (a checkpoint sweep's steps, a swept backbone)."""
    if "rows" not in data:
        labels = _get(data, "labels", dict, "a mapping", default={})
        return _row_results(data, pipeline, labels,
                            _get(data, "datasets", dict, "a mapping of dataset name to results"),
                            "datasets")
    found = []
    for index, row in enumerate(_get(data, "rows", list, "a list of rows")):
        where = f"rows[{index}]"
        if not isinstance(row, dict):
            raise ConfigError(where, f"expected a mapping, got {type(row).__name__}")
        own = {"backbone": _get(row, "backbone", dict, "a mapping", where)} if row.get(
            "backbone") is not None else {}
        found += _row_results({**data, **own}, pipeline,
                              _get(row, "labels", dict, "a mapping", where, {}),
                              _get(row, "datasets", dict, "a mapping of dataset name to "
                                                          "results", where),
                              f"{where}.datasets")
    return found


def _row_results(data: dict[str, Any], pipeline: str, labels: dict[str, Any],
                 datasets: dict[str, Any], where: str) -> list[PipelineResult]:
    """One result for a row's datasets, or one per variant (layer, k) when they report
    several; named by the pipeline, the row's coordinates and the variant."""
    entries = {_dataset_name(name, where): _get(datasets, name, dict, "a mapping", where)
               for name in datasets}
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for name, entry in entries.items():
        for variant in _get(entry, "variants", dict, "a mapping", f"{where}.{name}", {}):
            found = _get(entry["variants"], variant, dict, "a mapping",
                         f"{where}.{name}.variants")
            variants.setdefault(str(variant), {})[name] = {**entry, **found}
    coordinates = [f"{key}={_compact_value(value)}" for key, value in labels.items()]
    if not variants:
        return [_pipeline_result(data, _row_name(pipeline, coordinates), entries, where)]
    return [_pipeline_result(data, _row_name(pipeline, [*coordinates, variant]), scored, where)
            for variant, scored in variants.items()]


def _row_name(pipeline: str, parts: list[str]) -> str:
    return f"{pipeline} [{', '.join(parts)}]" if parts else pipeline


def _pipeline_result(data: dict[str, Any], pipeline: str, entries: dict[str, dict[str, Any]],
                     where: str) -> PipelineResult:
    return PipelineResult(
        pipeline=pipeline,
        backbone=_get(data, "backbone", dict, "a mapping", default={}),
        metric=_get(data, "metric", str, "a string", default=None),
        split=_get(data, "split", str, "a string", default=None),
        scores={name: _score(entry, f"{where}.{name}") for name, entry in entries.items()},
        selected={name: dict(flatten(_get(entry, "selected", dict, "a mapping",
                                          f"{where}.{name}", default={})))
                  for name, entry in entries.items()},
        selected_on={name: _selection(entry) for name, entry in entries.items()
                     if isinstance(entry.get("selected_on"), dict)},
    )


def _selection(entry: dict[str, Any]) -> str:
    how = entry["selected_on"]
    return f"{how.get('metric') or 'result'} on {how.get('split') or 'an unrecorded split'}"


def _dataset_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{where}.{name}", "a dataset name must be a string")
    return name


def _score(entry: dict[str, Any], where: str) -> Score:
    """The mean, and the std over seeds unless there was one seed (a std of one value says
    nothing; the table shows none rather than ±0.0)."""
    seeds = entry.get("seeds")
    one_seed = isinstance(seeds, dict) and len(seeds) == 1
    return Score(mean=_fraction(entry, "result", where, _REQUIRED),
                 std=None if one_seed else _fraction(entry, "std", where, None))


def _fraction(entry: dict[str, Any], key: str, where: str, default: Any) -> float | None:
    value = _get(entry, key, (int, float), "a number", where, default)
    if value is None:
        return None
    if isinstance(value, bool) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"{where}.{key}", f"expected a fraction in [0, 1], got {value!r}")
    return float(value)


def _get(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
         where: str = "", default: Any = _REQUIRED) -> Any:
    """``mapping[key]`` checked against `kind`; null counts as absent. `where` prefixes errors."""
    dotted = f"{where}.{key}" if where else key
    value = mapping.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(dotted, "is required but missing")
        return default
    if not isinstance(value, kind):
        raise ConfigError(dotted, f"expected {what}, got {type(value).__name__} {value!r:.60}")
    return value


# ---------------------------------------------------------------------------------------------
# The table


def build_table(results: Iterable[PipelineResult]) -> Table:
    """Rows sorted by pipeline; VTAB-1K columns and aggregates only if some row has VTAB-1K data."""
    ordered = sorted(results, key=lambda result: result.pipeline)
    present = {name for result in ordered for name in result.scores}
    vtab = VTAB1K_DATASETS if present & set(VTAB1K_DATASETS) else ()
    aggregates = tuple(AGGREGATES) if vtab else ()
    rows = tuple(
        Row(result=result,
            aggregates={name: _aggregate(result, AGGREGATES[name]) for name in aggregates},
            missing=tuple(sorted(set(vtab) - set(result.scores))))
        for result in ordered)
    return Table(datasets=vtab + tuple(sorted(present - set(VTAB1K_DATASETS))),
                 aggregates=aggregates, rows=rows)


def _aggregate(result: PipelineResult, members: tuple[str, ...]) -> float | None:
    if not all(name in result.scores for name in members):
        return None
    return math.fsum(result.scores[name].mean for name in members) / len(members)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_text(table: Table, *, show_std: bool = True, transpose: bool = False) -> str:
    """The terminal view: a caption, the aligned table, missing datasets, selected settings."""
    grid, label_columns = _oriented_grid(table, show_std, transpose)
    lines = [_caption(table, show_std), "", *_aligned(grid, label_columns)]
    missing = _missing_lines(table)
    if missing:
        lines += ["", "missing VTAB-1K datasets (cells '-', group means left out):",
                  *(f"  {line}" for line in missing)]
    selected = _selected(table)
    if selected:
        lines += ["", f"selected hyperparameters ({_chosen(table)}):"]
        for pipeline, settings in selected:
            width = max(len(dataset) for dataset, _ in settings)
            lines += [f"  {pipeline}",
                      *(f"    {dataset.ljust(width)}  {text}" for dataset, text in settings)]
    return "\n".join(lines) + "\n"


def render_markdown(table: Table, *, show_std: bool = True, transpose: bool = False) -> str:
    """A pipe table followed by the missing datasets and the selected hyperparameters."""
    grid, label_columns = _oriented_grid(table, show_std, transpose)
    rule = ["---" if i < label_columns else "---:" for i in range(len(grid[0]))]
    lines = [_caption(table, show_std), "", *(_markdown_row(row) for row in (grid[0], rule,
                                                                            *grid[1:]))]
    missing = _missing_lines(table)
    if missing:
        lines += ["", "**Missing VTAB-1K datasets** (cells '-', group means left out)", "",
                  *(f"- {_escape(line)}" for line in missing)]
    selected = _selected(table)
    if selected:
        lines += ["", f"**Selected hyperparameters** ({_chosen(table)})", ""]
        for pipeline, settings in selected:
            lines += [f"- {_escape(pipeline)}",
                      *(f"  - {_escape(dataset)} `{text}`" for dataset, text in settings)]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """One row per pipeline; numbers in percent at full precision (column suffix ``_pct``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pipeline", "backbone", "weights", "metric", "split",
                     *(f"{name}{suffix}" for name in table.datasets
                       for suffix in ("_pct", "_std_pct")),
                     *(f"{name}_pct" for name in table.aggregates), "missing"])
    for row in table.rows:
        result = row.result
        scores = [result.scores.get(name) for name in table.datasets]
        writer.writerow([
            result.pipeline, _or_empty(result.backbone.get("name")),
            _or_empty(result.backbone.get("weights")), _or_empty(result.metric),
            _or_empty(result.split),
            *(_or_empty(percent(value)) for score in scores
              for value in ((score.mean, score.std) if score else (None, None))),
            *(_or_empty(percent(row.aggregates[name])) for name in table.aggregates),
            ";".join(row.missing)])
    return buffer.getvalue()


def render_json(table: Table) -> str:
    """The whole table as JSON, numbers in percent (``"unit": "percent"``), null where absent."""
    document = {
        "unit": "percent",
        "datasets": list(table.datasets),
        "aggregates": {name: list(AGGREGATES[name]) for name in table.aggregates},
        "rows": [_json_row(table, row) for row in table.rows],
    }
    # default=str: YAML may hold dates and other values JSON has no type for.
    return json.dumps(document, indent=2, default=str) + "\n"


def _json_row(table: Table, row: Row) -> dict[str, Any]:
    result = row.result
    return {
        "pipeline": result.pipeline,
        "backbone": result.backbone,
        "metric": result.metric,
        "split": result.split,
        "results": {name: {"mean": percent(score.mean), "std": percent(score.std)}
                    for name in table.datasets if (score := result.scores.get(name))},
        "aggregates": {name: percent(value) for name, value in row.aggregates.items()},
        "missing": list(row.missing),
        "selected": {name: setting for name, setting in result.selected.items() if setting},
    }


def percent(value: float | None) -> float | None:
    """A fraction in percent, without the binary noise of the multiplication (0.913 -> 91.3)."""
    return None if value is None else float(f"{value * 100:.12g}")


def _or_empty(value: Any) -> str:
    return "" if value is None else str(value)


def _caption(table: Table, show_std: bool) -> str:
    spread = "mean±std" if show_std else "mean"
    caption = f"Results in percent: {spread} over seeds of {_shown(table)}."
    if table.aggregates:
        caption += (" Group means (and the 19-task mean) are means of dataset means, shown only"
                    " when the row has every dataset of the group.")
    return caption


def _shown(table: Table) -> str:
    """What the cells are, as the summaries record it: the metric and the evaluation split."""
    results = [row.result for row in table.rows]
    metrics = {result.metric for result in results}
    splits = {result.split for result in results}
    metric = (f"{next(iter(metrics))}" if len(metrics) == 1 and None not in metrics
              else "each pipeline's metric (column 'metric')")
    if len(splits) == 1 and None not in splits:
        return f"{metric} on {next(iter(splits))}"
    named = ", ".join(f"{r.pipeline}: {r.split or 'not recorded'}" for r in results)
    return f"{metric} on each pipeline's evaluation split ({named})"


def _oriented_grid(table: Table, show_std: bool, transpose: bool) -> tuple[list[list[str]], int]:
    """The cells with the header row first, and how many leading columns hold labels."""
    grid = _grid(table, show_std)
    if transpose:
        return [list(column) for column in zip(*grid, strict=True)], 1
    return grid, len(_LABELS)


def _grid(table: Table, show_std: bool) -> list[list[str]]:
    header = [*_LABELS, *table.datasets, *table.aggregates]
    body = [[row.result.pipeline, row.result.backbone_label, row.result.metric or MISSING,
             *(_cell(row.result.scores.get(name), show_std) for name in table.datasets),
             *(_number(row.aggregates[name]) for name in table.aggregates)]
            for row in table.rows]
    return [header, *body]


def _cell(score: Score | None, show_std: bool) -> str:
    if score is None:
        return MISSING
    if show_std and score.std is not None:
        return f"{_number(score.mean)}±{_number(score.std)}"
    return _number(score.mean)


def _number(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.1f}"


def _aligned(grid: list[list[str]], label_columns: int) -> list[str]:
    # Labels read best left-aligned, numbers right-aligned.
    widths = [max(len(cell) for cell in column) for column in zip(*grid, strict=True)]
    lines = ["  ".join(cell.ljust(width) if i < label_columns else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in grid]
    return [lines[0], "  ".join("-" * width for width in widths), *lines[1:]]


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def _escape(text: str) -> str:
    return text.replace("|", r"\|")


def _missing_lines(table: Table) -> list[str]:
    return [_missing_line(row) for row in table.rows if row.missing]


def _missing_line(row: Row) -> str:
    total = len(VTAB1K_DATASETS)
    if len(row.missing) == total:  # naming all 19 would only hide that none is there
        return f"{row.result.pipeline}: no VTAB-1K dataset ({total} of {total} missing)"
    return f"{row.result.pipeline}: missing {len(row.missing)} of {total}: {', '.join(row.missing)}"


def _selected(table: Table) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per pipeline with any tuning, (dataset, compact setting) in column order."""
    selected = []
    for row in table.rows:
        chosen = row.result.selected
        settings = [(name, compact_setting(chosen[name]))
                    for name in table.datasets if chosen.get(name)]
        if settings:
            selected.append((row.result.pipeline, settings))
    return selected


def _chosen(table: Table) -> str:
    """How the selected settings were chosen, as the summaries record it."""
    ways = {way for row in table.rows for name, way in row.result.selected_on.items()
            if row.result.selected.get(name)}
    recorded = all(name in row.result.selected_on for row in table.rows
                   for name, setting in row.result.selected.items() if setting)
    if len(ways) == 1 and recorded:
        return f"chosen by the best mean {next(iter(ways))}"
    if not ways:
        return "chosen during tuning; the summaries do not record on which split"
    return "chosen during tuning, not all alike: see selected_on in each summary"


def compact_setting(setting: dict[str, Any]) -> str:
    """``{optim.lr: 0.01, optim.weight_decay: 0.0}`` -> ``lr=0.01 wd=0``.

    Keys are shortened to their last dotted component, unless two would then read the same.
    """
    short = {key: _SHORT_KEYS.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1])
             for key in setting}
    counts = Counter(short.values())
    return " ".join(f"{short[key] if counts[short[key]] == 1 else key}={_compact_value(value)}"
                    for key, value in setting.items())


def _compact_value(value: Any) -> str:
    """A number in its shortest form; a list's items joined by commas; a mapping's string
    values joined by colons, then its other values as key=value (a layer ``{name: layer3,
    pool: avgpool2d, kernel_size: 6, stride: null}`` reads ``layer3:avgpool2d(kernel_size=6)``)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(_compact_value, value))
    if isinstance(value, dict):
        names = ":".join(v for v in value.values() if isinstance(v, str))
        rest = ",".join(f"{k}={_compact_value(v)}" for k, v in value.items()
                        if v is not None and not isinstance(v, str))
        return f"{names}({rest})" if rest else names
    return str(value)


# ---------------------------------------------------------------------------------------------
# The command


def parse_results(root: Path, pattern: str | None = None, *, show_std: bool = True,
                  transpose: bool = False, csv_path: Path | None = None,
                  json_path: Path | None = None, markdown_path: Path | None = None,
                  plot_path: Path | None = None, steps_path: Path | None = None,
                  tensorboard_dir: Path | None = None) -> int:
    """Print the table of the summaries under `root` and write the requested files.

    Returns the exit code: 0 when at least one summary was read, 1 otherwise (with the reason on
    stderr) or when an output file cannot be written.
    """
    try:
        loaded = load_summaries(root, pattern)
    except ResultsError as exc:
        return _fail(str(exc))
    for problem in loaded.problems:
        print(f"warning: skipped malformed summary: {problem}", file=sys.stderr)
    if loaded.pending:
        print(f"note: not summarized yet (no {SUMMARY}): {', '.join(loaded.pending)}",
              file=sys.stderr)
    if not loaded.results:
        return _fail(_nothing_read(root, pattern, loaded))
    table = build_table(loaded.results)
    print(render_text(table, show_std=show_std, transpose=transpose), end="")
    outputs: list[tuple[Path | None, Callable[[], str]]] = [
        (csv_path, lambda: render_csv(table)),
        (json_path, lambda: render_json(table)),
        (markdown_path, lambda: render_markdown(table, show_std=show_std, transpose=transpose)),
    ]
    for path, render in outputs:
        if path is not None and not _write(path, render()):
            return 1
    if plot_path is not None:
        from vtab.plots import plot_table  # matplotlib only when a plot is asked for

        try:
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot_table(table, plot_path)
        except (VtabError, OSError) as exc:
            return _fail(f"cannot plot to {plot_path}: {exc}")
        print(f"wrote {plot_path}", file=sys.stderr)
    if steps_path is None and tensorboard_dir is None:
        return 0
    if not loaded.sweeps:
        names = sorted({row.result.pipeline.split(" [")[0] for row in table.rows})
        return _fail(f"no checkpoint sweep among the pipelines read ({', '.join(names)}): "
                     "only a pipeline that selects among checkpoints (a grid over {checkpoints: "
                     "pattern}, then select_best) has one")
    return _write_sweeps(loaded.sweeps, steps_path, tensorboard_dir)


def _write_sweeps(sweeps: list[Sweep], steps_path: Path | None,
                  tensorboard_dir: Path | None) -> int:
    """The checkpoint sweeps as a PNG of the metric against the step, and as TensorBoard
    events (one run ``vtab_<pipeline>`` each) under `tensorboard_dir`."""
    try:
        if steps_path is not None:
            from vtab.plots import plot_sweeps  # matplotlib only when a plot is asked for

            steps_path.parent.mkdir(parents=True, exist_ok=True)
            plot_sweeps(sweeps, steps_path)
            print(f"wrote {steps_path}", file=sys.stderr)
        if tensorboard_dir is not None:
            for sweep in sweeps:
                run = tensorboard_dir / f"vtab_{sweep.pipeline}"
                write_scalars(run, sweep_scalars(sweep))
                print(f"wrote {run}", file=sys.stderr)
    except (VtabError, OSError) as exc:
        return _fail(str(exc))
    return 0


def sweep_scalars(sweep: Sweep) -> list[tuple[str, float, int]]:
    """(tag, value, step) of a sweep: its metric on its split, per step."""
    tag = f"{sweep.metric or 'result'}/{sweep.split or 'eval'}"
    return [(tag, point.mean, point.step) for point in sweep.points
            if not math.isnan(point.mean)]


def _write(path: Path, text: str) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")
        return False
    print(f"wrote {path}", file=sys.stderr)
    return True


def _nothing_read(root: Path, pattern: str | None, loaded: Loaded) -> str:
    matching = f" for pipelines matching {pattern!r}" if pattern else ""
    reasons = [f"{len(items)} {what}" for items, what in ((loaded.problems, "malformed"),
                                                          (loaded.pending, "not summarized yet"))
               if items]
    if reasons:
        return f"no summary could be read under {root}{matching} ({', '.join(reasons)})"
    return f"no summaries under {root}{matching} (expected {root}/<pipeline>/{SUMMARY})"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
