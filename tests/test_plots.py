"""main_parse_results.py --plot: the per-dataset comparison as a PNG, and its refusals."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_results import FULL, PARTIAL, root  # noqa: F401  (the fixture)
from vtab.results import build_table, load_summaries, parse_results

pytest.importorskip("matplotlib")


def test_the_plot_shows_every_pipeline_and_group(root: Path, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "plots" / "vtab.png"
    assert parse_results(root, "vtab1k_*", plot_path=path) == 0
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    # Two pipelines: bars in two colours besides the white background and the black text.
    colours = {tuple(np.round(p[:3], 2)) for p in pixels.reshape(-1, pixels.shape[2])}
    assert len(colours) > 10


def test_pipelines_without_a_common_dataset_are_refused(root: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "none.png"
    assert parse_results(root, "*", plot_path=path) == 1  # debug_digits shares nothing
    assert "have no dataset in common" in capsys.readouterr().err
    assert not path.exists()


def test_missing_matplotlib_is_a_clear_message(root: Path, tmp_path: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def without_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    from vtab.errors import VtabError
    from vtab.plots import plot_table

    table = build_table(load_summaries(root, "vtab1k_*").results)
    with pytest.raises(VtabError, match=r"pip install 'vtab\[plots\]'"):
        plot_table(table, tmp_path / "x.png")
    assert {row.result.pipeline for row in table.rows} == {FULL, PARTIAL}
