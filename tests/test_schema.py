"""Config schemas: every key read or refused by name, errors that say what to fix, docs in step."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, get_args

import pytest

from tests.conftest import drain, queue
from vtab import reference, yamlio
from vtab.config import set_path
from vtab.devices import parse_devices
from vtab.errors import ConfigError
from vtab.evaluation.schemas import METRICS, BackboneConfig, LinearProbeConfig
from vtab.pipeline import KINDS, PROCESSORS, check_plan, prepare_root
from vtab.schema import Section, key_docs, validate
from vtab.workarea import FINISHED, WorkArea

REPO = Path(__file__).resolve().parent.parent
GOOD = {"dataset": "digits", "data": {"root": "/data"}, "backbone": {"name": "resnet18"},
        "optim": {"lr": 0.1, "epochs": 3}}


def problems(change: dict[str, Any], schema: type[Section] = LinearProbeConfig,
             **kwargs: Any) -> list[tuple[str, str]]:
    config = copy.deepcopy(GOOD)
    for key, value in change.items():
        set_path(config, key, value)
    with pytest.raises(ConfigError) as caught:
        validate(schema, config, **kwargs)
    return [(p.key, p.message) for p in caught.value.problems]


def test_a_good_config_gets_every_default_filled_in() -> None:
    dumped = validate(LinearProbeConfig, GOOD).model_dump(mode="json")
    assert dumped == {
        "dataset": "digits",
        "data": {"root": "/data", "train_split": "train800", "eval_split": "val200",
                 "task": "single_label"},
        "backbone": {"name": "resnet18", "source": "torchvision", "weights": "none"},
        "features": {"image_size": None, "batch_size": 64, "precision": "auto",
                     "layers": [{"name": "output", "pool": "none"}], "storage": "fp32",
                     "mode": "offline"},
        "head": {"kind": "linear", "feature_norm": "standardize"},
        "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "epochs": 3,
                  "batch_size": 128, "warmup_epochs": 0, "momentum": 0.9},
        "seed": 0, "metric": "top1"}
    assert validate(LinearProbeConfig, dumped).model_dump(mode="json") == dumped  # a fixpoint


@pytest.mark.parametrize("head", [
    {"kind": "knn", "votes": "uniform", "k": [3]}, {"kind": "logreg"}, {"kind": "svm"},
    {"kind": "mlp", "hidden": [8, 4], "dropout": 0.5}, {"kind": "bn_linear"}])
def test_every_head_records_only_what_it_reads(head: dict[str, Any]) -> None:
    """run_config is the dump: no optim or seed where the head reads none, no temperature with
    uniform votes; read back, it is the same config (a fixpoint)."""
    config = {**GOOD, "head": head,
              "features": {"layers": [{"name": "layer3", "pool": "avgpool2d", "kernel_size": 2},
                                      {"name": "last_blocks", "blocks": 4, "pool": "cls"}]}}
    if head["kind"] in ("knn", "logreg", "svm"):
        del config["optim"]
    dumped = validate(LinearProbeConfig, config).model_dump(mode="json")
    assert ("optim" in dumped) == (head["kind"] in ("mlp", "bn_linear"))
    assert ("seed" in dumped) == (head["kind"] in ("mlp", "bn_linear"))
    assert "temperature" not in dumped["head"]
    assert dumped["features"]["layers"] == [
        {"name": "layer3", "pool": "avgpool2d", "kernel_size": 2, "stride": None, "padding": 0},
        {"name": "last_blocks", "pool": "cls", "blocks": 4}]
    assert validate(LinearProbeConfig, dumped).model_dump(mode="json") == dumped


@pytest.mark.parametrize(("change", "expected"), [
    ({"optim.weight_decy": 0.01}, [("optim.weight_decy", "did you mean 'weight_decay'?")]),
    ({"head.knd": "linear"}, [("head.knd", "did you mean 'kind'?")]),
    ({"features.layer": "layer3", "features.pool": "avg"},
     [("features.layer", "unknown key"), ("features.pool", "unknown key")]),
    ({"optim.name": "adamw", "optim.momentum": 0.5},
     [("optim.momentum", "read only when optim.name is sgd, not adamw")]),
    ({"optim.name": "adamm"}, [("optim.name", "unknown optimizer 'adamm' (did you mean "
                                              "'adamw'?); known: sgd, adamw")]),
    ({"head.kind": "mpl"}, [("head.kind", "unknown head kind 'mpl' (did you mean 'mlp'?); "
                                          "known: linear, bn_linear, mlp, logreg, svm, knn")]),
    ({"head": {"kind": "knn"}, "optim.lr": 0},
     [("optim", "is not read by head.kind knn, which is fitted to convergence; remove it")]),
    ({"head": {"kind": "svm"}, "seed": 3, "optim.lr": 0},
     [("optim", "is not read by head.kind svm"), ("seed", "is not read by head.kind svm")]),
    ({"head": {"kind": "logreg", "c": 0.1}}, [("optim", "is not read by head.kind logreg")]),
    ({"features.layers": [{"name": "layer3", "pool": "avgpool2d", "stride": 2}]},
     [("features.layers[0].kernel_size", "is required with pool avgpool2d")]),
    ({"features.layers": [{"name": "layer3", "pool": "avg", "blocks": 2}]},
     [("features.layers[0].blocks", "is read only with name last_blocks")]),
    ({"features.layers": [{"name": "output", "pool": "avg"}]},
     [("features.layers[0].pool", "the output layer is pooled by the backbone already")]),
    ({"features.layers": [{"name": "layer3", "pool": "avg"}, {"name": "layer3", "pool": "avg"}]},
     [("features.layers", "the same layer and pooling twice: layer3:avg")]),
    ({"features.layers": []}, [("features.layers", "at least 1 item")]),
    ({"metric": "map"}, [("metric", "map is not a single_label metric; use one of top1, top5")]),
    ({"data.task": "multi_label"},
     [("metric", "top1 is not a multi_label metric; use one of map, map_voc07")]),
    ({"head": ["linear"]}, [("head", "expected a mapping, got list ['linear']")]),
    ({"optim.lr": "0.1"}, [("optim.lr", "expected a number, got str '0.1'")]),
    ({"optim.lr": 0}, [("optim.lr", "must be greater than 0, got 0")]),
    ({"optim.lr": math.inf}, [("optim.lr", "must be a finite number")]),
    ({"optim.epochs": 2.0}, [("optim.epochs", "expected an integer, got float 2.0")]),
    ({"seed": True}, [("seed", "expected an integer, got bool True")]),
    ({"optim.momentum": 1.0}, [("optim.momentum", "must be less than 1, got 1.0")]),
    ({"optim.warmup_epochs": 5}, [("optim.warmup_epochs", "must not exceed optim.epochs (3)")]),
    ({"metric": "acc"}, [("metric", "must be one of top1, top5, balanced_accuracy, macro_f1, "
                                    "map, map_voc07")]),
    ({"data.eval_split": "../../secret"}, [("data.eval_split", "is not a plain name")]),
    ({"dataset": "a/b"}, [("dataset", "is not a plain name")]),
    ({"data": None}, [("data", "expected a mapping, got NoneType None")]),
    ({"backbone.name": None, "metric": "x", "optim.lr": -1},
     [("backbone.name", "expected a string"), ("optim.lr", "must be greater than 0"),
      ("metric", "must be one of")]),
])
def test_each_problem_names_its_key(change: dict[str, Any],
                                    expected: list[tuple[str, str]]) -> None:
    found = problems(change)
    assert [key for key, _ in found] == [key for key, _ in expected]
    for (_, message), (_, text) in zip(found, expected, strict=True):
        assert text in message


def test_a_missing_section_and_a_key_of_another_kind() -> None:
    config = {k: v for k, v in GOOD.items() if k != "optim"} | {"sleep": {"seconds": 1}}
    with pytest.raises(ConfigError) as caught:
        validate(LinearProbeConfig, config,
                 elsewhere={"job kind 'sleep'": KINDS.get("sleep").schema})
    assert [(p.key, p.message) for p in caught.value.problems] == [
        ("optim", "is required: head.kind linear is trained by gradient descent "
                  "(optim.name, optim.lr, optim.epochs)"),
        ("sleep", "unknown key here: it is read by job kind 'sleep'")]


def test_keys_under_a_prefix_and_in_lists() -> None:
    class Grid(Section):
        values: list[int]

    with pytest.raises(ConfigError) as caught:
        validate(Grid, {"values": [1, "2", 3.5]}, prefix="stages.tune")
    assert [p.key for p in caught.value.problems] == ["stages.tune.values[1]",
                                                      "stages.tune.values[2]"]


def test_every_key_has_a_one_line_help() -> None:
    schemas = [k.schema for _, k in KINDS.items() if k.run.__module__.startswith("vtab.")]
    schemas += [p.options for _, p in PROCESSORS.items()]
    for schema in schemas:
        for doc in key_docs(schema):
            assert doc.help and "\n" not in doc.help, f"{schema.__name__}: {doc.key}"


def test_the_key_reference_in_the_docs_is_the_generated_one() -> None:
    path = REPO / "docs" / "PIPELINES.md"
    text = path.read_text()
    assert reference.replace_in(text) == text, (
        "docs/PIPELINES.md's key reference is out of date: run `make docs`")
    assert "| `optim.momentum` | number, >= 0, < 1 | 0.9 | SGD momentum (when " \
           "`optim.name: sgd`) |" in text


def test_the_schema_choices_are_what_the_engine_implements(digits_root: Path) -> None:
    import torch

    from vtab.evaluation.backbones import _SOURCES
    from vtab.evaluation.heads import known_heads
    from vtab.evaluation.metrics import TASKS
    from vtab.evaluation.schemas import HEAD_SECTIONS, METRICS_OF_TASK

    sources = get_args(BackboneConfig.model_fields["source"].annotation)
    assert set(sources) == set(_SOURCES)
    logits = torch.randn(20, 7)
    single = TASKS["single_label"].evaluate(logits, logits.argmax(1), 7, 7).metrics
    multi = TASKS["multi_label"].evaluate(logits, (logits > 0).to(torch.int8), 7, 7).metrics
    assert (set(single), set(multi)) == (set(METRICS_OF_TASK["single_label"]),
                                         set(METRICS_OF_TASK["multi_label"]))
    assert set(METRICS) == set(single) | set(multi)
    assert sorted(s.model_fields["kind"].default for s in HEAD_SECTIONS) == known_heads()


def test_run_config_records_what_the_kind_read(area: WorkArea) -> None:
    queue(area, {"name": "s", "current_stage": "run", "config": {"sleep": {"result": 0.5}},
                 "stages": {"run": {"hyperparams": {"kind": "sleep", "seed": 3}}}}, "s.yaml")
    assert drain(area) == 0
    done = yamlio.load_mapping(area.folder(FINISHED) / "s.yaml")
    assert done["run_config"] == {"kind": "sleep", "sleep": {"seconds": 0.0, "log": "",
                                                             "result": 0.5, "batch": False},
                                  "dataset": "", "seed": 3, "metric": "top1"}


def test_numbers_read_as_yaml_1_2_reads_them_and_strings_stay_strings() -> None:
    doc = yamlio.parse_mapping(b"a: 1e-3\nb: -2E+5\nc: '1e-3'\nd: 1e3x\ne: 1.0e-3\n", "x")
    assert doc == {"a": 0.001, "b": -200000.0, "c": "1e-3", "d": "1e3x", "e": 0.001}
    assert yamlio.parse_mapping(yamlio.dump(doc).encode(), "again") == doc  # quoted on writing


def test_dotted_keys_in_config_are_nested_and_a_key_given_twice_is_refused() -> None:
    root = prepare_root({"current_stage": "run", "config": {"optim.lr": 0.5, "seed": 1},
                         "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, "p")
    assert root["config"] == {"optim": {"lr": 0.5}, "seed": 1}
    for doc, key in [
            ({"config": {"optim.lr": 0.5, "optim": {"lr": 0.1}}}, "config.optim.lr"),
            ({"stages": {"run": {"hyperparams": {"kind": "sleep", "sleep.seconds": 1,
                                                 "sleep": {"seconds": 2}}}}},
             "stages.run.hyperparams.sleep.seconds"),
            ({"stages": {"run": {"grid": {"seed": [1], "sleep": {"seconds": 1}, "sleep.seconds":
                                          [2]}, "child_stage": "go"},
                         "go": {"hyperparams": {"kind": "sleep"}}}}, "stages.run.grid"),
    ]:
        base = {"current_stage": "run", "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}
        with pytest.raises(ConfigError, match="set twice") as caught:
            check_plan(prepare_root(base | doc, "p"), 100, deep=False).raise_errors("planned")
        assert caught.value.key.startswith(key)


@pytest.mark.parametrize(("key", "value"), [("attempts", "three"), ("errors", 7),
                                             ("history", "nonsense"), ("attempts", True)])
def test_bookkeeping_keys_a_pipeline_carries_must_have_their_types(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match="is written by runners") as caught:
        prepare_root({"current_stage": "run", key: value,
                      "stages": {"run": {"hyperparams": {"kind": "sleep"}}}}, "p")
    assert caught.value.key == key


def test_a_module_backbone_must_be_importable() -> None:
    from vtab.evaluation.backbones import resolve_backbone

    with pytest.raises(ConfigError, match=r"cannot find module nosuch\.models"):
        resolve_backbone(BackboneConfig(name="nosuch.models:build", source="module"))


def test_device_entries_are_read_plainly() -> None:
    assert parse_devices("01, cpu,0,0") == ["1", "cpu", "0", "0"]
