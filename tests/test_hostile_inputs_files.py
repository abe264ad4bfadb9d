"""Hostile files: what one yaml or one dataset folder can cost a runner is bounded.

Anyone who can write a yaml into the work area chooses what a runner parses and which dataset
folder it reads. YAML (vtab/yamlio.py): alias bombs, deep nesting, huge files and odd keys are
refused fast with an error naming the file. Data (vtab/evaluation/data.py): image paths that
leave the dataset folder, by name or by link, and images that decode to too many pixels are
`DataError`s naming the image and the split file, which a runner crashes at once.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, drain, queue
from vtab import yamlio
from vtab.config import resolve_env
from vtab.errors import ConfigError, DataError
from vtab.evaluation import data
from vtab.evaluation.data import ImageSplit, open_split, parse_split_text
from vtab.runner import CRASHED_EXIT
from vtab.workarea import CRASHED, FINISHED, WorkArea
from vtab.yamlio import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, YamlFileError

HOSTILE = Path(__file__).parent / "data" / "hostile"
SLEEP_JOB = ("current_stage: run\nconfig:\n  sleep:\n    seconds: 0\n"
             "stages:\n  run:\n    hyperparams:\n      kind: sleep\n")


def refused(raw: bytes | str, name: str = "hostile.yaml") -> str:
    """The message of the YamlFileError that parsing `raw` raises; it must name the file."""
    with pytest.raises(YamlFileError) as caught:
        yamlio.parse_mapping(raw.encode() if isinstance(raw, str) else raw, name)
    assert name in str(caught.value)
    return str(caught.value)


def measured(action: Callable[[], Any]) -> tuple[BaseException | None, float, int]:
    """What `action` raised (None if nothing), its seconds and its peak of Python memory."""
    tracemalloc.start()
    try:
        start, base = time.perf_counter(), tracemalloc.get_traced_memory()[0]
        error = None
        try:
            action()
        except Exception as exc:  # handed to the test
            error = exc
        return error, time.perf_counter() - start, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def refused_fast(raw: bytes | str, name: str, peak: int = 5 * 2**20) -> str:
    """Like `refused`, and in well under a second, with bounded memory."""
    data = raw.encode() if isinstance(raw, str) else raw
    error, seconds, used = measured(lambda: yamlio.parse_mapping(data, name))
    assert isinstance(error, YamlFileError) and name in str(error)
    assert seconds < 0.5 and used < peak
    return str(error)


# -- alias bombs ---------------------------------------------------------------------------------


def laughs(levels: int, fanout: int, mapping: bool = False) -> str:
    """A "billion laughs": `levels` anchors, each repeating the one before `fanout` times."""
    def body(items: list[str]) -> str:
        if mapping:
            return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
        return "[" + ", ".join(items) + "]"
    lines = [f"a0: &a0 {body(['lol'] * fanout)}"]
    lines += [f"a{i}: &a{i} {body([f'*a{i - 1}'] * fanout)}" for i in range(1, levels)]
    return SLEEP_JOB + "\n".join(lines) + "\n"


BOMBS = {
    "lists_9x9": laughs(9, 9),
    "mappings_9x9": laughs(9, 9, mapping=True),
    "lists_30x2": laughs(30, 2),  # a long chain of doublings, 2^30 strings
    "wide": "a: &a [" + ", ".join(["x"] * 2000) + "]\nb: [" + ", ".join(["*a"] * 2000) + "]\n",
    "long_text": "a: &a '" + "x" * 500_000 + "'\nb: [" + ", ".join(["*a"] * 20) + "]\n",
    "merged": "a: &a {" + ", ".join(f"k{i}: [x, y, z]" for i in range(500)) + "}\n"
              + "".join(f"m{i}: {{<<: *a}}\n" for i in range(300)),
}


def test_the_bomb_that_was_reproduced_fails_fast() -> None:
    message = refused_fast((HOSTILE / "alias_bomb.yaml").read_bytes(), "alias_bomb.yaml")
    assert "expanding alias *l" in message and "line " in message


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_alias_bombs_of_every_shape_fail_fast(name: str) -> None:
    assert "expanding alias *" in refused_fast(BOMBS[name], f"{name}.yaml", peak=20 * 2**20)


def test_aliases_within_the_bound_load_and_are_written_out_in_full() -> None:
    text = ("defaults: &optim {lr: 0.1, epochs: 10}\n"
            "a: {optim: *optim}\nb: {optim: *optim}\n")
    doc = yamlio.parse_mapping(text.encode(), "anchors.yaml")
    assert doc["a"]["optim"] == doc["b"]["optim"] == {"lr": 0.1, "epochs": 10}
    assert "&" not in yamlio.dump(doc) and "*" not in yamlio.dump(doc)


def _expanding_to(values: int) -> str:
    """A document of exactly `values` values once expanded, most of them through aliases: the top
    mapping, its 3 keys and 3 lists (7), the 999 scalars of list a, 1000 for each alias of it in
    list b, and as many scalars in list c as it takes."""
    fixed = 7 + 999
    aliases = (values - fixed) // 1000 - 1
    rest = values - fixed - 1000 * aliases
    return ("a: &a [" + ", ".join(["x"] * 999) + "]\n"
            "b: [" + ", ".join(["*a"] * aliases) + "]\n"
            "c: [" + ", ".join(["y"] * rest) + "]\n")


def test_the_value_bound_is_exact() -> None:
    yamlio.parse_mapping(_expanding_to(MAX_NODES).encode(), "at_the_bound.yaml")
    assert f"more than {MAX_NODES} values" in refused(_expanding_to(MAX_NODES + 1))


@pytest.mark.parametrize("text", [
    "a: &a [*a]\n",
    "a: &a {b: [1, {c: *a}]}\n",
    "a: &a {<<: *a}\n",
], ids=["list", "nested", "merge"])
def test_a_structure_that_contains_itself_is_refused(text: str) -> None:
    assert "used inside the value it names" in refused(text)


def test_aliases_in_an_environment_default_stay_text() -> None:
    """``${VAR:-default}`` is parsed as YAML: its default comes from the job file too."""
    bomb = "[&a [x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 8) + "]" for i in range(8)) + "]"
    for default in (bomb, "&r [*r]", "[" * 100 + "]" * 100):
        value = "${VTAB_SURELY_UNSET_VARIABLE:-" + default + "}"
        assert resolve_env({"x": value}) == {"x": default}
    with pytest.raises(yaml.YAMLError):
        yamlio.load_scalar(bomb)


# -- nesting -----------------------------------------------------------------------------------


def nested(levels: int, kind: str) -> str:
    """`levels` lists or mappings inside each other under the key ``x`` (the top mapping is 1)."""
    inner = levels - 1
    if kind == "flow_lists":
        return "x: " + "[" * inner + "]" * inner + "\n"
    if kind == "flow_mappings":
        return "x: " + "{a: " * (inner - 1) + "{}" + "}" * (inner - 1) + "\n"
    if kind == "block_lists":
        return "x:\n" + "".join("  " * i + "-\n" for i in range(1, inner)) + "  " * inner + "- 1\n"
    if kind == "block_mappings":
        return "".join("  " * i + f"k{i}:\n" for i in range(inner)) + "  " * inner + "v: 1\n"
    return "x: " + "[{a: " * (inner // 2) + "1" + "}]" * (inner // 2) + "\n"  # mixed


KINDS = ["flow_lists", "flow_mappings", "block_lists", "block_mappings", "mixed"]


@pytest.mark.parametrize(("kind", "levels"), [
    *((kind, levels) for kind in KINDS for levels in (MAX_DEPTH + 1, 900)),
    *((kind, 100_000) for kind in ("flow_lists", "flow_mappings", "mixed")),
])
def test_deep_nesting_is_refused_naming_the_line(kind: str, levels: int) -> None:
    message = refused(nested(levels, kind))
    assert f"nested more than {MAX_DEPTH} levels deep" in message or (
        levels > 1000 and "maximum nesting depth" in message)  # libyaml's own bound
    assert "line " in message


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_up_to_the_bound_loads(kind: str) -> None:
    levels = MAX_DEPTH if kind != "mixed" else MAX_DEPTH - 1  # mixed nests in pairs
    doc = yamlio.parse_mapping(nested(levels, kind).encode(), "deep_but_fine.yaml")
    yamlio.parse_mapping(yamlio.dump(doc).encode(), "written_back.yaml")


def test_aliases_cannot_nest_past_the_bound() -> None:
    """Each anchor nests the one before two levels deeper: 30 + 2 x 20 levels once expanded."""
    text = "a0: &a0 " + "[" * 30 + "]" * 30 + "\n" + "".join(
        f"a{i}: &a{i} [[*a{i - 1}]]\n" for i in range(1, 21))
    assert "expanding alias *a" in refused(text)
    assert f"nested more than {MAX_DEPTH} levels deep" in refused(text)


def test_the_pure_python_loader_has_the_same_bounds() -> None:
    """Where PyYAML lacks libyaml, its own (recursive) composer is used: bounded the same way."""
    script = (
        "import sys; sys.modules['yaml._yaml'] = None\n"
        "from vtab import yamlio\n"
        "assert yamlio._BaseLoader is __import__('yaml').SafeLoader\n"
        "for text in sys.argv[1:]:\n"
        "    try:\n"
        "        yamlio.parse_mapping(text.encode(), 'x.yaml')\n"
        "    except yamlio.YamlFileError as exc:\n"
        "        print(exc)\n")
    texts = [nested(5000, "flow_lists"), BOMBS["lists_9x9"], "a: &a [*a]\n"]
    result = subprocess.run([sys.executable, "-c", script, *texts], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert f"more than {MAX_DEPTH} levels" in lines[0]
    assert "expanding alias" in lines[1] and "contains itself" in lines[2]


# -- size --------------------------------------------------------------------------------------


def _of_size(size: int) -> bytes:
    head = b"current_stage: run\nnote: '"
    return head + b"x" * (size - len(head) - 2) + b"'\n"


def test_a_file_at_the_size_bound_loads_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(_of_size(MAX_FILE_BYTES))
    assert yamlio.load_mapping(path)["current_stage"] == "run"
    path.write_bytes(_of_size(MAX_FILE_BYTES + 1))
    with pytest.raises(YamlFileError, match=f"larger than {MAX_FILE_BYTES} bytes"):
        yamlio.load_mapping(path)
    assert "larger than" in refused(_of_size(MAX_FILE_BYTES + 1))


def test_a_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:  # sparse: 64 GiB that take no room
        file.write(b"a: ")
        file.truncate(64 * 2**30)
    error, seconds, peak = measured(lambda: yamlio.load_mapping(path))
    assert isinstance(error, YamlFileError) and f"{path}: the file is larger than" in str(error)
    assert seconds < 2 and peak < 3 * MAX_FILE_BYTES


def _finishes(action: Callable[[], Any], seconds: float = 5.0) -> BaseException | None:
    """The exception `action` raised, run in a thread that must end within `seconds`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "it hung"
    return outcome[0]


