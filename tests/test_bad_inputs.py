"""A corpus of broken inputs (tests/data/bad_inputs/): each one crashes alone, clearly.

All files are queued into one work area together and drained by one runner: each broken one
must land in crashed/ with an error naming its file and the key (or, when it cannot even be
parsed, byte for byte with its error beside it); the good ones must finish; the runner must
go on to the end and exit saying that jobs crashed. Bad runner options (runner_flags.yaml:
devices, lease settings, counts) must stop a runner before it claims anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import drain
from vtab import yamlio
from vtab.launch import local as launch_local
from vtab.runner import CRASHED_EXIT
from vtab.workarea import CRASHED, FINISHED, RUNNING, WorkArea

CORPUS = Path(__file__).parent / "data" / "bad_inputs"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "expected.yaml").read_text())


def _broken_data(root: Path, digits_root: Path) -> None:
    """Datasets next to digits with one fault each, and a checkpoint that is not one."""
    (root / "digits").symlink_to(digits_root / "digits")
    for name, train in {"onlytrain": "images/0.png 0\n",
                        "badlines": "images/0.png 0\nimages/1.png\n",
                        "neglabel": "images/0.png 0\nimages/1.png -1\n",
                        "fewclasses": "images/0.png 0\nimages/1.png 1\nimages/2.png 2\n"}.items():
        (root / name).mkdir()
        (root / name / "train800.txt").write_text(train)
        if name != "onlytrain":
            (root / name / "val200.txt").write_text("images/0.png 0\n")
    (root / "not_a_checkpoint.pth").write_text("this is a text file, not a checkpoint\n")
    (root / "emptylabels").mkdir()
    (root / "emptylabels" / "train800.txt").write_text("images/0.png 0,1\nimages/1.png\n")
    (root / "emptylabels" / "val200.txt").write_text("images/0.png 0\n")
    (root / "mixedlayout" / "train800" / "cat").mkdir(parents=True)
    (root / "mixedlayout" / "train800.txt").write_text("images/0.png 0\n")
    (root / "mixedlayout" / "val200.txt").write_text("images/0.png 0\n")


@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory,
            digits_root: Path) -> Iterator[tuple[WorkArea, int]]:
    data = tmp_path_factory.mktemp("bad-data")
    _broken_data(data, digits_root)
    area = WorkArea(tmp_path_factory.mktemp("bad-inputs") / "work")
    for name in EXPECTED:
        shutil.copyfile(CORPUS / name, area.root / name)
    saved = os.environ.get("VTAB_BAD_INPUT_ROOT")
    os.environ["VTAB_BAD_INPUT_ROOT"] = str(data)
    try:
        yield area, drain(area)
    finally:
        if saved is None:
            del os.environ["VTAB_BAD_INPUT_ROOT"]
        else:
            os.environ["VTAB_BAD_INPUT_ROOT"] = saved


def test_the_corpus_is_large_enough() -> None:
    assert sum("ok" not in e for e in EXPECTED.values()) >= 30


def test_the_runner_goes_on_to_the_end(drained: tuple[WorkArea, int]) -> None:
    area, code = drained
    assert code == CRASHED_EXIT  # and says that jobs crashed
    assert area.listing(RUNNING) == [] and area.queued() == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_input_has_its_expected_outcome(drained: tuple[WorkArea, int], name: str) -> None:
    area, _ = drained
    expect = EXPECTED[name]
    stem = name.removesuffix(".yaml")
    if expect.get("ok"):
        assert (area.folder(FINISHED) / name).exists()
        return
    if "unreadable" in expect:
        assert (area.folder(CRASHED) / name).read_bytes() == (CORPUS / name).read_bytes()
        report = (area.folder(CRASHED) / f"{stem}.error.txt").read_text()
        assert expect["unreadable"] in report and name in report
        return
    crashed = [p for p in area.folder(CRASHED).glob("*.yaml")
               if not p.with_name(f"{p.stem}.error.txt").exists()]
    matches = [p for p in crashed if yamlio.load_mapping(p)["error"]["file"] == name]
    assert len(matches) == 1, f"{name} is not in crashed/ exactly once"
    error = yamlio.load_mapping(matches[0])["error"]
    assert error["key"] == expect["key"]
    assert expect["message"] in error["message"]
    assert name in error["message"]  # the message names the file
    assert error["attempt"] == 1  # bad input is not retried


FLAGS: list[dict[str, Any]] = yaml.safe_load((CORPUS / "runner_flags.yaml").read_text())


@pytest.mark.parametrize("case", FLAGS, ids=[" ".join(case["args"]) for case in FLAGS])
def test_bad_runner_options_stop_it_before_it_touches_the_work_area(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: dict[str, Any]) -> None:
    area = tmp_path / "work"
    try:
        code = launch_local.main(["--work_area", str(area), "--devices", "cpu", *case["args"]])
    except SystemExit as exit_:  # argparse's usage error
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert case["message"] in err
    assert not (area / "running").exists()  # nothing claimed: no runner started
