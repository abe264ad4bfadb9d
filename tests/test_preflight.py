"""Problems found before work is done: `--plan`, devices, and failures of the runner's own
environment (out of memory, weights it cannot fetch), which give the job back uncounted."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import drain, queue
from tests.test_processes import start_runner
from vtab import status, yamlio
from vtab.devices import environment_failure
from vtab.evaluation import probe
from vtab.runner import CANNOT_RUN_EXIT
from vtab.workarea import CRASHED, RUNNING, WorkArea


def probe_job(root: Path, stages: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    """A linear-probe pipeline on the digits data: 2 learning rates, then a final run."""
    return {"name": "p", "current_stage": "tune",
            "config": {"dataset": "digits", "data": {"root": str(root)},
                       "backbone": {"name": "resnet18", "weights": "none"},
                       "features": {"image_size": 16}, "optim": {"lr": 0.1, "epochs": 1},
                       **config},
            "stages": stages or {
                "tune": {"grid": {"optim.lr": [0.1, 0.01]}, "child_stage": "train",
                         "next_stage": "final"},
                "train": {"hyperparams": {"kind": "linear_probe"}},
                "final": {"grid": {"seed": [0]}, "child_stage": "test"},
                "test": {"hyperparams": {"kind": "linear_probe", "data.train_split":
                                         "train800val200", "data.eval_split": "test"}}}}


def plan(path: Path, doc: dict[str, Any],
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    yamlio.write_mapping(path, doc)
    code = status.main(["--plan", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_of_a_good_pipeline_prints_its_tree(tmp_path: Path, digits_root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(tmp_path / "p.yaml", probe_job(digits_root), capsys)
    assert code == 0, err
    assert "tune: grid -> 2 jobs: p__tune__lr=0.1, p__tune__lr=0.01" in out
    assert "checked the 3 runs it would make" in out
    assert err == ""


def test_plan_checks_layers_pooling_and_k_on_the_model(
        tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Layer names and pooling are checked on the backbone (random weights, one blank image)
    and the largest k against the training split, every problem at once, before queuing."""
    doc = probe_job(digits_root, features={"image_size": 16, "layers": [
        {"name": "layer9", "pool": "avg"}, {"name": "layer3", "pool": "cls"},
        {"name": "layer4", "pool": "avgpool2d", "kernel_size": 4}, {"name": "layer2",
                                                                    "pool": "avg"}]})
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1
    for expected in ("key 'features.layers[0].name': the model has no layer 'layer9' (did you "
                     "mean layer4, layer3, layer2?); its layers include conv1, bn1, relu",
                     "key 'features.layers[1].pool': cls needs tokens [batch, tokens, dim]; "
                     "layer layer3 gives [batch, 256, 1, 1]",
                     "key 'features.layers[2].kernel_size': 4 is larger than layer layer4's "
                     "map [batch, 512, 1, 1]"):
        assert expected in err
    assert "layers[3]" not in err
    del doc["config"]["optim"]
    doc["config"]["features"] = {"image_size": 16}
    doc["config"]["head"] = {"kind": "knn", "k": [10, 900]}
    doc["stages"]["tune"]["grid"] = {"head.temperature": [0.05, 0.1]}
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1
    assert ("key 'head.k': 900 neighbours asked, but digits's train800 has 800 examples "
            "(in 2 jobs, e.g. p__tune__temperature=0.05)") in err
    assert "train800val200" not in err  # 1000 examples there: the final run is fine