def test_a_fifo_or_folder_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "folder.yaml").mkdir()
    for name in ("fifo.yaml", "folder.yaml"):
        error = _finishes(lambda name=name: yamlio.load_mapping(tmp_path / name))
        assert isinstance(error, YamlFileError) and "not a plain file" in str(error)


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "path", "kind"), [
    ("config:\n  1: x\n", "config.1", "a number"),
    ("1: x\n", "1", "a number"),
    ("config:\n  sleep:\n    2.5: x\n", "config.sleep.2.5", "a number"),
    ("config:\n  yes: x\n", "config.True", "a boolean"),
    ("config:\n  true: x\n", "config.True", "a boolean"),
    ("config:\n  null: x\n", "config.None", "null"),
    ("config:\n  ~: x\n", "config.None", "null"),
    ("stages:\n  run:\n    grid:\n      2020-01-01: [1]\n", "stages.run.grid.2020-01-01", "date"),
    ("history:\n  - {stage: a}\n  - {0: b}\n", "history[1].0", "a number"),
    ("config:\n  seeds:\n    1: x\n", "config.seeds.1", "a number"),
    ("datasets:\n  - seeds:\n      1: x\n", "datasets[0].seeds.1", "a number"),
])
def test_keys_that_are_not_strings_are_refused_naming_their_path(text: str, path: str,
                                                                 kind: str) -> None:
    message = refused(text)
    assert f"the key '{path}' is {kind}" in message
    assert "mapping keys must be strings" in message


