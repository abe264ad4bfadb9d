"""VTAB-1K data (digits layout, split parsing, the check command) and the linear probe."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main_prepare_data
from vtab.config import set_path
from vtab.errors import ConfigError, DataError
from vtab.evaluation import probe
from vtab.evaluation.data import ImageSplit, num_classes, open_split, read_split_file
from vtab.evaluation.digits import SIZES, write_digits
from vtab.evaluation.features import extract_features
from vtab.evaluation.probe import run_linear_probe
from vtab.evaluation.store import FeatureCache


def split_lines(folder: Path, split: str) -> list[str]:
    return (folder / f"{split}.txt").read_text().splitlines()


def test_digits_layout(digits_root: Path) -> None:
    from sklearn.datasets import load_digits

    folder = digits_root / "digits"
    entries = {split: read_split_file(folder / f"{split}.txt") for split in SIZES}
    assert {split: len(lines) for split, lines in entries.items()} == SIZES
    assert entries["train800val200"] == entries["train800"] + entries["val200"]
    used = [path for split in ("train800", "val200", "test") for path, _ in entries[split]]
    assert len(set(used)) == 1797  # every digit once, no overlap between splits
    assert all(path.startswith("images/train800/") for path, _ in entries["train800"])

    digits = load_digits()
    path, label = entries["test"][0]
    index = int(Path(path).stem)
    assert label == digits.target[index]
    with Image.open(folder / path) as image:
        assert (image.mode, image.size) == ("L", (8, 8))
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, np.rint(digits.images[index] * 255 / 16))


def test_digits_is_idempotent_and_redoes_an_interrupted_run(digits_root: Path,
                                                            tmp_path: Path) -> None:
    before = (digits_root / "digits" / "test.txt").stat().st_mtime_ns
    assert write_digits(digits_root) == digits_root / "digits"
    assert (digits_root / "digits" / "test.txt").stat().st_mtime_ns == before

    folder = write_digits(tmp_path)
    first = split_lines(folder, "val200")
    (folder / "val200.txt").write_text("\n".join(first[:10]) + "\n")  # as if cut short
    write_digits(tmp_path)
    assert split_lines(folder, "val200") == first


def make_dataset(root: Path, lines: str, split: str = "train800") -> Path:
    folder = root / "toy"
    (folder / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("L", (4, 4), 128).save(folder / "images" / name)
    (folder / f"{split}.txt").write_text(lines)
    return folder


@pytest.mark.parametrize(("lines", "problem"), [
    ("images/a.png 0\nimages/b.png\n", "expected '<image path> <label>'"),
    ("images/a.png 0\nimages/b.png -1\n", "not a non-negative integer"),
    ("images/a.png 0\nimages/b.png 1.5\n", "not a non-negative integer"),
    ("images/a.png 0\nimages/b.png 1 2\n", "expected '<image path> <label>'"),
])
def test_bad_split_line_names_file_and_line(tmp_path: Path, lines: str, problem: str) -> None:
    folder = make_dataset(tmp_path, lines)
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path, "toy", "train800", key="data.train_split")
    assert caught.value.key == "data.train_split"
    assert f"{folder / 'train800.txt'}:2:" in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(("root", "dataset", "split", "key"), [
    ("nowhere", "toy", "train800", "data.root"),
    ("", "nothing", "train800", "dataset"),
    ("", "toy", "val200", "data.eval_split"),
])
def test_missing_folder_or_split_names_the_key_and_path(tmp_path: Path, root: str, dataset: str,
                                                       split: str, key: str) -> None:
    make_dataset(tmp_path, "images/a.png 0\n")
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path / root, dataset, split, key=key)
    assert caught.value.key == key
    assert str((tmp_path / root).absolute()) in str(caught.value)


def test_split_images_and_num_classes(tmp_path: Path) -> None:
    make_dataset(tmp_path, "images/a.png 0\n\nimages/b.png 4\nimages/gone.png 1\n")
    split = open_split(tmp_path, "toy", "train800", key="data.train_split")
    assert split.labels == [0, 4, 1]  # the blank line is skipped
    assert num_classes([split]) == 5
    dataset = ImageSplit(split, transform=lambda image: (*image.size, image.mode))
    assert dataset[1] == ((4, 4, "RGB"), 4, 1)
    with pytest.raises(DataError, match=r"images/gone\.png"):
        dataset[2]


def test_check_command(digits_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = str(digits_root)
    assert main_prepare_data.main(["check", "--root", root, "--datasets", "digits"]) == 0
    assert "train800 800, val200 200, train800val200 1000, test 797" in capsys.readouterr().out

    make_dataset(tmp_path, "images/a.png 0\nimages/missing.png 1\n")
    assert main_prepare_data.main(["check", "--root", str(tmp_path), "--datasets", "toy,dtd"]) == 1
    out = capsys.readouterr().out
    assert "toy/val200.txt missing" in out
    assert "has 2 lines, expected 800" in out
    assert "images/missing.png" in out
    assert "dtd: folder" in out


def probe_config(root: Path, **overrides: Any) -> dict[str, Any]:
    config = {
        "dataset": "digits",
        "data": {"root": str(root)},
        "backbone": {"name": "resnet18", "weights": "none"},
        "features": {"image_size": 32, "batch_size": 128},
        "optim": {"lr": 0.1, "epochs": 5, "batch_size": 64},
        "seed": 0,
    }
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


def test_linear_probe_end_to_end(digits_root: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = probe_config(digits_root)
    first = run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False,
                             outputs_dir=tmp_path / "out")
    # Ten classes (chance 0.1); this setup measured 0.955-0.97 over seeds.
    assert first["result"] > 0.85
    assert first["result"] == first["metrics"]["top1"]
    assert set(first["metrics"]) == {"top1", "top5", "balanced_accuracy", "macro_f1"}
    assert (first["num_classes"], first["feature_dim"]) == (10, 512)
    assert (first["num_train"], first["num_eval"]) == (800, 200)
    assert first["backbone"] == {"weights_id": "random-seed0", "missing_keys": 0,
                                 "unexpected_keys": 0}
    assert not first["features"]["train"]["cached"] and not first["features"]["eval"]["cached"]
    assert (first["features"]["train"]["forwarded"], first["features"]["eval"]["forwarded"]) == (
        800, 200)
    assert yaml.safe_load(yaml.safe_dump(first)) == first  # plain values only

    with open(tmp_path / "out" / "val200_predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 200
    assert rows[0]["id"].startswith("images/val200/")
    correct = sum(row["target"] == row["prediction"] for row in rows)
    assert correct / 200 == pytest.approx(first["result"])
    assert sum(int(row["correct"]) for row in rows) == correct
    assert {row["split"] for row in rows} == {"val200"}

    def no_build(*args: Any) -> None:
        raise AssertionError("the backbone was built although both splits are cached")

    monkeypatch.setattr(probe, "build_backbone", no_build)
    second = run_linear_probe(config, cache_dir=tmp_path / "cache", progress=False)
    for role in ("train", "eval"):
        assert second["features"][role] == {**first["features"][role], "cached": True,
                                            "forwarded": 0}
    assert second["metrics"] == first["metrics"]  # deterministic on CPU


def own_folders(digits_root: Path, root: Path) -> Path:
    """digits laid out as RepAdapter's VTAB-1K copy is: train800val200 keeps copies of the
    train800 and val200 images in a folder of its own (``images/train800val200/``)."""
    shutil.copytree(digits_root / "digits", root / "digits")
    folder = root / "digits"
    (folder / "images" / "train800val200").mkdir()
    lines = []
    for line in (folder / "train800val200.txt").read_text().splitlines():
        path, label = line.split()
        copy = f"images/train800val200/{Path(path).parent.name}_{Path(path).name}"
        shutil.copyfile(folder / path, folder / copy)
        lines.append(f"{copy} {label}\n")
    (folder / "train800val200.txt").write_text("".join(lines))
    return root


@pytest.mark.parametrize("layout", ["shared", "own_folders"])
def test_each_image_is_forwarded_once_over_the_protocol(digits_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        layout: str) -> None:
    if layout == "own_folders":  # rows are matched by image content, not by path
        digits_root = own_folders(digits_root, tmp_path / "repadapter")
    forwarded: list[str] = []

    def counting(model: Any, layers: Any, source: Any, split: Any, *args: Any,
                 **kwargs: Any) -> Any:
        forwarded.extend(split.paths)
        return extract_features(model, layers, source, split, *args, **kwargs)

    monkeypatch.setattr(probe, "extract_features", counting)
    final = probe_config(digits_root, **{"data.train_split": "train800val200",
                                         "data.eval_split": "test"})
    run_linear_probe(probe_config(digits_root), cache_dir=tmp_path / "cache", progress=False)
    result = run_linear_probe(final, cache_dir=tmp_path / "cache", progress=False)
    assert result["features"]["train"]["forwarded"] == 0  # all of it from train800 and val200
    assert result["features"]["eval"]["forwarded"] == 797
    assert sorted(forwarded) == sorted(set(forwarded)) and len(forwarded) == 1797

    reused = FeatureCache(tmp_path / "cache").load(result["features"]["train"]["keys"]["output"])
    assert reused is not None and reused.meta["reused"] == 1000
    direct = run_linear_probe(final, cache_dir=tmp_path / "fresh", progress=False)
    assert direct["features"]["train"]["forwarded"] == 1000  # no siblings cached there
    fresh = FeatureCache(tmp_path / "fresh").load(direct["features"]["train"]["keys"]["output"])
    assert fresh is not None and reused.paths == fresh.paths
    torch.testing.assert_close(reused.features, fresh.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("key", "value"), [
    ("optim.lr", "fast"), ("optim.lr", 0), ("optim.epochs", 0), ("head.kind", "forest"),
    ("optim.name", "lamb"), ("features.image_size", 3.5), ("backbone.source", "nowhere"),
    ("data.eval_split", "val999"),
])
def test_linear_probe_rejects_bad_config(digits_root: Path, tmp_path: Path, key: str,
                                         value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        run_linear_probe(probe_config(digits_root, **{key: value}), cache_dir=tmp_path / "cache",
                         progress=False)
    assert caught.value.key == key
    assert not (tmp_path / "cache").exists()  # rejected before any work
