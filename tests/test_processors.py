"""Processors on hand-made finished children: option checks, NaN results, duplicate keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from vtab import processors, yamlio  # noqa: F401  (registers the processors)
from vtab.errors import ConfigError, VtabError
from vtab.pipeline import StageContext, execute_stage, validate
from vtab.workarea import FINISHED, WorkArea


def _child(n: int, result: float, **point: Any) -> dict[str, Any]:
    return {"id": f"p__{n}", "point": point, "config": dict(point), "result": result}


def _run(area: WorkArea, processor: str, children: list[dict[str, Any]],
         **options: Any) -> dict[str, Any]:
    """Run `processor` (with `options`) in a job whose stage `tune` forked `children`."""
    for child in children:
        yamlio.write_mapping(area.folder(FINISHED) / f"{child['id']}.yaml",
                             {"pipeline": "p", "parent": "p", **child})
    doc = {"pipeline": "p", "id": "p", "current_stage": "step", "config": {},
           "forks": {"tune": [c["id"] for c in children]},
           "stages": {"step": {"processor": {"kind": processor, **options}}}}
    execute_stage(doc, StageContext(area=area))
    return doc


def _lr_children(results: dict[float, float]) -> list[dict[str, Any]]:
    return [_child(n, r, lr=lr, seed=0) for n, (lr, r) in enumerate(results.items())]


@pytest.mark.parametrize(("processor", "option"), [
    ("select_best", "seed_keys"), ("select_best", "modes"), ("aggregate", "metric"),
    ("summarize", "seed_key"),
])
def test_unknown_options_are_refused_when_the_pipeline_is_checked(processor: str,
                                                                   option: str) -> None:
    doc = {"current_stage": "step", "stages": {"step": {"processor": {"kind": processor,
                                                                      option: "x"}}}}
    with pytest.raises(ConfigError, match="unknown key") as info:
        validate(doc)
    assert info.value.key == f"stages.step.processor.{option}"


@pytest.mark.parametrize("mode", ["maximize", "MAX", 1])
def test_select_best_mode_must_be_max_or_min(mode: Any) -> None:
    doc = {"current_stage": "step",
           "stages": {"step": {"processor": {"kind": "select_best", "mode": mode}}}}
    with pytest.raises(ConfigError) as info:
        validate(doc)  # when the pipeline is read, before any of its grid trains
    assert info.value.key == "stages.step.processor.mode"


@pytest.mark.parametrize(("mode", "rank"), [("max", 1), ("min", 0)])
@pytest.mark.parametrize("nan_at", [0, 1, 2])
def test_a_nan_result_is_never_selected(area: WorkArea, mode: str, rank: int,
                                        nan_at: int) -> None:
    lrs = [0.1, 0.2, 0.3]
    results = [0.5, 0.9]
    results.insert(nan_at, math.nan)
    doc = _run(area, "select_best", _lr_children(dict(zip(lrs, results, strict=True))), mode=mode)
    chosen = [lr for lr, r in zip(lrs, results, strict=True) if not math.isnan(r)][rank]
    assert doc["selected"] == {"lr": chosen}
    assert doc["config"]["lr"] == chosen
    assert len(doc["tuning"]) == 3  # the NaN setting is still reported


def test_a_nan_among_seeds_makes_its_setting_nan_and_unselected(area: WorkArea) -> None:
    children = [_child(0, math.nan, lr=0.1, seed=0), _child(1, 0.9, lr=0.1, seed=1),
                _child(2, 0.5, lr=0.2, seed=0), _child(3, 0.7, lr=0.2, seed=1)]
    doc = _run(area, "select_best", children)
    assert doc["selected"] == {"lr": 0.2}
    nan_row = doc["tuning"][0]
    assert nan_row["setting"] == {"lr": 0.1} and math.isnan(nan_row["mean"])
    assert math.isnan(nan_row["std"]) and nan_row["n"] == 2


def test_aggregate_of_a_nan_seed_is_nan(area: WorkArea) -> None:
    doc = _run(area, "aggregate", [_child(0, 0.5, seed=0), _child(1, math.inf, seed=1)])
    assert math.isnan(doc["result"]) and math.isnan(doc["std"])


def test_all_nan_results_are_an_error(area: WorkArea) -> None:
    with pytest.raises(VtabError, match="every setting is NaN"):
        _run(area, "select_best", _lr_children({0.1: math.nan, 0.2: math.nan}))


def test_summarize_refuses_two_children_of_one_dataset(area: WorkArea) -> None:
    children = [_child(0, 0.5, dataset="a", seed=0), _child(1, 0.6, dataset="a", seed=1)]
    with pytest.raises(ConfigError, match="p__0 and p__1 have the same dataset 'a'") as info:
        _run(area, "summarize", children)
    assert info.value.key == "stages.step.processor"


def test_aggregate_refuses_two_children_of_one_seed(area: WorkArea) -> None:
    children = [_child(0, 0.5, seed=0, wd=0.0), _child(1, 0.6, seed=0, wd=0.1)]
    with pytest.raises(ConfigError, match="p__0 and p__1 have the same seed 0") as info:
        _run(area, "aggregate", children)
    assert info.value.key == "stages.step.processor"


def test_aggregate_keys_seeds_by_seed_key(area: WorkArea) -> None:
    children = [_child(0, 0.5, rep=0, seed=0), _child(1, 0.7, rep=1, seed=0)]
    doc = _run(area, "aggregate", children, seed_key="rep")
    assert doc["seeds"] == {0: 0.5, 1: 0.7}
    assert doc["result"] == pytest.approx(0.6)


def test_a_missing_grid_stage_names_the_processor_option(area: WorkArea) -> None:
    with pytest.raises(ConfigError, match="no children were forked") as info:
        _run(area, "aggregate", _lr_children({0.1: 0.5}), grid_stage="final")
    assert info.value.key == "stages.step.processor.grid_stage"


def _layered(n: int, results: dict[str, float], **point: Any) -> dict[str, Any]:
    """A child reporting one result per layer (variants), each with the setting that picks it."""
    variants = {name: {"result": r, "metrics": {"top1": r},
                       "setting": {"features.layers": [{"name": name, "pool": "avg"}]}}
                for name, r in results.items()}
    return {"id": f"p__{n}", "point": point, "config": dict(point), "variants": variants}


def test_select_best_ranks_each_variant_as_a_setting(area: WorkArea) -> None:
    children = [_layered(0, {"layer3": 0.6, "layer4": 0.8}, lr=0.1, seed=0),
                _layered(1, {"layer3": 0.7, "layer4": 0.6}, lr=0.1, seed=1),
                _layered(2, {"layer3": 0.9, "layer4": 0.2}, lr=0.2, seed=0),
                _layered(3, {"layer3": 0.7, "layer4": 0.1}, lr=0.2, seed=1)]
    doc = _run(area, "select_best", children)
    # Means over seeds: lr 0.1: layer3 0.65, layer4 0.7; lr 0.2: layer3 0.8, layer4 0.15.
    best = {"lr": 0.2, "features.layers": [{"name": "layer3", "pool": "avg"}]}
    assert doc["selected"] == best
    assert doc["config"] == {"lr": 0.2, "features": {"layers": [{"name": "layer3",
                                                                 "pool": "avg"}]}}
    assert [(row["setting"], row["mean"]) for row in doc["tuning"]] == [
        ({"lr": 0.1, "features.layers": [{"name": "layer3", "pool": "avg"}]}, pytest.approx(0.65)),
        ({"lr": 0.1, "features.layers": [{"name": "layer4", "pool": "avg"}]}, pytest.approx(0.7)),
        (best, pytest.approx(0.8)),
        ({"lr": 0.2, "features.layers": [{"name": "layer4", "pool": "avg"}]},
         pytest.approx(0.15))]
    ranked_by_metric = _run(area, "select_best", children, metric="metrics.top1")
    assert ranked_by_metric["selected"] == best


def test_aggregate_averages_each_variant_over_seeds(area: WorkArea) -> None:
    children = [_layered(0, {"layer3": 0.6, "layer4": 0.8}, seed=0),
                _layered(1, {"layer3": 0.8, "layer4": 0.6}, seed=1)]
    doc = _run(area, "aggregate", children)
    assert "result" not in doc
    assert doc["variants"]["layer3"]["result"] == pytest.approx(0.7)
    assert doc["variants"]["layer3"]["std"] == pytest.approx(0.1)
    assert doc["variants"]["layer4"]["metrics"]["top1"]["mean"] == pytest.approx(0.7)
    assert doc["seeds"] == {0: {"layer3": 0.6, "layer4": 0.8}, 1: {"layer3": 0.8, "layer4": 0.6}}


def test_aggregate_refuses_children_with_different_variants(area: WorkArea) -> None:
    children = [_layered(0, {"layer3": 0.6}, seed=0), _layered(1, {"layer4": 0.6}, seed=1)]
    with pytest.raises(VtabError, match="report different variants"):
        _run(area, "aggregate", children)


@pytest.mark.parametrize("variant", [{"result": 0.5}, {"result": 0.5, "setting": {}}, 0.5])
def test_select_best_refuses_a_variant_without_its_setting(area: WorkArea, variant: Any) -> None:
    child = _layered(0, {"layer3": 0.6}, lr=0.1, seed=0)
    child["variants"]["odd"] = variant
    with pytest.raises(VtabError, match="variant 'odd' lacks the setting that selects it"):
        _run(area, "select_best", [child])


def test_select_best_takes_the_mean_over_the_keys_it_is_told(area: WorkArea) -> None:
    # Checkpoint b wins on average over the two tasks, though a is best on task x alone.
    scores = {("a", "x"): 0.9, ("a", "y"): 0.2, ("b", "x"): 0.8, ("b", "y"): 0.6}
    children = [_child(n, r, weights=w, dataset=d, seed=0)
                for n, ((w, d), r) in enumerate(scores.items())]
    doc = _run(area, "select_best", children, mean_over=["dataset"])
    assert doc["selected"] == {"weights": "b"} and doc["config"] == {"weights": "b"}
    assert [(row["setting"], row["mean"], row["n"]) for row in doc["tuning"]] == [
        ({"weights": "a"}, pytest.approx(0.55), 2), ({"weights": "b"}, pytest.approx(0.7), 2)]


def test_a_key_to_average_over_must_be_swept() -> None:
    from vtab.pipeline import check_plan, prepare_root

    root = prepare_root({
        "current_stage": "tune", "config": {"sleep": {"result": 0.5}},
        "stages": {"tune": {"grid": {"seed": [0, 1]}, "child_stage": "run",
                            "next_stage": "best"},
                   "run": {"hyperparams": {"kind": "sleep"}},
                   "best": {"processor": {"kind": "select_best", "mean_over": ["dataset"]}}},
    }, "p")
    report = check_plan(root, 100, deep=False)
    ((key, message),) = report.errors
    assert key == "stages.best.processor.mean_over[0]"
    assert "'dataset' is not swept by grid stage 'tune'" in message


def test_a_setting_with_results_left_out_is_not_selected(area: WorkArea) -> None:
    # Checkpoint b's probe on task y crashed (skip_crashed): its mean over x alone would win.
    children = [_child(0, 0.5, weights="a", dataset="x", seed=0),
                _child(1, 0.5, weights="a", dataset="y", seed=0),
                _child(2, 0.9, weights="b", dataset="x", seed=0)]
    doc = _run(area, "select_best", children, mean_over=["dataset"])
    assert doc["selected"] == {"weights": "a"}
    assert [row["n"] for row in doc["tuning"]] == [2, 1]


def test_a_checkpoint_each_dataset_selects_stays_in_its_entry_not_a_row(
        area: WorkArea) -> None:
    children = [{**_child(n, 0.5 + n / 10, dataset=name), "labels": {"dataset": name,
                                                                     "step": step},
                 "selected_labels": {"step": step},
                 "config": {"dataset": name, "backbone": {"name": "r", "weights": f"c{step}"}}}
                for n, (name, step) in enumerate([("x", 100), ("y", 200)])]
    _run(area, "summarize", children)
    summary = yamlio.load_mapping(area.root / "summarized" / "p" / "summary.yaml")
    assert "rows" not in summary and "labels" not in summary
    assert {name: entry["selected_labels"] for name, entry in summary["datasets"].items()} == {
        "x": {"step": 100}, "y": {"step": 200}}


def test_one_row_names_the_backbone_its_jobs_ran_with(area: WorkArea) -> None:
    children = [{**_child(n, 0.5, dataset=name), "labels": {"dataset": name},
                 "config": {"dataset": name, "backbone": {"name": "resnet34"}}}
                for n, name in enumerate(["x", "y"])]
    _run(area, "summarize", children)  # the job's own config names no backbone
    summary = yamlio.load_mapping(area.root / "summarized" / "p" / "summary.yaml")
    assert summary["backbone"] == {"name": "resnet34"}


def test_averaging_over_the_checkpoint_axis_records_no_sweep(area: WorkArea,
                                                             tmp_path: Path) -> None:
    for step in (0, 10):
        (tmp_path / f"c_{step}.pth").write_bytes(b"w")
    children = [_child(n, r, **{"backbone.weights": str(tmp_path / f"c_{s}.pth"), "lr": lr,
                                "seed": 0})
                for n, (s, lr, r) in enumerate([(0, 0.1, 0.5), (10, 0.1, 0.7), (0, 0.2, 0.6),
                                                (10, 0.2, 0.6)])]
    for child in children:
        yamlio.write_mapping(area.folder(FINISHED) / f"{child['id']}.yaml",
                             {"pipeline": "p", "parent": "p", **child})
    doc = {"pipeline": "p", "id": "p", "current_stage": "step", "config": {},
           "forks": {"tune": [c["id"] for c in children]},
           "stages": {"tune": {"grid": {"backbone.weights": {
                          "checkpoints": f"{tmp_path}/c_{{step}}.pth"}, "lr": [0.1, 0.2]},
                               "child_stage": "x"},
                      "step": {"processor": {"kind": "select_best",
                                             "mean_over": ["backbone.weights"]}}}}
    execute_stage(doc, StageContext(area=area))
    assert doc["selected"] == {"lr": 0.1} and "sweep" not in doc
    doc["stages"]["step"]["processor"] = "select_best"
    execute_stage(doc, StageContext(area=area))
    assert [(p["step"], p["mean"]) for p in doc["sweep"]["points"]] == [(0, 0.6), (10, 0.7)]
    assert doc["labels"] == {"step": 10} and doc["sweep"]["mode"] == "max"