def test_seeds_keep_the_numbers_runners_key_them_by() -> None:
    """aggregate writes ``seeds: {<seed>: <result>}``; summarize copies it into summary.yaml."""
    doc = {"seeds": {0: 0.5, 1: 0.75}, "datasets": {"d": {"seeds": {0: 0.5, 2: 0.25}}},
           "metrics": {"top1": {"mean": 0.5}}}
    assert yamlio.parse_mapping(yamlio.dump(doc).encode(), "summary.yaml") == doc
    message = refused("seeds:\n  0: {1: x}\n")  # only the seeds themselves
    assert "the key 'seeds.0.1' is a number" in message


def test_merge_keys_merge_and_explicit_keys_win() -> None:
    text = ("defaults: &d {lr: 0.1, epochs: 10}\nmore: &m {epochs: 5, wd: 0.0}\n"
            "one: {<<: *d, lr: 0.5}\nboth: {<<: [*d, *m], wd: 1.0}\n")
    doc = yamlio.parse_mapping(text.encode(), "merge.yaml")
    assert doc["one"] == {"lr": 0.5, "epochs": 10}
    assert doc["both"] == {"lr": 0.1, "epochs": 10, "wd": 1.0}  # the first merged wins
    assert list(doc["both"]) == ["lr", "epochs", "wd"]
    assert doc["defaults"] == {"lr": 0.1, "epochs": 10}  # the merged mapping is unchanged