def test_plan_lists_every_problem_at_once(tmp_path: Path, digits_root: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    doc = probe_job(digits_root, head={"kind": "mpl"})
    doc["config"]["optim"]["weight_decy"] = 0.01
    doc["stages"]["test"]["hyperparams"]["data.root"] = str(tmp_path / "nonexistent")
    doc["stages"]["test"]["hyperparams"]["backbone.weights"] = str(tmp_path / "gone.pth")
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1
    for expected in ("key 'head.kind': unknown head kind 'mpl'",
                     "key 'optim.weight_decy': unknown key (did you mean 'weight_decay'?)",
                     "(in 3 jobs, e.g. p__tune__lr=0.1)"):
        assert expected in err
    doc["config"]["head"] = {"kind": "linear"}
    del doc["config"]["optim"]["weight_decy"]
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)  # the schema passes: data, weights
    assert code == 1
    assert f"key 'data.root': data root folder {tmp_path / 'nonexistent'} does not exist" in err
    assert f"key 'backbone.weights': checkpoint file {tmp_path / 'gone.pth'} does not exist" in err
    assert "(in the job p__final__seed=0)" in err


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"dataset": "nosuch"}, "dataset", "dataset folder"),
    ({"backbone": {"name": "resnet51"}}, "backbone.name", "unknown model 'resnet51'"),
    ({"data": {"root": "ROOT", "train_split": "train900"}}, "data.train_split",
     "split file"),
    ({"metric": "top5", "dataset": "three"}, "metric", "top5 needs more than 5 classes"),
])
def test_plan_checks_data_and_backbones(tmp_path: Path, digits_root: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        change: dict[str, Any], key: str, message: str) -> None:
    root = tmp_path / "data"
    (root / "three").mkdir(parents=True)
    (root / "digits").symlink_to(digits_root / "digits")
    for split in ("train800", "val200", "train800val200", "test"):
        (root / "three" / f"{split}.txt").write_text("a.png 0\nb.png 1\nc.png 2\n")
    config = {k: ({**v, "root": str(root)} if k == "data" else v) for k, v in change.items()}
    code, _, err = plan(tmp_path / "p.yaml", probe_job(root, **config), capsys)
    assert code == 1
    assert f"key '{key}': " in err and message in err


