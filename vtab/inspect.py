"""A job's worst-classified samples, from its per-sample tables, and a 2-D projection of its
evaluation features with its mistakes marked (``main_inspect.py``)."""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Iterator
from pathlib import Path

from vtab import yamlio
from vtab.errors import VtabError
from vtab.fsutil import atomic_write, safe_name
from vtab.workarea import OUTPUTS, SUMMARIZED, artefact_folders

SUFFIX = "_predictions.csv"


def tables(area: Path, job_id: str) -> list[Path]:
    """The job's per-sample tables, wherever its outputs are now (in flight or summarized)."""
    folders = artefact_folders(area, job_id)
    found = sorted(path for folder in folders for path in folder.glob(f"*{SUFFIX}"))
    if not found:
        raise VtabError(f"no per-sample tables of {job_id} under {area}/{OUTPUTS} or "
                        f"{area}/{SUMMARIZED}/*/outputs (is the id right, and did it finish?)")
    return found


def worst(path: Path, top: int) -> tuple[list[dict[str, str]], int, int]:
    """The `top` wrong rows of a table, the surest mistakes first (by loss, else by the
    confidence in the wrong class; multi-label rows in file order); and how many rows were
    wrong out of how many."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    wrong = [row for row in rows if _correct(row, path) == "0"]
    if wrong and wrong[0].get("loss"):
        wrong.sort(key=lambda row: -float(row["loss"]))
    elif wrong and wrong[0].get("confidence"):
        wrong.sort(key=lambda row: -float(row["confidence"]))
    return wrong[:top], len(wrong), len(rows)


def _correct(row: dict[str, str], path: Path) -> str:
    """A row's ``correct`` ("1" or "0"); tables written before that column existed have it
    computed from a single-label prediction and target."""
    if row.get("correct") in ("0", "1"):
        return row["correct"]
    if row.get("prediction") and row.get("target"):
        return "1" if row["prediction"] == row["target"] else "0"
    raise VtabError(f"{path} has no correct column (and no prediction and target to tell it "
                    "from): is it a per-sample table of vtab?")


def report(area: Path, job_id: str, top: int) -> Iterator[str]:
    for path in tables(area, job_id):
        rows, wrong, total = worst(path, top)
        yield f"{path.relative_to(area)}: {wrong} of {total} wrong"
        if not rows:
            continue
        columns = [c for c in rows[0] if c not in ("split", "correct") and any(r[c] for r in rows)]
        widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
        yield ("  " + "  ".join(c.ljust(widths[c]) for c in columns)).rstrip()
        for row in rows:
            yield ("  " + "  ".join(_cell(row[c]).ljust(widths[c]) for c in columns)).rstrip()


def job_file(area: Path, job_id: str) -> Path:
    """The file of a finished job (in finished/ or summarized)."""
    found = [*area.glob(f"finished/{job_id}.yaml"),
             *area.glob(f"{SUMMARIZED}/*/jobs/{job_id}.yaml")]
    if not found:
        raise VtabError(f"{job_id} is not a finished job of {area} (finished/ or "
                        f"{SUMMARIZED}/*/jobs/)")
    return found[0]


def projection(area: Path, job_id: str, out: Path, cache_dir: Path, method: str,
               variant: str | None) -> list[Path]:
    """Project the job's evaluation features (fitted on its training features) to 2-D; write
    ``<out>.png`` (coloured by class, mistakes as crosses) and ``<out>.csv`` (id, x, y,
    target, prediction, correct). A job of several variants (layers, k) names one."""
    from vtab.evaluation.projection import project
    from vtab.evaluation.store import FeatureCache
    from vtab.plots import scatter_png

    job = yamlio.load_mapping(job_file(area, job_id))
    # Jobs finished before runs had a report kept `features` at their top.
    features = (job.get("report") or job).get("features") or {}
    keys = {role: features.get(role, {}).get("keys", {}) for role in ("train", "eval")}
    if not keys["eval"]:
        raise VtabError(f"{job_id} records no feature keys: not a linear_probe job?")
    if not keys["train"]:
        raise VtabError(f"{job_id} trained in the online mode: its training features were "
                        "augmented anew each epoch and never cached, so there is nothing to "
                        "fit a projection on")
    variant = _variant(job, job_id, variant)
    # A variant's name starts with its layer's label when the job has several layers.
    label = next(iter(keys["eval"])) if len(keys["eval"]) == 1 else variant.split(" ")[0]
    store = FeatureCache(cache_dir)
    found = {role: store.load(keys[role][label]) for role in keys}
    missing = [role for role, features in found.items() if features is None]
    if missing:
        raise VtabError(f"the {' and '.join(missing)} features of {job_id} are not in "
                        f"{cache_dir} (another --cache_dir?)")
    table_path = _table_of(area, job_id, job, variant)
    with table_path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    points = project(found["train"].float().numpy(), found["eval"].float().numpy(), method)
    rows = [{"id": row["id"], "x": float(x), "y": float(y), "target": row.get("target",
             row.get("targets")), "prediction": row.get("prediction", row.get("predicted")),
             "correct": _correct(row, table_path)}
            for row, (x, y) in zip(table, points, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    png, table_csv = out.parent / f"{out.name}.png", out.parent / f"{out.name}.csv"
    _write_csv(table_csv, rows)
    targets = [int(str(row["target"]).split(",")[0] or 0) for row in rows]
    title = (f"{job_id}: {job['run_config']['data']['eval_split']} "
             f"({len(rows)} images), {method.upper()} fitted on "
             f"{job['run_config']['data']['train_split']}")
    scatter_png(points, targets, [row["correct"] == "1" for row in rows],
                png, title)
    return [png, table_csv]


def _variant(job: dict, job_id: str, variant: str | None) -> str:
    """The variant to project: the one named, or the job's only one ("" for a job of one)."""
    names = list(job.get("variants") or {}) or [""]
    if variant is None and len(names) == 1:
        return names[0]
    if variant not in names:
        raise VtabError(f"{job_id} reports the variants {', '.join(map(repr, names))}: name one "
                        "with --variant" if names != [""] else
                        f"{job_id} reports one result, no variants: leave out --variant")
    return variant


