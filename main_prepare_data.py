"""Lay out the embedded digits datasets, or check a data root (see SETUP_DATA.md).

    python main_prepare_data.py digits [--root ROOT]
    python main_prepare_data.py checkpoints [--root ROOT] [--out FOLDER] [--steps 0,10,...]
    python main_prepare_data.py check [--root ROOT] [--datasets a,b,...]

ROOT defaults to $VTAB1K_ROOT, else ./data/vtab-1k.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vtab import cli
from vtab.vtab1k import VTAB1K_DATASETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits", help="write scikit-learn's digits as <root>/digits, "
                                 "<root>/digits_folders and <root>/digit_pairs")
    check = commands.add_parser("check", help="verify split files or class folders and sample "
                                "images")
    check.add_argument("--datasets", default=",".join(VTAB1K_DATASETS),
                       help="comma-separated dataset folders (default: the 19 VTAB-1K tasks)")
    checkpoints = commands.add_parser(
        "checkpoints", help="pretrain a ResNet-18 on digits' train800 (writing the digits "
        "first) and write its weights at several steps, for trying checkpoint sweeps")
    checkpoints.add_argument("--out", type=Path, default=Path("./data/checkpoints/digits_resnet18"),
                             help="folder of the checkpoint_<step>.pth files (default: "
                                  "%(default)s)")
    checkpoints.add_argument("--steps", default="0,10,25,50,100",
                             help="comma-separated training steps to write (default: "
                                  "%(default)s)")
    for sub in (digits, checkpoints, check):
        sub.add_argument("--root", type=Path,
                         default=Path(os.environ.get("VTAB1K_ROOT") or "./data/vtab-1k"))
    args = parser.parse_args(argv)

    if args.command in ("digits", "checkpoints"):
        from vtab.evaluation.digits import write_embedded

        for name, folder in write_embedded(args.root).items():
            print(f"{name} dataset ready in {folder}")
    if args.command == "checkpoints":
        from vtab.evaluation.pretrain import pretrain_digits

        try:
            steps = [int(step) for step in args.steps.split(",")]
        except ValueError:
            parser.error(f"--steps {args.steps!r}: expected whole numbers separated by commas")
        if not steps or min(steps) < 0:
            parser.error(f"--steps {args.steps!r}: steps are whole numbers from 0")
        written = pretrain_digits(args.root, args.out, steps=steps)
        print(f"{len(written)} checkpoints in {args.out}: {', '.join(p.name for p in written)}")
    if args.command != "check":
        return 0
    from vtab.evaluation.data import check_root

    lines, problems = check_root(args.root, [d for d in args.datasets.split(",") if d])
    for line in lines:
        print(line)
    if problems:
        print(f"\n{len(problems)} problem(s) under {args.root}:", *problems, sep="\n  ")
        return 1
    print(f"\nall {len(lines)} dataset(s) under {args.root} look complete")
    return 0


if __name__ == "__main__":
    cli.run(main)
