"""Data layouts besides VTAB-1K's single-label split files: multi-label split files (with
difficult labels), class folders, and the three embedded digits datasets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_prepare_data
from vtab.errors import ConfigError, DataError
from vtab.evaluation import data
from vtab.evaluation.data import (
    ImageSplit,
    LabelSet,
    Split,
    check_dataset,
    check_root,
    num_classes,
    open_split,
    parse_split_text,
    sibling_splits,
    targets,
)
from vtab.evaluation.digits import (
    CLASS_NAMES,
    PAIR_SIZES,
    PAIRS_DIFFICULT,
    SIZES,
    write_digits,
    write_embedded,
)

EMBEDDED = ("digits", "digits_folders", "digit_pairs")


def png(path: Path, value: int = 100, size: tuple[int, int] = (4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def split_files(root: Path, files: dict[str, str], name: str = "toy",
                images: int = 4) -> Path:
    folder = root / name
    for index in range(images):
        png(folder / "images" / f"{index}.png", 40 * index)
    for split, text in files.items():
        (folder / f"{split}.txt").write_text(text)
    return folder


def class_folders(root: Path, layout: dict[str, dict[str, list[str]]],
                  name: str = "cls") -> Path:
    """`layout`: split -> class -> image names (relative to the class folder)."""
    folder = root / name
    for split, classes in layout.items():
        for cls, images in classes.items():
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            for image in images:
                png(folder / split / cls / image)
    return folder


def open_train(root: Path, name: str = "toy", split: str = "train800",
               task: str = "single_label") -> Split:
    return open_split(root, name, split, key="data.train_split", task=task)


# -- LabelSet and multi-label split files ------------------------------------------------------


def test_label_sets_are_sorted_and_disjoint() -> None:
    assert LabelSet((1, 3), (2,)) == LabelSet((1, 3), (2,))
    assert LabelSet((4,)).difficult == ()
    for positive, difficult in [((3, 1), ()), ((1, 1), ()), ((1,), (1,)), ((), (5, 2))]:
        with pytest.raises(ValueError):
            LabelSet(positive, difficult)


def test_multi_label_lines_parse_to_label_sets() -> None:
    text = "a.png 3,7?\nb.png 0\n\nc.png 9?,2,5\n"
    assert parse_split_text(text, Path("x.txt"), "multi_label") == [
        ("a.png", LabelSet((3,), (7,))),
        ("b.png", LabelSet((0,))),
        ("c.png", LabelSet((2, 5), (9,))),
    ]


def test_multi_label_targets_by_hand(tmp_path: Path) -> None:
    split_files(tmp_path, {"train800": "images/0.png 3,1\nimages/1.png 0,2?\n"
                                       "images/2.png 4?\nimages/3.png 2\n"})
    split = open_train(tmp_path, task="multi_label")
    assert split.task == "multi_label" and split.class_names is None
    assert split.labels == [LabelSet((1, 3)), LabelSet((0,), (2,)), LabelSet((), (4,)),
                            LabelSet((2,))]
    assert num_classes([split]) == 5  # the difficult 4 counts
    expected = torch.tensor([[0, 1, 0, 1, 0],
                             [1, 0, -1, 0, 0],
                             [0, 0, 0, 0, -1],
                             [0, 0, 1, 0, 0]], dtype=torch.int8)
    got = targets(split, 5)
    assert got.dtype == torch.int8 and torch.equal(got, expected)
    assert torch.equal(targets(split, 7)[:, :5], expected)
    assert not targets(split, 7)[:, 5:].any()
    with pytest.raises(ValueError, match="outside"):
        targets(split, 4)
    loaded = ImageSplit(split, transform=lambda image: image.size)
    assert loaded[0] == ((4, 4), -1, 0)  # the loader's label slot: -1, labels come from targets


def test_single_label_targets(tmp_path: Path) -> None:
    split_files(tmp_path, {"train800": "images/0.png 2\nimages/1.png 0\nimages/2.png 2\n"})
    split = open_train(tmp_path)
    got = targets(split, num_classes([split]))
    assert got.dtype == torch.int64 and got.tolist() == [2, 0, 2]
    assert ImageSplit(split, transform=lambda image: image.mode)[0] == ("RGB", 2, 0)


def test_a_single_label_file_read_as_multi_label_gives_one_label_sets(tmp_path: Path) -> None:
    split_files(tmp_path, {"train800": "images/0.png 2\nimages/1.png 0\n"})
    single = open_train(tmp_path)
    multi = open_train(tmp_path, task="multi_label")  # the same file, parsed per task
    assert single.labels == [2, 0]
    assert multi.labels == [LabelSet((2,)), LabelSet((0,))]
    assert single.sha256 == multi.sha256
    assert torch.equal(targets(multi, 3), torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.int8))


@pytest.mark.parametrize(("line", "problem"), [
    ("images/1.png 4,7", "set data.task: multi_label"),
    ("images/1.png 4?", "set data.task: multi_label"),
])
def test_a_multi_label_line_read_as_single_label_says_to_set_the_task(
        tmp_path: Path, line: str, problem: str) -> None:
    folder = split_files(tmp_path, {"train800": f"images/0.png 1\n{line}\n"})
    with pytest.raises(ConfigError) as caught:
        open_train(tmp_path)
    assert caught.value.key == "data.train_split"
    assert f"{folder / 'train800.txt'}:2: a multi-label line" in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(("line", "problem"), [
    ("images/1.png", "empty label set"),
    ("images/1.png ,", "empty label set"),
    ("images/1.png ,,,", "empty label set"),
    ("images/1.png 3,3", "a label appears more than once"),
    ("images/1.png 3,3?", "a label appears more than once"),
    ("images/1.png 2?,2?", "a label appears more than once"),
    ("images/1.png 3,,4", "an empty label"),
    ("images/1.png 3,", "an empty label"),
    ("images/1.png ?", "not a non-negative integer"),
    ("images/1.png 3??", "not a non-negative integer"),
    ("images/1.png 3,-1", "not a non-negative integer"),
    ("images/1.png 2,1000000?", "1000000 or more"),
    ("images/1.png 1 2", "expected '<image path> <label>[,<label>...]'"),
    ("/etc/passwd 1", "the image path is absolute"),
])
def test_bad_multi_label_lines_name_file_and_line(tmp_path: Path, line: str,
                                                  problem: str) -> None:
    folder = split_files(tmp_path, {"train800": f"images/0.png 1,2\n{line}\n"})
    with pytest.raises(ConfigError) as caught:
        open_train(tmp_path, task="multi_label")
    message = str(caught.value)
    assert caught.value.key == "data.train_split"
    assert f"{folder / 'train800.txt'}:2:" in message and problem in message


def test_errors_never_quote_the_line(tmp_path: Path) -> None:
    for line in ("secret.png 7,7", "secret.png 1,secret", "secret.png 1,", "secret.png ,"):
        split_files(tmp_path, {"train800": f"{line}\n"}, name="leak")
        with pytest.raises(ConfigError) as caught:
            open_train(tmp_path, "leak", task="multi_label")
        assert "secret" not in str(caught.value).replace(str(tmp_path), "")
        (tmp_path / "leak" / "train800.txt").unlink()


def test_an_unknown_task_is_refused(tmp_path: Path) -> None:
    split_files(tmp_path, {"train800": "images/0.png 1\n"})
    with pytest.raises(ConfigError) as caught:
        open_train(tmp_path, task="multilabel")
    assert caught.value.key == "data.task"


# -- layouts -----------------------------------------------------------------------------------


def test_mixed_layouts_are_refused_naming_both(tmp_path: Path) -> None:
    folder = split_files(tmp_path, {"train800": "images/0.png 1\n", "test": "images/1.png 0\n"})
    png(folder / "test" / "a" / "0.png")  # a split folder of the same name as test.txt
    for split in ("train800", "test"):  # any split of the dataset, not only the clashing one
        with pytest.raises(ConfigError) as caught:
            open_train(tmp_path, split=split)
        assert caught.value.key == "data.train_split"
        message = str(caught.value)
        assert "mixed layouts" in message
        assert f"{folder / 'test'}.txt" in message and f"{folder / 'test'}/" in message
    summary, problems = check_dataset(tmp_path, "toy")
    assert summary == "toy: mixed layouts"
    assert len(problems) == 1 and "mixed layouts" in problems[0]


def test_a_missing_split_lists_both_kinds(tmp_path: Path) -> None:
    folder = split_files(tmp_path, {"train": "images/0.png 1\n"})
    png(folder / "extra" / "a" / "0.png")
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path, "toy", "val", key="data.eval_split")
    assert caught.value.key == "data.eval_split"
    message = str(caught.value)
    assert f"split file {folder / 'val.txt'} does not exist" in message
    assert "split files there: train; split folders there: extra, images" in message


def test_class_folders_number_classes_across_splits(tmp_path: Path) -> None:
    folder = class_folders(tmp_path, {
        "train": {"cat": ["b.png", "a.JPG"], "dog": ["x.png"], "emu": ["e.png"]},
        "test": {"cat": ["c.png"], "dog": ["d.png"], "ant": ["z.png"]},  # no emu; ant only here
    })
    (folder / "train" / "cat" / "notes.md").write_text("not an image")
    (folder / "train" / "cat" / ".hidden.png").write_bytes(b"")
    png(folder / "train" / ".cache" / "x.png")  # a hidden folder is no class
    png(folder / "train" / "dog" / "sub" / "deep.png")  # images in subfolders count
    (folder / "train" / "README").write_text("a plain file in a split folder is passed over")
    train = open_split(tmp_path, "cls", "train", key="data.train_split")
    test = open_split(tmp_path, "cls", "test", key="data.eval_split")
    assert train.class_names == test.class_names == ("ant", "cat", "dog", "emu")
    assert train.file == folder / "train" and train.task == "single_label"
    assert train.entries == (("train/cat/a.JPG", 1), ("train/cat/b.png", 1),
                             ("train/dog/sub/deep.png", 2), ("train/dog/x.png", 2),
                             ("train/emu/e.png", 3))
    assert test.entries == (("test/ant/z.png", 0), ("test/cat/c.png", 1), ("test/dog/d.png", 2))
    assert num_classes([train]) == num_classes([test]) == 4  # ant counts in train too
    assert num_classes([train, test]) == 4
    assert targets(test, 4).tolist() == [0, 1, 2]
    listing = "".join(f"{path} {label}\n" for path, label in train.entries)
    assert train.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    loaded = ImageSplit(train, transform=lambda image: image.size)
    assert [loaded[i] for i in (0, 4)] == [((4, 4), 1, 0), ((4, 4), 3, 4)]
    assert [s.name for s in sibling_splits(train)] == ["test"]


def test_a_class_folder_split_changes_when_its_folders_do(tmp_path: Path) -> None:
    folder = class_folders(tmp_path, {"train": {"a": ["0.png"], "b": ["1.png"]}})
    first = open_split(tmp_path, "cls", "train", key="k")
    assert open_split(tmp_path, "cls", "train", key="k") == first  # from the cache
    png(folder / "train" / "b" / "sub" / "2.png")
    second = open_split(tmp_path, "cls", "train", key="k")
    assert second.paths == ["train/a/0.png", "train/b/1.png", "train/b/sub/2.png"]
    assert second.sha256 != first.sha256
    png(folder / "train" / "c" / "3.png")  # a new class renumbers nothing before it
    assert open_split(tmp_path, "cls", "train", key="k").class_names == ("a", "b", "c")


def test_class_folders_refuse_multi_label(tmp_path: Path) -> None:
    class_folders(tmp_path, {"train": {"a": ["0.png"]}})
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path, "cls", "train", key="data.train_split", task="multi_label")
    assert caught.value.key == "data.task"
    assert "one label per image" in str(caught.value)


def test_class_folder_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = class_folders(tmp_path, {"train": {"a": ["0.png"]}, "empty": {"a": []}})
    with pytest.raises(ConfigError, match="holds no images"):
        open_split(tmp_path, "cls", "empty", key="k")
    png(folder / "train" / "stray.png")
    with pytest.raises(ConfigError, match="images outside class folders") as caught:
        open_split(tmp_path, "cls", "train", key="data.train_split")
    assert caught.value.key == "data.train_split"
    (folder / "train" / "stray.png").unlink()
    for index in range(5):
        png(folder / "train" / "a" / f"{index}.png")
    monkeypatch.setattr(data, "MAX_FOLDER_FILES", 4)
    with pytest.raises(ConfigError, match="more than 4 entries"):
        open_split(tmp_path, "cls", "train", key="k")
    monkeypatch.setattr(data, "MAX_FOLDER_FILES", 6)
    assert len(open_split(tmp_path, "cls", "train", key="k").entries) == 5


def test_odd_file_names_are_refused_without_quoting_them(tmp_path: Path) -> None:
    folder = class_folders(tmp_path, {"train": {"a": ["0.png"]}})
    png(folder / "train" / "a" / "secret\nname.png")
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path, "cls", "train", key="k")
    assert "control character" in str(caught.value) and "secret" not in str(caught.value)
    (folder / "train" / "a" / "secret\nname.png").unlink()
    png(Path(os.fsdecode(bytes(folder / "train" / "a") + b"/\xff.png")))
    with pytest.raises(ConfigError, match="not UTF-8"):
        open_split(tmp_path, "cls", "train", key="k")


def test_folder_links_out_of_the_dataset_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    png(outside / "cls_x" / "secret.png")
    folder = class_folders(tmp_path / "data", {"train": {"a": ["0.png"]},
                                               "test": {"a": ["1.png"]}})
    (folder / "train" / "b").symlink_to(outside / "cls_x", target_is_directory=True)
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path / "data", "cls", "train", key="data.train_split")
    assert caught.value.key == "data.train_split"
    assert f"class folder {folder / 'train' / 'b'} leads to {outside / 'cls_x'}, outside the " \
           f"dataset folder {folder}" in str(caught.value)
    (folder / "train" / "b").unlink()

    (folder / "train" / "a" / "deeper").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        open_split(tmp_path / "data", "cls", "train", key="k")
    (folder / "train" / "a" / "deeper").unlink()

    (folder / "linked").symlink_to(outside, target_is_directory=True)  # a whole split folder
    for split in ("linked", "test"):  # its class names would number the others' classes
        with pytest.raises(ConfigError, match=r"split folder .* outside the dataset folder"):
            open_split(tmp_path / "data", "cls", split, key="k")
    (folder / "linked").unlink()

    (folder / "train" / "a" / "loop").symlink_to(folder / "train", target_is_directory=True)
    with pytest.raises(ConfigError, match="a loop"):
        open_split(tmp_path / "data", "cls", "train", key="k")
    (folder / "train" / "a" / "loop").unlink()

    # links that stay inside are followed: train800val200 made of links to the other two
    (folder / "both" / "a").mkdir(parents=True)
    (folder / "both" / "a" / "t").symlink_to(folder / "train" / "a", target_is_directory=True)
    (folder / "both" / "a" / "u").symlink_to(folder / "test" / "a", target_is_directory=True)
    both = open_split(tmp_path / "data", "cls", "both", key="k")
    assert both.paths == ["both/a/t/0.png", "both/a/u/1.png"]
    assert ImageSplit(both, transform=lambda image: image.size)[1] == ((4, 4), 0, 1)


def test_an_image_linked_out_of_a_class_folder_is_refused_when_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    png(secret)
    folder = class_folders(tmp_path / "data", {"train": {"a": ["0.png"]}})
    (folder / "train" / "a" / "1.png").symlink_to(secret)
    split = open_split(tmp_path / "data", "cls", "train", key="k")
    loaded = ImageSplit(split, transform=lambda image: image.size)
    assert loaded[0] == ((4, 4), 0, 0)
    with pytest.raises(DataError, match="outside the dataset folder"):
        loaded[1]


def test_a_fifo_in_a_class_folder_is_listed_without_waiting_and_refused(
        tmp_path: Path) -> None:
    folder = class_folders(tmp_path, {"train": {"a": ["0.png"]}})
    os.mkfifo(folder / "train" / "a" / "1.png")
    split = open_split(tmp_path, "cls", "train", key="k")
    with pytest.raises(DataError, match="not a plain file"):
        ImageSplit(split, transform=lambda image: image.size)[1]


def test_siblings_keep_layout_and_task(tmp_path: Path) -> None:
    split_files(tmp_path, {"train": "images/0.png 1,2\n", "val": "images/1.png 0\n",
                           "trainval": "images/0.png 1,2\nimages/1.png 0\n",
                           "broken": "images/2.png 1,\n"})
    trainval = open_split(tmp_path, "toy", "trainval", key="k", task="multi_label")
    siblings = sibling_splits(trainval)
    assert [s.name for s in siblings] == ["train", "val"]  # broken is left out
    assert all(s.task == "multi_label" for s in siblings)
    assert siblings[0].labels == [LabelSet((1, 2))]
    assert [s.name for s in sibling_splits(open_split(tmp_path, "toy", "val", key="k"))] == []

    class_folders(tmp_path, {"train800": {"a": ["0.png"]}, "val200": {"b": ["1.png"]},
                             "test": {"a": ["2.png"]}, "other": {"a": ["3.png"]}})
    test = open_split(tmp_path, "cls", "test", key="k")
    assert [s.name for s in sibling_splits(test)] == ["train800", "val200", "other"]
    assert all(s.class_names == ("a", "b") for s in sibling_splits(test))


# -- the check command -------------------------------------------------------------------------


def test_check_recognises_each_layout(tmp_path: Path) -> None:
    split_files(tmp_path, {"train": "images/0.png 1,2?\nimages/1.png 0\n",
                           "test": "images/2.png 3\nimages/gone.png 1\n"}, name="voc")
    class_folders(tmp_path, {"train": {"a": ["0.png", "1.png"]}, "test": {"b": ["2.png"]}})
    lines, problems = check_root(tmp_path, ["voc", "cls"])
    assert lines[0] == ("voc: test 2, train 2, multi-label (1 difficult labels), "
                        "sampled images present 3/4")
    assert problems == [f"voc: image {tmp_path / 'voc' / 'images' / 'gone.png'} (listed in "
                        f"{tmp_path / 'voc' / 'test.txt'}) missing"]
    assert lines[1] == ("cls: class folders (2 classes), test 1, train 2, "
                        "sampled images present 3/3 - ok")

    split_files(tmp_path, {"train": "images/0.png 1,\n"}, name="bad")
    _, problems = check_dataset(tmp_path, "bad")
    assert problems == [f"bad: {tmp_path / 'bad' / 'train.txt'}:1: an empty label (two commas "
                        "in a row, or one at an end)"]


def test_check_expects_vtab_sizes_only_for_vtab_names(tmp_path: Path) -> None:
    class_folders(tmp_path, {"train800": {"a": ["0.png"]}, "test": {"a": ["1.png"]}})
    _, problems = check_dataset(tmp_path, "cls")
    folder = tmp_path / "cls"
    assert problems == [f"cls: {folder / 'train800'} has 1 images, expected 800",
                        f"cls: split folder {folder / 'val200'} missing",
                        f"cls: split folder {folder / 'train800val200'} missing"]
    (tmp_path / "dtd" / "images").mkdir(parents=True)  # a VTAB-1K task without split files
    _, problems = check_dataset(tmp_path, "dtd")
    assert len(problems) == 4 and all("split file" in p and "missing" in p for p in problems)
    (tmp_path / "nothing").mkdir()
    summary, problems = check_dataset(tmp_path, "nothing")
    assert summary == "nothing: empty" and "no split files" in problems[0]


# -- the embedded datasets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    assert main_prepare_data.main(["digits", "--root", str(root)]) == 0
    return root


def test_the_digits_command_prints_each_folder(embedded: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main_prepare_data.main(["digits", "--root", str(embedded)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{name} dataset ready in {embedded / name}" for name in EMBEDDED]


# Recorded from vtab/evaluation/digits.py before the other datasets were added: the debug
# pipeline's numbers depend on these files staying byte for byte the same.
DIGITS_SHA256 = {
    "test": "fc59eacf2f8821b8ba75be436e9be984878110feff73e54acd819eb44eacc406",
    "train800": "6589d159601166d566a3400274c55457c6ef5727967c989a0c8fd68d16707238",
    "train800val200": "fbc437a5fcc479b4b3d6e6066647310cf2a4231d24ac410a44bbb4670fab2f3c",
    "val200": "5e17823891c33c909579f8c258dc9678c1c9aab997802474b8a8aae565785ff2",
}
# sha256 of `sha256sum` over every image (sorted paths) of digits, as recorded then.
DIGITS_IMAGES_SHA256 = "e19299c832dfd15ab217c38ab5fe71a810911bd44355e2ad328ff879781349bf"


def test_digits_files_are_unchanged(embedded: Path) -> None:
    folder = embedded / "digits"
    for split, digest in DIGITS_SHA256.items():
        assert hashlib.sha256((folder / f"{split}.txt").read_bytes()).hexdigest() == digest
    images = sorted(str(p.relative_to(folder)) for p in (folder / "images").rglob("*.png"))
    listing = "".join(f"{hashlib.sha256((folder / p).read_bytes()).hexdigest()}  {p}\n"
                      for p in images)
    assert hashlib.sha256(listing.encode()).hexdigest() == DIGITS_IMAGES_SHA256
    assert write_digits(embedded) == folder


def test_check_passes_on_the_embedded_datasets(embedded: Path) -> None:
    lines, problems = check_root(embedded, EMBEDDED)
    assert problems == []
    assert lines == [
        "digits: train800 800, val200 200, train800val200 1000, test 797, "
        "sampled images present 20/20 - ok",
        "digits_folders: class folders (10 classes), train800 800, val200 200, "
        "train800val200 1000, test 797, sampled images present 20/20 - ok",
        f"digit_pairs: train800 800, val200 200, train800val200 1000, test 800, "
        f"multi-label ({PAIRS_DIFFICULT} difficult labels), sampled images present 20/20 - ok",
    ]


def test_digits_folders_hold_the_digits_images_and_splits(embedded: Path) -> None:
    for name in ("train800", "val200", "train800val200", "test"):
        vtab = open_split(embedded, "digits", name, key="k")
        folders = open_split(embedded, "digits_folders", name, key="k")
        assert folders.class_names == CLASS_NAMES
        assert len(folders.entries) == SIZES[name]
        by_index = {Path(path).stem: label for path, label in vtab.entries}
        assert {Path(path).stem: label for path, label in folders.entries} == by_index
        for path, label in folders.entries[::100]:
            assert path.startswith(f"{name}/d{label}/")
            matches = list((embedded / "digits" / "images").glob(f"*/{Path(path).name}"))
            assert len(matches) == 1  # the same file name: the same scikit-learn index
            assert matches[0].read_bytes() == (embedded / "digits_folders" / path).read_bytes()


def test_digit_pairs(embedded: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = {name: open_split(embedded, "digit_pairs", name, key="k", task="multi_label")
              for name in PAIR_SIZES}
    assert {name: len(split.entries) for name, split in splits.items()} == PAIR_SIZES
    assert splits["train800val200"].entries == (splits["train800"].entries
                                                + splits["val200"].entries)
    sources = {}
    for name, split in splits.items():
        halves = [Path(path).stem.split("_")[1:] for path in split.paths]
        sources[name] = {int(index) for pair in halves for index in pair}
        for (left, right), label in zip(halves, split.labels, strict=True):
            left, right = int(left), int(right)
            assert left != right
            assert label.positive == tuple(sorted({int(digits.target[left]),
                                                   int(digits.target[right])}))
            assert not set(label.difficult) & {int(digits.target[left]),
                                               int(digits.target[right])}
        path = split.paths[0]
        left, right = (int(i) for i in halves[0])
        with Image.open(embedded / "digit_pairs" / path) as image:
            assert (image.mode, image.size) == ("L", (16, 8))
            pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, np.rint(np.concatenate(
            [digits.images[left], digits.images[right]], axis=1) * 255 / 16))
    assert not sources["train800val200"] & sources["test"]  # no image leaks into test
    assert not sources["train800"] & sources["val200"]
    digit_files = {name: {int(Path(p).stem) for p in open_split(embedded, "digits", name,
                                                                 key="k").paths}
                   for name in PAIR_SIZES}
    assert all(sources[name] <= digit_files[name] for name in PAIR_SIZES)  # digits' own split

    hard = [label for label in splits["test"].labels if label.difficult]
    assert len(hard) == PAIRS_DIFFICULT == round(0.05 * PAIR_SIZES["test"])
    assert all(len(label.difficult) == 1 for label in hard)
    assert not any(label.difficult for name in ("train800", "val200")
                   for label in splits[name].labels)
    assert any(len(label.positive) == 1 for label in splits["test"].labels)  # a same-digit pair
    assert num_classes(splits.values()) == 10
    table = targets(splits["test"], 10)
    assert (table == -1).sum() == PAIRS_DIFFICULT
    assert ((table == 1).sum(dim=1) >= 1).all()
    with pytest.raises(ConfigError, match=r"set data\.task: multi_label"):
        open_split(embedded, "digit_pairs", "test", key="k")


def test_embedded_datasets_are_idempotent_and_redo_interrupted_runs(tmp_path: Path) -> None:
    folders = write_embedded(tmp_path)
    stamps = {name: sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
              for name, folder in folders.items()}
    assert write_embedded(tmp_path) == folders
    assert {name: sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
            for name, folder in folders.items()} == stamps

    pairs = folders["digit_pairs"] / "test.txt"
    first = pairs.read_text()
    pairs.write_text("\n".join(first.splitlines()[:10]) + "\n")  # as if cut short
    image = next((folders["digits_folders"] / "test" / "d3").iterdir())
    content = image.read_bytes()
    image.unlink()
    write_embedded(tmp_path)
    assert pairs.read_text() == first
    assert image.read_bytes() == content