def _table_of(area: Path, job_id: str, job: dict, variant: str) -> Path:
    """The per-sample table of a variant, named as the evaluation names it."""
    split = job["run_config"]["data"]["eval_split"]
    name = "_".join(filter(None, [split, safe_name(variant)])) + SUFFIX
    found = [path for path in tables(area, job_id) if path.name == name]
    if not found:
        raise VtabError(f"{job_id} has no per-sample table {name}")
    return found[0]


def _write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["id"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def _cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("."))
    parser.add_argument("job_id", help="a job's id (its file name without .yaml)")
    parser.add_argument("--work_area", type=Path, default=Path("./work"))
    parser.add_argument("--top", type=int, default=20, help="how many samples per table")
    parser.add_argument("--projection", type=Path, metavar="OUT",
                        help="also write OUT.png and OUT.csv: the job's evaluation features "
                             "projected to 2-D (fitted on its training features), coloured by "
                             "class, mistakes marked")
    parser.add_argument("--method", choices=("pca", "umap"), default="pca",
                        help="the projection (umap needs umap-learn)")
    parser.add_argument("--variant", help="the variant to project, for a job of several (a "
                                          "layer, a k: a key of its variants, such as "
                                          "'layer3:avg' or 'output k=20')")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="the feature store (default: WORK_AREA/cache/features)")
    args = parser.parse_args(argv)
    try:
        for line in report(args.work_area, args.job_id, args.top):
            print(line)
        if args.projection is not None:
            cache = args.cache_dir or args.work_area / "cache" / "features"
            for path in projection(args.work_area, args.job_id, args.projection, cache,
                                   args.method, args.variant):
                print(f"wrote {path}")
    except VtabError as exc:
        print(f"main_inspect: {exc}")
        return 2
    return 0
