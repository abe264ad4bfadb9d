"""Turn the summaries of finished pipelines into one results table.

Reads ``<root>/<pipeline>/summary.yaml`` for every summarized pipeline and prints a table with the
19 VTAB-1K datasets in the standard order, any other datasets, the natural / specialized /
structured group means and the 19-task mean; optionally writes it as CSV, JSON and Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtab import cli
from vtab.results import parse_results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when at least one summary was read, 1 when the root is missing, "
               "holds no readable summary, or an output file cannot be written.")
    parser.add_argument("--root", type=Path, default=Path("work/summarized"),
                        help="folder holding one <pipeline>/summary.yaml per summarized pipeline "
                             "(default: %(default)s)")
    parser.add_argument("--filter", metavar="PATTERN", dest="pattern",
                        help="only pipelines whose name matches this shell-style pattern, "
                             "e.g. 'vtab1k_*' (quote it so the shell does not expand it)")
    parser.add_argument("--csv", type=Path, metavar="FILE",
                        help="also write the table as CSV: one row per pipeline, a <dataset>_pct "
                             "and a <dataset>_std_pct column per dataset, percent at full "
                             "precision")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the full table as JSON (percent), with the selected "
                             "hyperparameters and the missing datasets of each pipeline")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also write the table as a Markdown pipe table, followed by the "
                             "missing datasets and the selected hyperparameters")
    parser.add_argument("--no_std", action="store_true",
                        help="show only the mean over seeds in each cell, not mean±std "
                             "(terminal and Markdown; CSV and JSON carry the std, but for a "
                             "dataset with one seed)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw the per-dataset comparison of the pipelines (and the "
                             "group means) as a PNG (needs matplotlib: vtab[plots])")
    parser.add_argument("--plot_steps", type=Path, metavar="FILE.png",
                        help="draw the checkpoint sweeps of the pipelines read (their metric "
                             "against the training step) as a PNG (needs matplotlib)")
    parser.add_argument("--tensorboard", type=Path, metavar="DIR",
                        help="write the checkpoint sweeps as TensorBoard events, one run "
                             "vtab_<pipeline> each, into DIR: point it at the pretraining run's "
                             "log folder to see them beside its curves (needs vtab[tensorboard])")
    parser.add_argument("--transpose", action="store_true",
                        help="print datasets as rows and pipelines as columns (terminal and "
                             "Markdown); easier to read for one to three pipelines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return parse_results(args.root, args.pattern, show_std=not args.no_std,
                         transpose=args.transpose, csv_path=args.csv, json_path=args.json,
                         markdown_path=args.markdown, plot_path=args.plot,
                         steps_path=args.plot_steps, tensorboard_dir=args.tensorboard)


if __name__ == "__main__":
    cli.run(main)
