"""The pipelines of pipelines/heads/ end to end on the embedded data: one work area, one runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, drain
from vtab import yamlio
from vtab.results import build_table, load_summaries, one_per_pass, render_text
from vtab.workarea import CRASHED, FINISHED, RUNNING, SUMMARIZED, WAITING, WorkArea

PIPELINES = sorted((REPO / "pipelines" / "heads").glob("*.yaml"))


@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> WorkArea:
    area = WorkArea(tmp_path_factory.mktemp("heads") / "work")
    for pipeline in PIPELINES:
        shutil.copy(pipeline, area.root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VTAB1K_ROOT", str(digits_root))
        env.setenv("VTAB_DEBUG_EPOCHS", "5")
        assert drain(area) == 0
    return area


def summary(area: WorkArea, name: str) -> dict:
    return yamlio.load_mapping(area.folder(SUMMARIZED) / name / "summary.yaml")


def jobs(area: WorkArea, name: str) -> dict[str, dict]:
    return {path.stem: yamlio.load_mapping(path)
            for path in area.summarized_jobs(name).glob("*.yaml")}


@pytest.mark.slow
def test_every_head_pipeline_is_summarized(drained: WorkArea) -> None:
    for folder in (RUNNING, WAITING, FINISHED, CRASHED):
        assert drained.listing(folder) == [], folder
    loaded = load_summaries(drained.folder(SUMMARIZED))
    assert sorted(r.pipeline for r in loaded.results) == sorted(
        f"heads_{p.stem}" for p in PIPELINES)
    for result in loaded.results:
        (score,) = result.scores.values()
        assert score.mean > 0.6, result.pipeline  # ten classes: chance 0.1; pairs: mAP
    table = render_text(build_table(loaded.results))
    assert "heads_svm_multilabel" in table and "map_voc07" in table


@pytest.mark.slow
def test_layers_are_chosen_on_validation_and_forwarded_once(drained: WorkArea) -> None:
    found = jobs(drained, "heads_layers")
    tuning = [j for name, j in found.items() if "__tune__" in name]
    assert len(tuning) == 4
    for job in tuning:
        assert list(job["variants"]) == ["layer2:avg", "layer3:avg", "output"]
        assert job["variants"]["layer2:avg"]["feature_dim"] == 128
        assert "result" not in job  # one result per layer, none for the job as a whole
    digits = summary(drained, "heads_layers")["datasets"]["digits"]
    (layer,) = digits["selected"]["features.layers"]
    assert layer["name"] in ("layer2", "layer3", "output")
    assert len(digits["tuning"]) == 2 * 3  # learning rates x layers, seeds averaged
    final = [j for name, j in found.items() if "__final__" in name]
    assert all(j["run_config"]["features"]["layers"] == [layer] for j in final)
    # Each image at most once for the whole pipeline, three layers or not (the other head
    # pipelines share the cache and may have forwarded some already): of the passes that trained
    # the four tuning jobs, one forwards train800 and val200 for all three layers, the others
    # read the cache.
    assert sum(j["report"]["features"][role]["forwarded"] for j in one_per_pass(tuning + final)
               for role in ("train", "eval")) <= 1797
    assert sorted(j["report"]["features"]["train"]["forwarded"]
                  for j in one_per_pass(tuning))[:-1] == [
        0] * (len(one_per_pass(tuning)) - 1)


@pytest.mark.slow
def test_knn_picks_a_k_and_seedless_heads_run_once(drained: WorkArea) -> None:
    digits = summary(drained, "heads_knn")["datasets"]["digits"]
    (k,) = digits["selected"]["head.k"]
    assert k in (1, 5, 10, 20, 50)
    final = jobs(drained, "heads_knn")["heads_knn__digits"]
    assert final["run_config"]["head"]["k"] == [k]
    assert "seed" not in final["run_config"] and "optim" not in final["run_config"]
    logreg = jobs(drained, "heads_logreg")["heads_logreg__digits"]
    assert logreg["head_info"]["converged"] is True
    assert logreg["run_config"]["head"]["c"] == summary(
        drained, "heads_logreg")["datasets"]["digits"]["selected"]["head.c"]


@pytest.mark.slow
def test_multilabel_svm_reports_voc07_map_and_per_class_ap(drained: WorkArea) -> None:
    job = jobs(drained, "heads_svm_multilabel")["heads_svm_multilabel__digit_pairs"]
    assert job["run_config"]["data"]["task"] == "multi_label"
    assert job["result"] == job["metrics"]["map_voc07"]
    assert set(job["metrics"]) == {"map", "map_voc07", "map_interpolated"}
    assert len(job["per_class"]["ap"]) == 10 and len(job["head_info"]["costs"]) == 10
    outputs = (drained.folder(SUMMARIZED) / "heads_svm_multilabel" / "outputs" /
               "heads_svm_multilabel__digit_pairs" / "test_predictions.csv")
    header, first, *rest = outputs.read_text().splitlines()
    assert header == "id,split,targets,difficult,predicted,correct,top_scores"
    assert len(rest) + 1 == job["report"]["num_eval"]
    assert first.split(",")[0].startswith("images/test/")
