"""Export the features of a dataset's splits (.npy files and a manifest.csv) for other tools.

    python main_export.py --config export.yaml --out exported/ [--device cuda:0]

The config names the dataset, its splits, the backbone and how to extract (the keys of a
linear_probe job's dataset, backbone and features; see docs/FEATURES.md, "Exported
embeddings"). Features are taken from the feature store where cached, computed and cached
where not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtab import cli, yamlio
from vtab.errors import ConfigError, VtabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the export's YAML config")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--cache_dir", type=Path, default=Path("./work/cache/features"),
                        help="the feature store (default: the work area's, ./work/cache/"
                             "features)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="DataLoader workers decoding images")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        from vtab.evaluation.export import export_features
        from vtab.evaluation.schemas import ExportConfig
        from vtab.schema import validate

        try:
            config = validate(ExportConfig, yamlio.load_mapping(args.config))
        except ConfigError as exc:
            raise exc.in_file(str(args.config)) from None
        written = export_features(config, args.out, cache_dir=args.cache_dir,
                                  device=args.device, num_workers=args.num_workers,
                                  progress=not args.no_progress and sys.stderr.isatty())
    except VtabError as exc:
        print(f"main_export: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
