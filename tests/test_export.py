"""Exported embeddings (main_export.py): files other tools load in two lines, equal to the store's
rows, and errors that name the file and the key."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.test_evaluation import probe_config
from vtab.evaluation.data import open_split
from vtab.evaluation.export import export_features
from vtab.evaluation.probe import run_linear_probe


def export_config(root: Path, **data: object) -> dict:
    return {"dataset": "digits", "data": {"root": str(root), **data},
            "backbone": {"name": "resnet18", "weights": "none"},
            "features": {"image_size": 32, "batch_size": 128,
                         "layers": [{"name": "output"}, {"name": "layer3", "pool": "avg"}]}}


def test_exported_features_are_the_rows_jobs_train_on(digits_root: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    export_features(export_config(digits_root, splits=["train800", "val200"]), out,
                    cache_dir=cache, progress=False)
    # The two lines a numpy user writes (pandas: pandas.read_csv(".../manifest.csv")):
    manifest = list(csv.DictReader((out / "manifest.csv").open()))
    rows = np.load(out / "train800.output.npy")
    assert list(manifest[0]) == ["image", "split", "target", "file", "row", "layer"]
    assert rows.shape == (800, 512) and rows.dtype == np.float32
    assert np.load(out / "val200.layer3_avg.npy").shape == (200, 256)
    train = open_split(digits_root, "digits", "train800", key="data.splits")
    ours = [line for line in manifest if line["file"] == "train800.output.npy"]
    assert [line["image"] for line in ours] == train.paths
    assert [int(line["row"]) for line in ours] == list(range(800))
    assert [int(line["target"]) for line in ours] == list(train.labels)
    assert len(manifest) == 2 * (800 + 200)  # every row of every file
    # The same features a linear probe on this cache trains on: it forwards nothing.
    job = run_linear_probe(probe_config(digits_root), cache_dir=cache, progress=False)
    assert job["features"]["train"]["cached"] and job["features"]["eval"]["cached"]


def test_the_command_names_the_file_and_the_key(digits_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump(export_config(digits_root, splits=["train800", "nope"],
                                                   spilts=["x"])))
    done = subprocess.run([sys.executable, "main_export.py", "--config", str(config), "--out",
                           str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert str(config) in done.stderr and "data.spilts" in done.stderr
    config.write_text(yaml.safe_dump(export_config(digits_root, splits=["train800", "nope"])))
    done = subprocess.run([sys.executable, "main_export.py", "--config", str(config), "--out",
                           str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "data.splits[1]" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written before every split opened


@pytest.mark.parametrize("splits", [[], ["../x"]])
def test_bad_split_lists_are_refused(digits_root: Path, tmp_path: Path, splits: list) -> None:
    from vtab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.splits"):
        export_features(export_config(digits_root, splits=splits), tmp_path / "out",
                        cache_dir=tmp_path / "cache", progress=False)