def test_merges_nest_and_their_keys_are_told_apart_by_value() -> None:
    """Long keys are distinct string objects: PyYAML's own merge let the later one win."""
    key = "a_key_long_enough_not_to_be_shared_by_python"
    text = (f"a: &a {{{key}: 1}}\nb: &b {{{key}: 2, other: 3}}\n"
            f"c: &c {{<<: [*a, *b]}}\nd: {{<<: *c, =: eq}}\n")
    doc = yamlio.parse_mapping(text.encode(), "merge.yaml")
    assert doc["c"] == {key: 1, "other": 3}
    assert doc["d"] == {key: 1, "other": 3, "=": "eq"}


def test_a_merge_keeps_refusing_duplicates_and_odd_merges() -> None:
    assert "duplicate key 'lr'" in refused("d: &d {lr: 1}\nx: {<<: *d, lr: 2, lr: 3}\n")
    assert "duplicate key '<<'" in refused("d: &d {lr: 1}\nx: {<<: *d, <<: *d}\n")
    for merged in ("3", "[{a: 1}, 3]", "[[1]]"):
        message = refused(f"x: {{<<: {merged}}}\n")
        assert "refused YAML construct" in message and "for merging" in message


def test_a_merged_number_key_is_refused_too() -> None:
    message = refused("seeds: &s {1: x}\nconfig: {<<: *s}\n")
    assert "the key 'config.1' is a number" in message


# -- split files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "problem"), [
    ("../x.png", "'..' component"),
    ("a/../../x.png", "'..' component"),
    ("images/..", "'..' component"),
    ("./../x.png", "'..' component"),
    ("/etc/passwd", "is absolute"),
    ("//etc/passwd", "is absolute"),
    ("..\\x.png", "backslash"),
    ("images\\..\\..\\x.png", "backslash"),
    ("images/a\x00.png", "control character"),
    ("images/a\x7f.png", "control character"),
])
def test_paths_leaving_the_dataset_folder_are_refused_naming_file_and_line(
        tmp_path: Path, path: str, problem: str) -> None:
    source = tmp_path / "train800.txt"
    with pytest.raises(DataError) as caught:
        parse_split_text(f"images/a.png 0\n\n{path} 0\n", source)
    assert str(caught.value).startswith(f"{source}:3: the image path ")
    assert problem in str(caught.value)
    assert path not in str(caught.value)  # the line is named, never quoted


def test_plain_names_with_dots_are_fine(tmp_path: Path) -> None:
    lines = "images/a..b.png 0\n./images/a.png 1\nimages//.hidden.png 2\n...png 3\n"
    assert [p for p, _ in parse_split_text(lines, tmp_path / "s.txt")] == [
        "images/a..b.png", "./images/a.png", "images//.hidden.png", "...png"]


def make_dataset(root: Path, lines: str, name: str = "toy", splits: tuple[str, ...] = (
        "train800",)) -> Path:
    folder = root / name
    (folder / "images").mkdir(parents=True)
    for index in range(4):
        Image.new("L", (4, 4), 60 * index).save(folder / "images" / f"{index}.png")
    for split in splits:
        (folder / f"{split}.txt").write_text(lines)
    return folder


