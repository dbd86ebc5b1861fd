"""boundary.png's content (the plotted points per kind) and the metric plots' data."""

from __future__ import annotations

import pytest

from npos.sweep.plots import PAPER, boundary_data, clip_setting, draw_boundary, plot_metric

SETTING = {"method": "npos", "k": 10, "select": 20, "pick": 2, "candidates": 20, "keep": 2,
           "sigma": 0.05, "noise_space": "sphere", "queue": 50}


@pytest.mark.parametrize("classes", [(0,), (1, 3)])
def test_boundary_counts_per_kind(world, tmp_path, classes):
    data = boundary_data(world["train"], SETTING, classes=classes, seed=0)
    n = len(classes)
    expected = {"id": 50 * n, "boundary": 20 * n, "kept": 2 * 2 * n, "rejected": 2 * 18 * n}
    assert {k: len(data[k]) for k in expected} == expected
    assert all(data[k].shape[1] == 2 for k in expected)
    counts = draw_boundary({"best": data}, tmp_path / "boundary.png")
    assert counts == {"best": expected}
    assert (tmp_path / "boundary.png").stat().st_size > 0


def test_paper_setting_is_clipped_to_the_data_and_rejected_thinned(world, tmp_path):
    assert clip_setting(PAPER, 60) == {**PAPER, "queue": 60, "k": 59, "select": 60}
    data = boundary_data(world["train"], PAPER, classes=(0,))
    assert len(data["rejected"]) == 3 * 1498 and len(data["kept"]) == 6
    counts = draw_boundary({"paper": data, "gaussian": boundary_data(
        world["train"], {**SETTING, "method": "gaussian"})}, tmp_path / "b.png",
        max_rejected=1000)
    assert counts["paper"] == {"id": 60, "boundary": 60, "kept": 6, "rejected": 1000}
    assert counts["gaussian"] == {"id": 50, "boundary": 0, "kept": 4, "rejected": 0}


def test_metric_plot_lines(tmp_path):
    rows = [{"kind": "point", "sigma": s, "k": k, "head/average/auroc_mean": s * 10 + k}
            for s in (0.01, 0.05) for k in (5, 10)]
    rows.append({"kind": "baseline", "point_id": "frozen-knn", "knn/average/auroc_mean": 9.0})
    data = plot_metric(rows, ["sigma", "k"], "head/average/auroc", tmp_path)
    assert data["sigma"] == {"k=5": [(0.01, 5.1), (0.05, 5.5)],
                             "k=10": [(0.01, 10.1), (0.05, 10.5)]}
    assert data["k"]["sigma=0.01"] == [(5, 5.1), (10, 10.1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "sigma.png"]
