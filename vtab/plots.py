"""Pictures of results: the per-dataset comparison of pipelines, and checkpoint sweeps' metric
against the training step (matplotlib, an extra)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from vtab.errors import VtabError
from vtab.fsutil import atomic_write
from vtab.results import Sweep, Table, percent

NEEDS_MATPLOTLIB = ("plots need matplotlib, which is not installed: pip install 'vtab[plots]' "
                    "(or pip install matplotlib)")


def pyplot() -> Any:
    """matplotlib's pyplot on a backend that needs no display; a clear error when missing."""
    try:
        import matplotlib
    except ImportError:
        raise VtabError(NEEDS_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table(table: Table, path: Path) -> None:
    """A grouped bar chart: for each dataset its mean (error bar: std over seeds) per pipeline,
    then the group means; written as a PNG. Refused when the pipelines share no dataset."""
    shared = [name for name in table.datasets
              if all(name in row.result.scores for row in table.rows)]
    if not shared:
        names = ", ".join(row.result.pipeline for row in table.rows)
        raise VtabError(f"the pipelines to plot ({names}) have no dataset in common: choose "
                        "pipelines evaluated on the same datasets (--filter)")
    columns = table.datasets + table.aggregates
    plt = pyplot()
    width = 0.8 / len(table.rows)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.55 * len(columns) * max(1, len(table.rows))
                                             ** 0.5 + 2), 4.5))
    for index, row in enumerate(table.rows):
        means, errors = [], []
        for name in columns:
            if name in row.result.scores:
                score = row.result.scores[name]
                means.append(percent(score.mean))
                errors.append(percent(score.std) or 0.0)
            else:  # a group mean, or a dataset this pipeline lacks (no bar)
                means.append(percent(row.aggregates.get(name)))
                errors.append(0.0)
        positions = [c + (index - (len(table.rows) - 1) / 2) * width for c in range(len(columns))]
        kept = [(p, m, e) for p, m, e in zip(positions, means, errors, strict=True)
                if m is not None]
        axes.bar([p for p, _, _ in kept], [m for _, m, _ in kept], width,
                 yerr=[e for _, _, e in kept], capsize=2, label=row.result.pipeline)
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(columns, rotation=45, ha="right")
    if table.aggregates:
        axes.axvline(len(table.datasets) - 0.5, color="grey", linewidth=0.8)
    metrics = {row.result.metric for row in table.rows} - {None}
    axes.set_ylabel(f"{'/'.join(sorted(metrics)) or 'result'} (%), mean over seeds")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    _save(figure, plt, path, dpi=120)


def plot_sweeps(sweeps: list[Sweep], path: Path) -> None:
    """Each checkpoint sweep's metric (mean over seeds and the tasks it averages, band: std)
    against the training step, its best step starred; written as a PNG."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for sweep in sweeps:
        steps = [point.step for point in sweep.points]
        means = np.array([percent(point.mean) for point in sweep.points])  # NaN: a gap
        stds = np.array([percent(point.std) or 0.0 for point in sweep.points])
        line, = axes.plot(steps, means, marker="o", markersize=4, label=sweep.pipeline)
        axes.fill_between(steps, means - stds, means + stds, color=line.get_color(), alpha=0.15)
        best = sweep.best()
        if best is not None:
            axes.plot([best.step], [percent(best.mean)], marker="*", markersize=14,
                      color=line.get_color(), linestyle="none")
    shown = {f"{s.metric or 'result'} on {s.split or 'an unrecorded split'}" for s in sweeps}
    axes.set_title(f"{'; '.join(sorted(shown))} per checkpoint (star: the best)",
                   fontsize="medium")
    axes.set_xlabel("training step")
    metrics = sorted({s.metric or "result" for s in sweeps})
    axes.set_ylabel(f"{'/'.join(metrics)} (%), mean over seeds")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    _save(figure, plt, path, dpi=120)


def scatter_png(points: np.ndarray, targets: list[int], correct: list[bool], path: Path,
                title: str) -> None:
    """Points coloured by class; mistakes drawn as crosses over the dots of the right ones."""
    plt = pyplot()
    colours = plt.get_cmap("tab20" if max(targets, default=0) >= 10 else "tab10")
    figure, axes = plt.subplots(figsize=(7, 6))
    right = np.array(correct, dtype=bool)
    shade = [colours(t % colours.N) for t in targets]
    for mask, marker, size, label in ((right, "o", 12, "correct"), (~right, "x", 36, "wrong")):
        if mask.any():
            axes.scatter(points[mask, 0], points[mask, 1], marker=marker, s=size,
                         c=[colour for colour, kept in zip(shade, mask, strict=True) if kept],
                         linewidths=1.2)
        # The legend's entry in grey: the colours are the classes'.
        axes.scatter([], [], c="grey", marker=marker, s=size, label=f"{label} ({int(mask.sum())})")
    axes.set_title(title, fontsize="medium")
    axes.set_xlabel("component 1")
    axes.set_ylabel("component 2")
    axes.legend(fontsize="small", title="colour: class", title_fontsize="small")
    _save(figure, plt, path, dpi=110)


def _save(figure: Any, plt: Any, path: Path, dpi: int) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())