def test_open_split_names_the_key_file_and_line(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path, "images/0.png 0\n/etc/passwd 0\n")
    with pytest.raises(ConfigError) as caught:
        open_split(tmp_path, "toy", "train800", key="data.train_split")
    assert caught.value.key == "data.train_split"
    assert f"{folder / 'train800.txt'}:2: the image path is absolute" in str(caught.value)


def test_the_check_command_reports_such_a_split_file(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path, "images/0.png 0\n../../etc/passwd 1\n")
    _, problems = data.check_dataset(tmp_path, "toy")
    assert any(f"{folder / 'train800.txt'}:2:" in problem and "'..'" in problem
               for problem in problems)


def test_a_split_file_that_is_a_fifo_or_too_large_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_dataset(tmp_path, "images/0.png 0\n")
    os.mkfifo(folder / "val200.txt")
    error = _finishes(lambda: data.read_split_file(folder / "val200.txt"))
    assert isinstance(error, DataError) and "not a plain file" in str(error)
    monkeypatch.setattr(data, "MAX_SPLIT_FILE_BYTES", 10)
    with pytest.raises(ConfigError, match=r"train800\.txt: larger than 10 bytes"):
        open_split(tmp_path, "toy", "train800", key="data.train_split")


# -- images ------------------------------------------------------------------------------------


def image_split(root: Path, lines: str) -> ImageSplit:
    make_dataset(root, lines)
    return ImageSplit(open_split(root, "toy", "train800", key="data.train_split"),
                      transform=lambda image: image.size)


def image_error(dataset: ImageSplit, index: int) -> str:
    with pytest.raises(DataError) as caught:
        dataset[index]
    message = str(caught.value)
    assert str(dataset.split.folder / dataset.split.paths[index]) in message  # the image
    assert f"(listed in {dataset.split.file})" in message  # and its split file
    return message


def test_an_image_linked_outside_the_dataset_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(secret)
    dataset = image_split(tmp_path / "data", "images/0.png 0\nimages/link.png 1\n"
                                             "images/inside.png 0\nlinked/0.png 1\n")
    folder = dataset.split.folder
    (folder / "images" / "link.png").symlink_to(secret)
    (folder / "images" / "inside.png").symlink_to(folder / "images" / "1.png")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)  # a folder link
    shutil.copy(secret, tmp_path / "0.png")
    assert dataset[0] == ((4, 4), 0, 0)
    message = image_error(dataset, 1)
    assert f"leads to {secret}, outside the dataset folder {folder}" in message
    assert dataset[2] == ((4, 4), 0, 2)  # a link that stays inside is fine
    assert "outside the dataset folder" in image_error(dataset, 3)


def test_a_linked_dataset_folder_is_fine(tmp_path: Path) -> None:
    make_dataset(tmp_path / "elsewhere", "images/0.png 0\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy").symlink_to(tmp_path / "elsewhere" / "toy")
    split = open_split(tmp_path / "data", "toy", "train800", key="data.train_split")
    assert ImageSplit(split, transform=lambda image: image.mode)[0] == ("RGB", 0, 0)


def test_a_fifo_or_folder_listed_as_an_image_is_refused_without_waiting(tmp_path: Path) -> None:
    dataset = image_split(tmp_path, "images/fifo.png 0\nimages 1\n")
    os.mkfifo(dataset.split.folder / "images" / "fifo.png")
    for index in (0, 1):
        error = _finishes(lambda index=index: dataset[index])
        assert isinstance(error, DataError) and "not a plain file" in str(error)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels, with a few bytes of image data: readers learn
    the size from its header and only find out that the data is short when they decode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000), (100000, 1000)])
def test_a_decompression_bomb_is_a_data_error_naming_image_and_split(
        tmp_path: Path, width: int, height: int) -> None:
    dataset = image_split(tmp_path, "images/0.png 0\nimages/bomb.png 1\n")
    (dataset.split.folder / "images" / "bomb.png").write_bytes(png_header(width, height))
    assert dataset[0] == ((4, 4), 0, 0)
    error, seconds, peak = measured(lambda: dataset[1])
    assert isinstance(error, DataError)
    assert seconds < 1 and peak < 10 * 2**20  # refused before decoding
    assert "too large to decode" in image_error(dataset, 1)


