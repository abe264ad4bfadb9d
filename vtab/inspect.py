"""The worst-classified samples of a job, from its per-sample tables (``main_inspect.py``)."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path

from vtab.errors import VtabError
from vtab.workarea import OUTPUTS, SUMMARIZED, checked_id

SUFFIX = "_predictions.csv"


def tables(area: Path, job_id: str) -> list[Path]:
    """The job's per-sample tables, wherever its outputs are now (in flight or summarized)."""
    checked_id(job_id)
    folders = [*area.glob(f"{OUTPUTS}/*/{job_id}"), *area.glob(f"{SUMMARIZED}/*/outputs/{job_id}")]
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
    wrong = [row for row in rows if row.get("correct") == "0"]
    if wrong and wrong[0].get("loss"):
        wrong.sort(key=lambda row: -float(row["loss"]))
    elif wrong and wrong[0].get("confidence"):
        wrong.sort(key=lambda row: -float(row["confidence"]))
    return wrong[:top], len(wrong), len(rows)


def report(area: Path, job_id: str, top: int) -> Iterator[str]:
    for path in tables(area, job_id):
        rows, wrong, total = worst(path, top)
        yield f"{path.relative_to(area)}: {wrong} of {total} wrong"
        if not rows:
            continue
        columns = [c for c in rows[0] if c not in ("split", "correct") and any(r[c] for r in rows)]
        widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
        yield "  " + "  ".join(c.ljust(widths[c]) for c in columns)
        for row in rows:
            yield "  " + "  ".join(_cell(row[c]).ljust(widths[c]) for c in columns)


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
    args = parser.parse_args(argv)
    try:
        for line in report(args.work_area, args.job_id, args.top):
            print(line)
    except VtabError as exc:
        print(f"main_inspect: {exc}")
        return 2
    return 0