def test_plan_warns_about_weights_not_in_the_local_cache(
        tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    doc = probe_job(digits_root, backbone={"name": "resnet18", "weights": "IMAGENET1K_V1"})
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 0  # a warning: a machine with internet access downloads them
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"warning: key 'backbone.weights': ResNet18_Weights.IMAGENET1K_V1 is not in the " \
           f"local cache yet ({cached}); a runner downloads it from download.pytorch.org" in err
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # the plan looks whether it is there, not inside it
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize(("error", "expected"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "ran out of memory"),
    (RuntimeError("CUDA error: unspecified launch failure"), "the device failed"),
    (RuntimeError("Found no NVIDIA driver on your system."), "the device failed"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
    (ValueError("CUDA error"), None),
])
def test_failures_of_the_device_are_told_apart_from_the_jobs(error: BaseException,
                                                            expected: str | None) -> None:
    reason = environment_failure(error)
    assert reason == expected if expected is None else expected in str(reason)


def test_out_of_memory_gives_the_job_back_uncounted_and_stops_the_runner(
        area: WorkArea, digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(probe, "run_linear_probes", out_of_memory)
    queue(area, probe_job(digits_root, stages={"run": {"hyperparams": {}}})
          | {"current_stage": "run"}, "p.yaml")
    assert drain(area) == CANNOT_RUN_EXIT
    (queued,) = area.queued()
    doc = yamlio.load_mapping(queued)
    assert doc["attempts"] == 0  # not counted
    (error,) = doc["errors"]
    assert error["type"] == "RunnerEnvironmentError" and "ran out of memory" in error["message"]
    assert "not counted as an attempt" in error["note"]
    assert area.listing(CRASHED) == [] and area.listing(RUNNING) == []
    # Every runner fails alike: the job is the likelier culprit, and must not stop them all.
    assert drain(area) == CANNOT_RUN_EXIT
    assert len(area.queued()) == 1
    assert drain(area) == CANNOT_RUN_EXIT
    crashed = yamlio.load_mapping(area.folder(CRASHED) / "p.yaml")
    assert "3 runners in a row could not run it" in crashed["error"]["note"]
    assert len(crashed["errors"]) == 2 and area.queued() == []


@pytest.mark.slow
def test_weights_that_cannot_be_fetched_stop_the_runner_at_once(area: WorkArea, tmp_path: Path,
                                                                 digits_root: Path) -> None:
    doc = probe_job(digits_root, stages={"run": {"hyperparams": {}}},
                    backbone={"name": "resnet18", "weights": "IMAGENET1K_V1"})
    queue(area, doc | {"current_stage": "run"}, "p.yaml")
    # A proxy nobody listens on: the download fails at once, internet access or not.
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy":
           "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    started = time.monotonic()
    runner = start_runner(area, "--devices", "cpu", env=env)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == CANNOT_RUN_EXIT, output
    assert time.monotonic() - started < 60  # no retry storm
    assert "cannot fetch the weights ResNet18_Weights.IMAGENET1K_V1 from download.pytorch.org" \
           in output
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(hub) in output and "set backbone.weights to a local checkpoint file" in output
    (queued,) = area.queued()
    assert yamlio.load_mapping(queued)["attempts"] == 0
    assert area.listing(CRASHED) == []


def _tuned(root: Path, **select: Any) -> dict[str, Any]:
    """Learning rate and optimizer swept only in the tuning grid, then select_best and a final
    run whose overrides suit only one optimizer."""
    doc = probe_job(root, stages={
        "tune": {"grid": {"optim.lr": [0.1, 0.01], "optim.name": ["sgd", "adamw"],
                          "seed": [0, 1]}, "child_stage": "train", "next_stage": "select"},
        "train": {"hyperparams": {"kind": "linear_probe"}},
        "select": {"processor": {"kind": "select_best", **select}, "next_stage": "final"},
        "final": {"grid": {"seed": [0]}, "child_stage": "test", "next_stage": "mean"},
        "test": {"hyperparams": {"kind": "linear_probe", "data.eval_split": "test"}},
        "mean": {"processor": "aggregate"}})
    del doc["config"]["optim"]["lr"]
    return doc


def test_plan_checks_the_stages_after_a_selection_once_per_setting(
        tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _tuned(digits_root)
    code, out, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 0, err  # optim.lr is set by the selection, not missing
    assert "checked the 9 runs it would make" in out
    doc["stages"]["test"]["hyperparams"]["optim.momentum"] = 0.5
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1  # momentum is fine with sgd, refused if select_best picks adamw
    assert ("key 'optim.momentum': unknown key: it is read only when optim.name is sgd, not "
            "adamw (in 2 jobs, e.g. p__final__seed=0 (if select selects optim.lr=0.1, "
            "optim.name=adamw))") in err


def test_plan_checks_processor_options_against_the_grids(
        tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _tuned(digits_root, seed_key="sed")
    doc["stages"]["mean"]["processor"] = {"kind": "aggregate", "grid_stage": "fnal"}
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1
    assert ("key 'stages.select.processor.seed_key': 'sed' is not swept by grid stage 'tune' "
            "(did you mean 'seed'?)") in err
    assert ("key 'stages.mean.processor.grid_stage': 'fnal' is not a grid stage this job forks "
            "before it (did you mean 'final'?)") in err


def test_plan_lists_problems_of_every_kind_at_once(
        tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = {"confg": {}, "current_stage": "run", "stages": {
        "run": {"hyperparams": {"kind": "sleep"}, "next_stag": "done"},
        "done": {"processor": "agregate"}}}
    code, _, err = plan(tmp_path / "s.yaml", broken, capsys)
    assert code == 1
    for key in ("confg", "stages.run.next_stag", "stages.done.processor"):
        assert f"key '{key}'" in err
    # A misspelt key does not hide the data: both splits' problems and the rest, together.
    doc = probe_job(digits_root, stages={"run": {"hyperparams": {
        "data.train_split": "train9", "data.eval_split": "val9"}}}) | {"current_stage": "run"}
    doc["config"]["optim"]["weight_decy"] = 0.1
    code, _, err = plan(tmp_path / "p.yaml", doc, capsys)
    assert code == 1
    for key in ("optim.weight_decy", "data.train_split", "data.eval_split"):
        assert f"key '{key}'" in err