def test_the_pixel_bound_is_ours_not_only_pillows(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.MAX_IMAGE_PIXELS >= 50_000_000  # room for large photographs
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check off
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 15)
    dataset = image_split(tmp_path, "images/0.png 0\n")
    (dataset.split.folder / "images" / "0.png").write_bytes(png_header(4, 4))
    assert "is 4 x 4 = 16 pixels, more than the 15" in image_error(dataset, 0)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 16)
    assert dataset[0] == ((4, 4), 0, 0)


# -- through a runner --------------------------------------------------------------------------


def test_hostile_yaml_is_crashed_at_once_while_a_good_job_finishes(tmp_path: Path) -> None:
    area = WorkArea(tmp_path / "work")
    shutil.copyfile(HOSTILE / "alias_bomb.yaml", area.root / "bomb.yaml")
    (area.root / "deep.yaml").write_text(SLEEP_JOB + nested(900, "flow_lists"))
    (area.root / "numbers.yaml").write_text(SLEEP_JOB.replace("sleep:\n", "sleep:\n    1: x\n"))
    queue(area, yaml.safe_load(SLEEP_JOB), "good.yaml")
    start = time.monotonic()
    assert drain(area) == CRASHED_EXIT
    assert time.monotonic() - start < 30
    assert (area.folder(FINISHED) / "good.yaml").exists()
    for name, problem in {"bomb": "expanding alias *l", "deep": "levels deep",
                          "numbers": "the key 'config.sleep.1' is a number"}.items():
        # Crashed at its first claim, byte for byte: never counted, retried or written back
        # (no attempt is recorded for a file that cannot be read).
        assert not (area.root / f"{name}.yaml").exists()
        kept = (area.folder(CRASHED) / f"{name}.yaml").read_bytes()
        assert kept == (HOSTILE / "alias_bomb.yaml").read_bytes() if name == "bomb" else True
        error = yamlio.load_mapping(area.folder(CRASHED) / f"{name}.error.txt")["error"]
        assert error["type"] == "YamlFileError" and error["file"] == f"{name}.yaml"
        assert problem in error["message"] and f"{name}" in error["message"]
        assert error["attempt"] is None


def _dataset_with(root: Path, name: str, train: str) -> Path:
    folder = make_dataset(root, train, name, splits=("train800",))
    (folder / "val200.txt").write_text("images/0.png 0\nimages/1.png 1\n")
    return folder


def _probe_job(dataset: str) -> dict[str, Any]:
    return {"current_stage": "run",
            "config": {"dataset": dataset, "data": {"root": "${VTAB_HOSTILE_ROOT}"},
                       "backbone": {"name": "resnet18", "weights": "none"},
                       "features": {"image_size": 16}, "optim": {"lr": 0.1, "epochs": 1}},
            "stages": {"run": {"hyperparams": {"kind": "linear_probe"}}}}


def test_hostile_images_are_crashed_at_the_first_attempt(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    good = "images/0.png 0\nimages/1.png 1\nimages/2.png 0\nimages/3.png 1\n"
    _dataset_with(root, "fine", good)
    bomb = _dataset_with(root, "bomb", good + "images/bomb.png 1\n")
    (bomb / "images" / "bomb.png").write_bytes(png_header(20000, 20000))
    linked = _dataset_with(root, "linked", good + "images/link.png 1\n")
    (linked / "images" / "link.png").symlink_to(root / "fine" / "images" / "0.png")
    monkeypatch.setenv("VTAB_HOSTILE_ROOT", str(root))
    area = WorkArea(tmp_path / "work")
    for name in ("fine", "bomb", "linked"):
        queue(area, _probe_job(name), f"{name}.yaml")
    assert drain(area) == CRASHED_EXIT
    assert (area.folder(FINISHED) / "fine.yaml").exists()
    for name, image, problem in [("bomb", "bomb.png", "too large to decode"),
                                 ("linked", "link.png", "outside the dataset folder")]:
        doc = yamlio.load_mapping(area.folder(CRASHED) / f"{name}.yaml")
        assert doc["error"]["type"] == "DataError"
        assert doc["error"]["attempt"] == 1 and not doc.get("errors")  # not retried
        message = doc["error"]["message"]
        assert problem in message and f"images/{image}" in message
        assert f"(listed in {root / name / 'train800.txt'})" in message
