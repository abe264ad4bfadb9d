"""The stage machine: grids, names, validation, environment values, processors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import toy_pipeline
from vtab import status, yamlio
from vtab.config import resolve_env
from vtab.errors import ConfigError
from vtab.pipeline import (
    Finish,
    StageContext,
    Wait,
    children_of,
    execute_stage,
    expand_grid,
    point_label,
    prepare_root,
    validate,
)
from vtab.workarea import FINISHED, WorkArea


def test_grid_is_a_cartesian_product_over_list_values_with_dotted_nesting() -> None:
    points = expand_grid({"optim": {"lr": [0.1, 0.01], "name": "sgd"}, "seed": [0, 1, 2]},
                         "grid", 100)
    assert len(points) == 6
    assert points[0] == {"optim.name": "sgd", "optim.lr": 0.1, "seed": 0}
    assert points[-1] == {"optim.name": "sgd", "optim.lr": 0.01, "seed": 2}
    assert expand_grid({"optim.lr": [1, 2]}, "grid", 100) == [{"optim.lr": 1}, {"optim.lr": 2}]


def test_grid_limits() -> None:
    with pytest.raises(ConfigError, match="empty list") as info:
        expand_grid({"a": [], "b": [1]}, "stages.s.grid", 100)
    assert info.value.key == "stages.s.grid.a"
    with pytest.raises(ConfigError, match="expands to 1000 jobs"):
        expand_grid({"a": list(range(10)), "b": list(range(10)), "c": list(range(10))},
                    "stages.s.grid", 999)


def test_point_labels_are_readable() -> None:
    assert point_label("datasets", [("dataset", "cifar")]) == "cifar"
    assert point_label("tune", [("lr", 0.01), ("seed", 3)]) == "tune__lr=0.01_seed=3"
    assert point_label("t", [("x", "a/b")]) == "a-b"  # never a path separator
    assert point_label("sweep", [("step", 2000)]) == "sweep__step=2000"


@pytest.mark.parametrize(("value", "text"), [
    (0.1, "0.1"), (0.01, "0.01"), (1e-05, "1e-05"), (0.0, "0.0"), (3e-4, "0.0003"),
    (0.1234567, "0.1234567"), (1.0000001e-05, "1.0000001e-05"), (2, "2"), (True, "true"),
])
def test_floats_are_written_exactly_and_shortest(value: Any, text: str) -> None:
    assert point_label("tune", [("lr", value)]) == f"tune__lr={text}"


@pytest.mark.parametrize("grid", [
    {"optim.lr": [0.1, 0.1]},
    {"dataset": ["cifar/100", "cifar-100"]},
    {"x": [1, "1"], "seed": [0]},
])
def test_points_that_would_share_a_job_id_are_refused(grid: dict[str, Any]) -> None:
    doc = prepare_root(_with_stage("tune", {"grid": grid, "child_stage": "train_val",
                                                 "next_stage": "select"}), "toy")
    with pytest.raises(ConfigError, match="both name the job") as info:
        children_of(doc, "tune", 100)
    assert info.value.key == "stages.tune.grid"
    (axis, values), *_ = grid.items()
    for value in values:
        assert repr({axis: value})[1:-1] in info.value.message  # both points are named


def test_plan_names_colliding_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _with_stage("tune", {"grid": {"optim.lr": [1e-5, 1e-5]}, "child_stage": "train_val",
                               "next_stage": "select"})
    path = tmp_path / "toy.yaml"
    yamlio.write_mapping(path, doc)
    assert status.main(["--plan", str(path)]) == 1
    error = capsys.readouterr().err
    assert "key 'stages.tune.grid'" in error and "toy__a__tune__lr=1e-05" in error


def test_two_grids_of_one_job_cannot_fork_the_same_id(area: WorkArea) -> None:
    doc = _root(stages={"first": {"grid": {"dataset": ["x"]}, "child_stage": "run",
                                  "next_stage": "second"},
                        "second": {"grid": {"variant": ["x"]}, "child_stage": "run"},
                        "run": {"hyperparams": {"kind": "sleep"}}}, current_stage="first")
    doc = prepare_root(doc, "toy")
    ctx = StageContext(area=area)
    assert isinstance(execute_stage(doc, ctx), Wait)
    doc.pop("waiting_for")
    doc["current_stage"] = "second"
    with pytest.raises(ConfigError, match="stage 'first' already forked") as info:
        execute_stage(doc, ctx)
    assert info.value.key == "stages.second.grid"


def _root(**changes: Any) -> dict[str, Any]:
    doc = toy_pipeline()
    doc.update(changes)
    return doc


def test_children_carry_their_point_and_a_deterministic_name() -> None:
    root = prepare_root(_root(), "toy")
    (child,) = children_of(root, "datasets", 100)[:1]
    assert child["id"] == "toy__a"
    assert child["parent"] == "toy" and child["current_stage"] == "tune"
    grandchildren = children_of(child, "tune", 100)
    assert [g["id"] for g in grandchildren[:2]] == ["toy__a__tune__result=0.25_seed=0",
                                                     "toy__a__tune__result=0.25_seed=1"]
    assert grandchildren[1]["config"]["sleep"]["result"] == 0.25
    assert grandchildren[1]["config"]["seed"] == 1
    assert grandchildren[1]["config"]["dataset"] == "a"


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"current_stage": "nowhere"}, "current_stage", "not one of the stages"),
    ({"stages": {}}, "stages", "non-empty mapping"),
    ({"stages": "abc"}, "stages", "non-empty mapping"),
    ({"config": [1, 2]}, "config", "must be a mapping"),
])
def test_bad_roots(change: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        prepare_root(_root(**change), "toy")
    assert info.value.key == key


def _with_stage(name: str, spec: Any) -> dict[str, Any]:
    doc = _root()
    doc["stages"] = copy.deepcopy(doc["stages"])
    doc["stages"][name] = spec
    return doc


@pytest.mark.parametrize(("name", "spec", "key", "message"), [
    ("train_val", {"hyperparams": {"kind": "nope"}}, "stages.train_val.hyperparams.kind",
     "unknown job kind"),
    ("select", {"processor": "select_bset"}, "stages.select.processor", "did you mean"),
    ("select", {"processor": "select_best", "next_stage": "gone"}, "stages.select.next_stage",
     "not one of the stages"),
    ("tune", {"grid": {"seed": [0]}, "next_stage": "select"}, "stages.tune.child_stage",
     "must name the stage"),
    ("tune", {"grid": {}, "child_stage": "train_val"}, "stages.tune.grid", "non-empty"),
    ("tune", {"grid": {"seed": [0]}, "hyperparams": {}}, "stages.tune", "exactly one"),
    ("select", {"processor": "select_best", "nxt_stage": "final"}, "stages.select.nxt_stage",
     "unknown key"),
    ("aggregate", {"processor": "aggregate", "next_stage": "final"}, "stages.aggregate",
     "cycle"),
    ("select", [1, 2], "stages.select", "must be a mapping"),
])
def test_bad_stages(name: str, spec: Any, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate(_with_stage(name, spec) | {"config": {}})
    assert info.value.key == key


def test_a_stage_cannot_fork_into_itself() -> None:
    doc = _with_stage("tune", {"grid": {"seed": [0]}, "child_stage": "tune"})
    with pytest.raises(ConfigError, match="cycle"):
        validate(doc)


@pytest.mark.parametrize("name", ["../escape", "a/b", "x@y", 5])
def test_pipeline_names_cannot_escape_the_work_area(name: Any) -> None:
    with pytest.raises(ConfigError) as info:
        prepare_root(_root(name=name), "toy")
    assert info.value.key == "name"


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        prepare_root(_root(stagez={}), "toy")
    assert info.value.key == "stagez"


def test_environment_references_are_resolved_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTAB_TEST_ROOT", "/data/x")
    monkeypatch.delenv("VTAB_TEST_EPOCHS", raising=False)
    doc = _root(config={"data": {"root": "${VTAB_TEST_ROOT:-./d}/vtab"},
                        "epochs": "${VTAB_TEST_EPOCHS:-30}"})
    root = prepare_root(doc, "toy")
    assert root["config"] == {"data": {"root": "/data/x/vtab"}, "epochs": 30}
    assert root["env"] == {"VTAB_TEST_ROOT": "/data/x", "VTAB_TEST_EPOCHS": "30"}


def test_an_unset_variable_without_default_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VTAB_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError, match="VTAB_TEST_MISSING is not set") as info:
        resolve_env({"data": {"root": "${VTAB_TEST_MISSING}"}})
    assert info.value.key == "data.root"


def _finish_children(area: WorkArea, doc: dict[str, Any], results: dict[str, float]) -> None:
    for child_id in doc["waiting_for"]["children"]:
        path = area.root / f"{child_id}.yaml"
        child = yamlio.load_mapping(path)
        child.update(result=results[child_id], metrics={"top1": results[child_id]})
        yamlio.write_mapping(area.folder(FINISHED) / path.name, child)
        path.unlink()


def test_fork_select_and_aggregate(area: WorkArea) -> None:
    ctx = StageContext(area=area)
    doc = children_of(prepare_root(_root(), "toy"), "datasets", 100)[0]
    assert isinstance(execute_stage(doc, ctx), Wait)
    assert len(area.queued()) == 6
    assert isinstance(execute_stage(copy.deepcopy(doc), ctx), Wait)
    assert len(area.queued()) == 6  # a retried fork creates nothing twice
    scores = {"toy__a__tune__result=0.25_seed=0": 0.2, "toy__a__tune__result=0.25_seed=1": 0.4,
              "toy__a__tune__result=0.75_seed=0": 0.9, "toy__a__tune__result=0.75_seed=1": 0.5,
              "toy__a__tune__result=0.5_seed=0": 0.7, "toy__a__tune__result=0.5_seed=1": 0.71}
    _finish_children(area, doc, scores)
    doc.pop("waiting_for")
    doc["current_stage"] = "select"
    execute_stage(doc, ctx)
    assert doc["selected"] == {"sleep.result": 0.5}  # mean 0.705 beats 0.7 and 0.3
    assert doc["config"]["sleep"]["result"] == 0.5
    assert [round(row["mean"], 3) for row in doc["tuning"]] == [0.3, 0.7, 0.705]
    doc["current_stage"] = "final"
    assert isinstance(execute_stage(doc, ctx), Wait)
    finals = doc["waiting_for"]["children"]
    assert finals == ["toy__a__final__seed=0", "toy__a__final__seed=1", "toy__a__final__seed=2"]
    _finish_children(area, doc, dict(zip(finals, [0.6, 0.7, 0.8], strict=True)))
    doc.pop("waiting_for")
    doc["current_stage"] = "aggregate"
    assert isinstance(execute_stage(doc, ctx), Finish)
    assert doc["result"] == pytest.approx(0.7)
    assert doc["std"] == pytest.approx(0.0816, abs=1e-4)
    assert doc["seeds"] == {0: 0.6, 1: 0.7, 2: 0.8}
    assert doc["metrics"]["top1"]["mean"] == pytest.approx(0.7)
