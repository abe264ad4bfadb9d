"""Results tables: column order, group means, missing datasets, formats, bad input, the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vtab import yamlio
from vtab.results import (
    build_table,
    compact_setting,
    load_summaries,
    parse_results,
    render_markdown,
    render_text,
)
from vtab.vtab1k import VTAB1K_DATASETS, VTAB1K_GROUPS

REPO = Path(__file__).resolve().parents[1]
FULL, PARTIAL, DEBUG = "vtab1k_linear_full", "vtab1k_linear_partial", "debug_digits"
DROPPED = ("svhn", "dmlab", "kitti")
AGGREGATE_NAMES = ("natural", "specialized", "structured", "mean")


def full_value(i: int) -> float:
    # Uneven values, so the 19-task mean differs from the mean of the three group means.
    return round(0.30 + 0.02 * i + 0.001 * i * i, 6)


def partial_value(i: int) -> float:
    return round(0.25 + 0.017 * i, 6)


def write_summary(root: Path, pipeline: str, results: dict[str, float], **extra: Any) -> Path:
    datasets = {name: {"result": value, "std": 0.005,
                       "seeds": {0: value - 0.005, 1: value + 0.005},
                       "selected": {"optim.lr": 0.01, "optim.weight_decay": 0.0}}
                for name, value in results.items()}
    summary = {"pipeline": pipeline, "finished_at": "2026-11-23T20:11:05+00:00", "metric": "top1",
               "backbone": {"name": "resnet50", "weights": "IMAGENET1K_V2",
                            "source": "torchvision"},
               "datasets": datasets, **extra}
    folder = root / pipeline
    (folder / "jobs").mkdir(parents=True)
    (folder / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return folder / "summary.yaml"


FULL_RESULTS = {name: full_value(i) for i, name in enumerate(VTAB1K_DATASETS)}
PARTIAL_RESULTS = {name: partial_value(i) for i, name in enumerate(VTAB1K_DATASETS)
                   if name not in DROPPED}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "summarized"
    write_summary(root, FULL, FULL_RESULTS)
    write_summary(root, PARTIAL, PARTIAL_RESULTS)
    write_summary(root, DEBUG, {"digits": 0.95})
    assert load_summaries(root).problems == []
    return root


def table_cells(text: str) -> dict[str, dict[str, str]]:
    """The terminal table as {row label: {column header: cell}} (columns are 2+ spaces apart)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pipeline"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def markdown_cells(text: str) -> dict[str, dict[str, str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    assert set(rows[1]) <= {"---", "---:"}
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows[2:]}


def pct(value: float, std: float = 0.005) -> str:
    return f"{value * 100:.1f}±{std * 100:.1f}"


def test_vtab1k_groups_and_order() -> None:
    assert [len(members) for members in VTAB1K_GROUPS.values()] == [7, 4, 8]
    assert len(set(VTAB1K_DATASETS)) == 19
    assert VTAB1K_DATASETS[0] == "caltech101"
    assert VTAB1K_DATASETS[7] == "patch_camelyon"
    assert VTAB1K_DATASETS[-1] == "smallnorb_ele"


def test_column_order_puts_vtab_first_then_others_then_means(root: Path) -> None:
    write_summary(root, "extra", {"aaa_custom": 0.5, "zzz_custom": 0.6})
    table = build_table(load_summaries(root).results)
    assert table.datasets == (*VTAB1K_DATASETS, "aaa_custom", "digits", "zzz_custom")
    assert table.aggregates == AGGREGATE_NAMES
    assert [row.result.pipeline for row in table.rows] == [DEBUG, "extra", FULL, PARTIAL]
    header = render_text(table).splitlines()[2].split()
    assert header == ["pipeline", "backbone", "metric", *table.datasets, *AGGREGATE_NAMES]


def test_no_vtab_columns_without_vtab_data(tmp_path: Path) -> None:
    write_summary(tmp_path, DEBUG, {"digits": 0.95})
    table = build_table(load_summaries(tmp_path).results)
    assert table.datasets == ("digits",)
    assert table.aggregates == ()
    assert "missing" not in render_text(table)


