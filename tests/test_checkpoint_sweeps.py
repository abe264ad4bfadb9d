"""Checkpoint sweeps: a grid axis over the files a pattern matches, the step read from each name;
pipelines/workflows/checkpoint_sweep.yaml end to end on the embedded digits, queued twice."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, drain
from vtab import yamlio
from vtab.checkpoints import CheckpointAxis
from vtab.errors import ConfigError
from vtab.pipeline import apply_selection, children_of, prepare_root
from vtab.results import build_table, load_summaries, parse_results, render_text
from vtab.workarea import CRASHED, SUMMARIZED, WorkArea

PIPELINE = REPO / "pipelines" / "workflows" / "checkpoint_sweep.yaml"
CRASHED_EXIT = 4


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"weights")


def test_files_are_found_by_step_with_glob_characters_elsewhere(tmp_path: Path) -> None:
    touch(tmp_path / "run-a", "ckpt_100.pth", "ckpt_20.pth", "ckpt_3.pth", "other_5.pth")
    touch(tmp_path / "run-b", "ckpt_7.pth")
    axis = CheckpointAxis.parse({"checkpoints": f"{tmp_path}/run-[a]/ckpt_{{step}}.pth"}, "g")
    assert axis.find("g") == [(3, f"{tmp_path}/run-a/ckpt_3.pth"),
                              (20, f"{tmp_path}/run-a/ckpt_20.pth"),
                              (100, f"{tmp_path}/run-a/ckpt_100.pth")]
    both = CheckpointAxis.parse({"checkpoints": f"{tmp_path}/run-?/ckpt_{{step}}.pth"}, "g")
    assert [step for step, _ in both.find("g")] == [3, 7, 20, 100]


@pytest.mark.parametrize(("files", "value", "key", "message"), [
    ((), {"checkpoints": "{root}/ckpt_{{step}}.pth"}, "g.x.checkpoints",
     "no file matches '{root}/ckpt_{{step}}.pth'"),
    (("ckpt_10.pth", "ckpt_final.pth"), {"checkpoints": "{root}/ckpt_{{step}}.pth"},
     "g.x.checkpoints", "cannot read a training step from {root}/ckpt_final.pth: 'final'"),
    (("ckpt_10.pth", "ckpt_010.pth"), {"checkpoints": "{root}/ckpt_{{step}}.pth"},
     "g.x.checkpoints", "both hold step 10"),
    ((), {"checkpoints": "{root}/ckpt_*.pth"}, "g.x.checkpoints", "holding {{step}} once"),
    ((), {"checkpoints": "{root}/{{step}}/ckpt_{{step}}.pth"}, "g.x.checkpoints",
     "holding {{step}} once"),
    ((), {"checkpoints": "{root}/c_{{step}}", "every": 2}, "g.x.every",
     "unknown key of a checkpoint axis"),
])
def test_bad_checkpoint_axes_say_what_is_wrong(tmp_path: Path, files: tuple[str, ...],
                                               value: dict[str, Any], key: str,
                                               message: str) -> None:
    touch(tmp_path, *files)
    value = {k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in value.items()}
    with pytest.raises(ConfigError) as info:
        CheckpointAxis.parse(value, "g.x").find("g.x")
    assert info.value.key == key
    assert message.format(root=tmp_path) in info.value.message


def _sweep_root(pattern: str) -> dict[str, Any]:
    return prepare_root({
        "config": {"dataset": "digits", "backbone": {"name": "resnet18"}},
        "current_stage": "checkpoints",
        "stages": {"checkpoints": {"grid": {"backbone.weights": {"checkpoints": pattern}},
                                   "child_stage": "probe", "next_stage": "best"},
                   "probe": {"hyperparams": {"kind": "linear_probe"}},
                   "best": {"processor": "select_best", "next_stage": "datasets"},
                   "datasets": {"grid": {"dataset": ["a", "b"]}, "child_stage": "probe"}},
    }, "p")


def test_a_sweep_labels_its_children_by_step_and_the_selected_step_names_later_jobs(
        tmp_path: Path) -> None:
    touch(tmp_path, "c_0.pth", "c_300.pth")
    root = _sweep_root(f"{tmp_path}/c_{{step}}.pth")
    probes = children_of(root, "checkpoints", 100)
    assert [c["id"] for c in probes] == ["p__checkpoints__step=0", "p__checkpoints__step=300"]
    assert probes[1]["labels"] == {"step": 300}
    assert probes[1]["config"]["backbone"]["weights"] == f"{tmp_path}/c_300.pth"
    apply_selection(root, "checkpoints", {"backbone.weights": f"{tmp_path}/c_300.pth"})
    # Queued again, the sweep may select another step: its jobs must not be taken for these.
    finals = children_of(root, "datasets", 100)
    assert [c["id"] for c in finals] == ["p__step=300__a", "p__step=300__b"]
    assert finals[0]["labels"] == {"step": 300, "dataset": "a"}
    assert finals[0]["config"]["backbone"]["weights"] == f"{tmp_path}/c_300.pth"


def _checkpoints(folder: Path, steps: dict[int, int | None]) -> None:
    """ResNet-18 weights as a pretraining run would leave them: step -> seed of random weights
    (None: a file that is no checkpoint)."""
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    for step, seed in steps.items():
        path = folder / f"checkpoint_{step}.pth"
        if seed is None:
            path.write_bytes(b"half a checkpoint")
            continue
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> dict[str, Any]:
    """The shipped sweep over three checkpoints, then queued again once the run wrote one more
    and a broken one."""
    base = tmp_path_factory.mktemp("sweep")
    area, checkpoints = WorkArea(base / "work"), base / "run"
    _checkpoints(checkpoints, {0: 0, 10: 1, 20: 2})
    first: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VTAB1K_ROOT", str(digits_root))
        env.setenv("VTAB_CHECKPOINTS", str(checkpoints))
        env.setenv("VTAB_DEBUG_EPOCHS", "3")
        shutil.copy(PIPELINE, area.root)
        assert drain(area) == 0
        first["summary"] = summary(area)
        first["jobs"] = jobs(area)
        _checkpoints(checkpoints, {30: 3, 40: None})
        shutil.copy(PIPELINE, area.root)
        assert drain(area) == CRASHED_EXIT  # the broken checkpoint's probe
    return {"area": area, "first": first, "summary": summary(area), "jobs": jobs(area),
            "checkpoints": checkpoints}


def summary(area: WorkArea) -> dict[str, Any]:
    return yamlio.load_mapping(area.folder(SUMMARIZED) / "checkpoint_sweep" / "summary.yaml")


def jobs(area: WorkArea) -> dict[str, dict[str, Any]]:
    return {path.stem: yamlio.load_mapping(path)
            for path in area.summarized_jobs("checkpoint_sweep").glob("*.yaml")}


@pytest.mark.slow
def test_every_checkpoint_is_probed_and_the_best_one_gets_the_full_protocol(
        swept: dict[str, Any]) -> None:
    first = swept["first"]
    sweep = first["summary"]["sweep"]
    assert [point["step"] for point in sweep["points"]] == [0, 10, 20]
    assert sweep["split"] == "val200" and sweep["metric"] == "top1"
    probes = {job["labels"]["step"]: job["result"] for name, job in first["jobs"].items()
              if "__checkpoints__" in name}
    assert [point["mean"] for point in sweep["points"]] == [probes[0], probes[10], probes[20]]
    best = max(probes, key=lambda step: (probes[step], -step))  # ties: the first step
    assert first["summary"]["labels"] == {"step": best}
    assert first["summary"]["backbone"]["weights"].endswith(f"checkpoint_{best}.pth")
    finals = [job for name, job in first["jobs"].items() if "__final__" in name]
    assert len(finals) == 3
    assert all(job["run_config"]["backbone"]["weights"].endswith(f"checkpoint_{best}.pth")
               for job in finals)
    folder = swept["area"].folder(SUMMARIZED) / "checkpoint_sweep"
    assert (folder / "tensorboard" / "sweep").is_dir()


@pytest.mark.slow
def test_queued_again_only_new_checkpoints_are_probed_and_a_broken_one_is_left_out(
        swept: dict[str, Any]) -> None:
    first, again = swept["first"]["jobs"], swept["jobs"]
    for name, job in first.items():  # nothing that finished ran again
        if name != "checkpoint_sweep":
            assert again[name]["finished_at"] == job["finished_at"], name
    assert [point["step"] for point in swept["summary"]["sweep"]["points"]] == [0, 10, 20, 30]
    broken = "checkpoint_sweep__checkpoints__step=40"
    assert swept["summary"]["left_out"] == {"checkpoints": [broken]}
    (crashed,) = swept["area"].listing(CRASHED)
    error = yamlio.load_mapping(crashed)["error"]
    assert error["key"] == "backbone.weights" and "checkpoint_40.pth" in error["message"]


@pytest.mark.slow
def test_the_table_names_the_step_and_the_sweep_is_plotted_and_logged(
        swept: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = swept["area"].folder(SUMMARIZED)
    step = swept["summary"]["labels"]["step"]
    text = render_text(build_table(load_summaries(root).results))
    assert f"checkpoint_sweep [step={step}]" in text
    png, events = tmp_path / "steps.png", tmp_path / "run_logs"
    assert parse_results(root, steps_path=png, tensorboard_dir=events) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events / "vtab_checkpoint_sweep"))
    logged.Reload()
    scalars = logged.Scalars("top1/val200")
    assert [(s.step, pytest.approx(s.value)) for s in scalars] == [
        (p["step"], p["mean"]) for p in swept["summary"]["sweep"]["points"]]
    capsys.readouterr()


def test_plotting_steps_of_pipelines_without_a_sweep_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain").mkdir()
    yamlio.write_mapping(tmp_path / "plain" / "summary.yaml",
                         {"datasets": {"digits": {"result": 0.9}}, "metric": "top1"})
    assert parse_results(tmp_path, steps_path=tmp_path / "s.png") == 1
    assert "no checkpoint sweep among the pipelines read (plain)" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_the_example_run_starts_from_the_random_backbone_and_learns(digits_root: Path,
                                                                   tmp_path: Path) -> None:
    import torch

    from vtab.evaluation.backbones import RANDOM_ID, BackboneSpec, build_backbone, resolve_backbone
    from vtab.evaluation.pretrain import pretrain_digits
    from vtab.evaluation.schemas import BackboneConfig

    written = pretrain_digits(digits_root, tmp_path, steps=[3, 0], progress=False)
    assert [p.name for p in written] == ["checkpoint_0.pth", "checkpoint_3.pth"]
    random = build_backbone(BackboneSpec("torchvision", "resnet18", RANDOM_ID, 224)).model
    start, later = (build_backbone(resolve_backbone(BackboneConfig(
        name="resnet18", weights=str(path)))).model for path in written)
    weights = {name: [m.state_dict()[name] for m in (random, start, later)]
               for name in ("conv1.weight", "layer4.1.bn2.running_mean")}
    for before, loaded, trained in weights.values():
        assert torch.equal(before, loaded)  # step 0 is `backbone.weights: none`
        assert not torch.allclose(loaded, trained)


def test_a_sweep_reads_nan_runs_and_selects_as_its_mode_says() -> None:
    from vtab.results import parse_sweep, sweep_scalars

    points = [{"step": 0, "mean": 0.4, "std": 0.0, "n": 1},
              {"step": 10, "mean": float("nan"), "std": float("nan"), "n": 1},
              {"step": 20, "mean": 0.2, "std": 0.0, "n": 1}]
    for mode, step in (("max", 0), ("min", 20)):
        sweep = parse_sweep({"sweep": {"metric": "loss", "split": "val200", "mode": mode,
                                       "points": points}}, "p")
        assert sweep is not None and sweep.best() is not None and sweep.best().step == step
    assert [step for _, _, step in sweep_scalars(sweep)] == [0, 20]  # no NaN event


def test_written_again_a_run_holds_only_the_latest_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vtab.events import write_scalars

    write_scalars(tmp_path, [("top1/val200", 0.5, 0), ("top1/val200", 0.6, 10)])
    write_scalars(tmp_path, [("top1/val200", 0.5, 0), ("top1/val200", 0.6, 10),
                             ("top1/val200", 0.7, 20)])
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    logged = EventAccumulator(str(tmp_path))
    logged.Reload()
    assert [s.step for s in logged.Scalars("top1/val200")] == [0, 10, 20]