def test_group_means_of_complete_row_match_hand_computed_values(root: Path) -> None:
    row = next(row for row in build_table(load_summaries(root).results).rows
               if row.result.pipeline == FULL)
    values = [full_value(i) for i in range(19)]
    natural, specialized, structured = sum(values[:7]) / 7, sum(values[7:11]) / 4, \
        sum(values[11:]) / 8
    assert row.aggregates["natural"] == pytest.approx(natural)
    assert row.aggregates["specialized"] == pytest.approx(specialized)
    assert row.aggregates["structured"] == pytest.approx(structured)
    # The 19-task mean is over datasets, not over the three groups.
    assert row.aggregates["mean"] == pytest.approx(sum(values) / 19)
    assert not math.isclose(row.aggregates["mean"], (natural + specialized + structured) / 3,
                            rel_tol=1e-4)
    assert row.missing == ()
    cells = table_cells(render_text(build_table(load_summaries(root).results)))[FULL]
    assert cells["natural"] == f"{natural * 100:.1f}"
    assert cells["mean"] == f"{sum(values) / 19 * 100:.1f}"


def test_partial_row_keeps_columns_and_leaves_incomplete_groups_out(root: Path) -> None:
    table = build_table(load_summaries(root).results)
    row = next(row for row in table.rows if row.result.pipeline == PARTIAL)
    assert row.missing == ("dmlab", "kitti", "svhn")
    assert row.aggregates["natural"] is None  # svhn missing
    assert row.aggregates["structured"] is None  # dmlab, kitti missing
    assert row.aggregates["mean"] is None
    assert row.aggregates["specialized"] == pytest.approx(
        sum(PARTIAL_RESULTS[name] for name in VTAB1K_GROUPS["specialized"]) / 4)

    text = render_text(table)
    cells = table_cells(text)[PARTIAL]
    for name in DROPPED:
        assert cells[name] == "-"
    # Each value sits under its own header: nothing shifted into the gaps.
    for name, value in PARTIAL_RESULTS.items():
        assert cells[name] == pct(value), name
    assert [cells[name] for name in ("natural", "structured", "mean")] == ["-", "-", "-"]
    assert f"{PARTIAL}: missing 3 of 19: dmlab, kitti, svhn" in text
    assert f"{DEBUG}: no VTAB-1K dataset (19 of 19 missing)" in text
    assert f"{FULL}: missing" not in text
    assert table_cells(text)[DEBUG]["digits"] == pct(0.95)


def test_no_std_and_selected_hyperparameters(root: Path) -> None:
    text = render_text(build_table(load_summaries(root).results), show_std=False)
    assert "±" not in text
    assert table_cells(text)[FULL]["caltech101"] == f"{full_value(0) * 100:.1f}"
    assert re.search(r"^ {4}caltech101 +lr=0\.01 wd=0$", text, re.MULTILINE)


def test_compact_setting_shortens_keys_unless_ambiguous() -> None:
    assert compact_setting({"optim.lr": 0.01, "optim.weight_decay": 0.0}) == "lr=0.01 wd=0"
    assert compact_setting({"head.dropout": 0.1, "backbone.dropout": 0.0, "epochs": 10}) == \
        "head.dropout=0.1 backbone.dropout=0 epochs=10"
    layer = {"name": "layer3", "pool": "avgpool2d", "kernel_size": 2, "stride": None,
             "padding": 0}
    assert compact_setting({"features.layers": [layer], "head.k": [20]}) == \
        "layers=layer3:avgpool2d(kernel_size=2,padding=0) k=20"


def test_a_summary_with_variants_gives_a_row_per_variant(tmp_path: Path) -> None:
    entry = {"variants": {"layer3:avg": {"result": 0.5, "std": 0.1, "metrics": {}},
                          "output": {"result": 0.75, "std": 0.0, "metrics": {}}},
             "evaluated_on": {"split": "test", "metric": "top1"}}
    folder = tmp_path / "layers"
    folder.mkdir()
    yamlio.write_mapping(folder / "summary.yaml", {
        "pipeline": "layers", "metric": "top1", "split": "test", "backbone": {"name": "r"},
        "datasets": {"cifar": entry, "dtd": {**entry, "variants": {
            "output": {"result": 0.25, "std": 0.0}}}}})
    rows = {r.pipeline: {d: s.mean for d, s in r.scores.items()}
            for r in load_summaries(tmp_path).results}
    assert rows == {"layers [layer3:avg]": {"cifar": 0.5},
                    "layers [output]": {"cifar": 0.75, "dtd": 0.25}}


def test_transpose_puts_datasets_in_rows(root: Path) -> None:
    table = build_table(load_summaries(root, "vtab1k_*").results)
    cells = table_cells(render_text(table, transpose=True))
    assert list(cells) == ["backbone", "metric", *VTAB1K_DATASETS, *AGGREGATE_NAMES]
    assert cells["svhn"] == {"pipeline": "svhn", FULL: pct(FULL_RESULTS["svhn"]), PARTIAL: "-"}
    md = markdown_cells(render_markdown(table, transpose=True))
    assert md["kitti"][FULL] == pct(FULL_RESULTS["kitti"])
    assert md["kitti"][PARTIAL] == "-"


def test_filter_pattern_selects_pipelines(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_summaries(root, "vtab1k_*")
    assert sorted(result.pipeline for result in loaded.results) == [FULL, PARTIAL]
    assert parse_results(root, "*_partial") == 0
    assert list(table_cells(capsys.readouterr().out)) == [PARTIAL]
    assert parse_results(root, "nothing_*") == 1
    err = capsys.readouterr().err
    assert str(root) in err and "'nothing_*'" in err


def test_csv_json_markdown_files(root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert parse_results(root, csv_path=out / "t.csv", json_path=out / "t.json",
                         markdown_path=out / "t.md") == 0
    capsys.readouterr()

    rows = {row["pipeline"]: row for row in csv.DictReader((out / "t.csv").open())}
    assert set(rows) == {FULL, PARTIAL, DEBUG}
    assert float(rows[FULL]["dtd_pct"]) == pytest.approx(FULL_RESULTS["dtd"] * 100, abs=1e-9)
    assert float(rows[FULL]["dtd_std_pct"]) == pytest.approx(0.5)
    assert float(rows[FULL]["mean_pct"]) == pytest.approx(sum(FULL_RESULTS.values()) / 19 * 100)
    assert rows[PARTIAL]["svhn_pct"] == rows[PARTIAL]["svhn_std_pct"] == ""
    assert rows[PARTIAL]["natural_pct"] == ""
    assert float(rows[PARTIAL]["sun397_pct"]) == pytest.approx(PARTIAL_RESULTS["sun397"] * 100)
    assert rows[PARTIAL]["missing"] == "dmlab;kitti;svhn"
    assert rows[DEBUG]["digits_pct"] == "95.0"
    assert rows[FULL]["backbone"] == "resnet50" and rows[FULL]["weights"] == "IMAGENET1K_V2"

    document = json.loads((out / "t.json").read_text())
    assert document["unit"] == "percent"
    assert document["datasets"] == [*VTAB1K_DATASETS, "digits"]
    assert document["aggregates"]["specialized"] == list(VTAB1K_GROUPS["specialized"])
    by_name = {row["pipeline"]: row for row in document["rows"]}
    partial = by_name[PARTIAL]
    assert partial["missing"] == ["dmlab", "kitti", "svhn"]
    assert "svhn" not in partial["results"]
    assert partial["results"]["cifar"] == {"mean": pytest.approx(PARTIAL_RESULTS["cifar"] * 100),
                                           "std": pytest.approx(0.5)}
    assert partial["aggregates"]["natural"] is None
    assert by_name[FULL]["aggregates"]["structured"] == pytest.approx(
        sum(FULL_RESULTS[name] for name in VTAB1K_GROUPS["structured"]) / 8 * 100)
    assert by_name[FULL]["selected"]["caltech101"] == {"optim.lr": 0.01,
                                                        "optim.weight_decay": 0.0}
    assert by_name[DEBUG]["backbone"]["source"] == "torchvision"

    markdown = (out / "t.md").read_text()
    md = markdown_cells(markdown)
    assert md[PARTIAL]["dmlab"] == "-"
    assert md[PARTIAL]["eurosat"] == pct(PARTIAL_RESULTS["eurosat"])
    assert md[FULL]["specialized"] == table_cells(render_text(
        build_table(load_summaries(root).results)))[FULL]["specialized"]
    assert f"- {PARTIAL}: missing 3 of 19: dmlab, kitti, svhn" in markdown
    assert "  - caltech101 `lr=0.01 wd=0`" in markdown


def test_optional_keys_may_be_absent(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "summary.yaml").write_text("datasets: {cifar: {result: 0.9}, dtd: {result: 1}}\n")
    text = render_text(build_table(load_summaries(tmp_path).results))
    empty = {name: "-" for name in (*VTAB1K_DATASETS, *AGGREGATE_NAMES)}
    assert table_cells(text)["bare"] == {"pipeline": "bare", "backbone": "-", "metric": "-",
                                         **empty, "cifar": "90.0", "dtd": "100.0"}
    assert "selected hyperparameters" not in text


@pytest.mark.parametrize(("content", "expected"), [
    ("datasets: [unclosed\n", "invalid YAML"),
    ("- a list\n", "expected a mapping"),
    ("metric: top1\n", "key 'datasets': is required but missing"),
    ("datasets: {cifar: {result: high}}\n", "key 'datasets.cifar.result'"),
    ("datasets: {cifar: {result: 91.3}}\n", "key 'datasets.cifar.result'"),
    ("datasets: {cifar: {result: 0.9, std: -1}}\n", "key 'datasets.cifar.std'"),
    ("datasets: {cifar: [0.9]}\n", "key 'datasets.cifar'"),
    ("datasets: {cifar: {result: 0.9}}\nbackbone: resnet50\n", "key 'backbone'"),
    ("datasets: {cifar: {result: 0.9, selected: 3}}\n", "key 'datasets.cifar.selected'"),
])
def test_malformed_summary_is_reported_and_skipped(root: Path, content: str, expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = root / "bad_pipeline" / "summary.yaml"
    bad.parent.mkdir()
    bad.write_text(content)
    assert parse_results(root) == 0
    captured = capsys.readouterr()
    assert str(bad) in captured.err
    assert expected in captured.err
    assert "bad_pipeline" not in table_cells(captured.out)
    assert set(table_cells(captured.out)) == {FULL, PARTIAL, DEBUG}


def test_only_malformed_summaries_exit_1(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.yaml").write_text("datasets: 3\n")
    assert parse_results(tmp_path) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "1 malformed" in err


def test_missing_or_empty_root_exits_1_naming_the_root(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert parse_results(missing) == 1
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert parse_results(empty) == 1
    assert f"no summaries under {empty}" in capsys.readouterr().err


def test_unsummarized_pipelines_are_named(tmp_path: Path, root: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    only_pending = tmp_path / "pending_only"
    (only_pending / "vtab1k_running" / "jobs").mkdir(parents=True)
    assert parse_results(only_pending) == 1
    err = capsys.readouterr().err
    assert "not summarized yet" in err and "vtab1k_running" in err and str(only_pending) in err

    (root / "vtab1k_later").mkdir()
    assert parse_results(root) == 0
    assert "not summarized yet (no summary.yaml): vtab1k_later" in capsys.readouterr().err


def test_command_line(root: Path, tmp_path: Path) -> None:
    script = str(REPO / "main_parse_results.py")
    out_json = tmp_path / "cli.json"
    done = subprocess.run([sys.executable, script, "--root", str(root), "--filter", "vtab1k_*",
                           "--json", str(out_json), "--no_std"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert set(table_cells(done.stdout)) == {FULL, PARTIAL}
    assert "±" not in done.stdout
    assert [row["pipeline"] for row in json.loads(out_json.read_text())["rows"]] == [FULL, PARTIAL]

    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                               text=True, cwd=REPO, timeout=60, check=True).stdout
    for option in ("--root", "--filter", "--csv", "--json", "--markdown", "--no_std",
                   "--transpose"):
        assert option in help_text


def test_the_caption_says_what_the_summaries_record(tmp_path: Path) -> None:
    write_summary(tmp_path, "a", {"dtd": 0.5}, split="val200")

    def caption() -> str:
        return render_text(build_table(load_summaries(tmp_path).results)).splitlines()[0]

    assert "mean±std over seeds of top1 on val200. " in caption()
    write_summary(tmp_path, "b", {"dtd": 0.6}, metric="macro_f1", split="test")
    write_summary(tmp_path, "c", {"dtd": 0.7}, metric="macro_f1")  # an older summary
    assert ("of each pipeline's metric (column 'metric') on each pipeline's evaluation split "
            "(a: val200, b: test, c: not recorded). ") in caption()


def test_the_selection_note_says_how_settings_were_chosen(tmp_path: Path) -> None:
    path = write_summary(tmp_path, "a", {"dtd": 0.5})

    def text() -> str:
        return render_text(build_table(load_summaries(tmp_path).results))

    assert "selected hyperparameters (chosen during tuning; the summaries do not record on " \
           "which split):" in text()
    summary = yaml.safe_load(path.read_text())
    summary["datasets"]["dtd"]["selected_on"] = {"split": "val200", "metric": "top1"}
    path.write_text(yaml.safe_dump(summary))
    assert "selected hyperparameters (chosen by the best mean top1 on val200):" in text()


def test_a_std_of_one_seed_is_not_shown(tmp_path: Path) -> None:
    root = tmp_path / "summarized"
    path = write_summary(root, "one_seed", {"digits": 0.9})
    summary = yaml.safe_load(path.read_text())
    summary["datasets"]["digits"].update(seeds={0: 0.9}, std=0.0)
    path.write_text(yaml.safe_dump(summary))
    text = render_text(build_table(load_summaries(root).results))
    assert "90.0" in text and "±" not in text.split("\n\n")[1]


def test_a_summary_of_a_grid_keeps_a_row_per_point_with_readable_labels(tmp_path: Path) -> None:
    from tests.conftest import drain, queue
    from vtab.workarea import SUMMARIZED, WorkArea

    area = WorkArea(tmp_path / "work")
    queue(area, {"name": "grid", "current_stage": "points", "config": {"metric": "top1"},
                 "stages": {"points": {"grid": {"dataset": ["a", "b"],
                                                "sleep.result": [0.25, 0.75]},
                                       "child_stage": "run", "next_stage": "summarize"},
                            "run": {"hyperparams": {"kind": "sleep"}},
                            "summarize": {"processor": "summarize"}}})
    assert drain(area) == 0
    summary = yamlio.load_mapping(area.folder(SUMMARIZED) / "grid" / "summary.yaml")
    assert [row["labels"] for row in summary["rows"]] == [{"sleep.result": 0.25},
                                                          {"sleep.result": 0.75}]
    assert {name: entry["result"] for name, entry in summary["rows"][1]["datasets"].items()} \
        == {"a": 0.75, "b": 0.75}
    table = build_table(load_summaries(area.folder(SUMMARIZED)).results)
    rows = {row.result.pipeline: {k: s.mean for k, s in row.result.scores.items()}
            for row in table.rows}
    assert rows == {"grid [sleep.result=0.25]": {"a": 0.25, "b": 0.25},
                    "grid [sleep.result=0.75]": {"a": 0.75, "b": 0.75}}
    assert "25.0±" not in render_text(table)  # no std where no seeds were averaged


@pytest.mark.slow
def test_the_backbones_pipeline_has_a_row_per_backbone(digits_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import drain_shipped
    from vtab.workarea import SUMMARIZED

    area, code = drain_shipped(tmp_path / "work", "workflows/backbones.yaml", digits_root,
                               monkeypatch, epochs=2)
    assert code == 0
    loaded = load_summaries(area.folder(SUMMARIZED))
    assert loaded.problems == []  # seeds keyed by number, inside rows too
    table = build_table(loaded.results)
    rows = {row.result.pipeline: row.result for row in table.rows}
    assert sorted(rows) == ["backbones [backbone.name=resnet18]",
                            "backbones [backbone.name=resnet34]"]
    for name, result in rows.items():
        assert result.backbone_label == f"{name.split('=')[1][:-1]} (none)"
        assert sorted(result.scores) == ["digits", "digits_folders"]
        assert all(score.std is not None for score in result.scores.values())  # 3 seeds
