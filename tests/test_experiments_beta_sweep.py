"""β sweep: per network and β the control mask's density and accuracy, the sharing, the Pareto front and the plot."""

from __future__ import annotations

import json

import pytest

from modscope.experiments import beta_sweep, get_experiment
from modscope.experiments.common import ExperimentOptions


def test_paper_grid_spans_the_range_and_holds_the_default():
    betas = beta_sweep.SETTINGS["betas"]
    assert betas[0] == 1e-5 and betas[-1] == 1e-3 and 1e-4 in betas and list(betas) == sorted(betas)
    assert beta_sweep.SETTINGS["sizes"] == ((800,) * 4, (2000,) * 4)


def test_pareto_front_keeps_the_undominated_points():
    pts = [{"density": d, "accuracy": a} for d, a in [(0.1, 0.5), (0.2, 0.9), (0.3, 0.8), (0.4, 0.95), (0.1, 0.4)]]
    assert beta_sweep.pareto(pts) == [True, True, False, True, False]


def test_tiny_sweep_reports_points_and_plots_them(tmp_path):
    tiny = {"sizes": ((16, 8),), "betas": (1e-5, 1e-4, 1e-2), "base_steps": 20, "mask_steps": 5, "n_valid": 100,
            "batch_size": 32}
    report = get_experiment("beta-sweep").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    points = report["runs"][0][0]["points"]
    assert [p["beta"] for p in points] == [1e-5, 1e-4, 1e-2]
    assert all(0 <= p["density"] <= 1 and 0 <= p["accuracy"] <= 1 and 0 <= p["shared"] <= 1 for p in points)
    page = (tmp_path / "beta-sweep.html").read_text()
    assert page.count("<circle") == 3 and "control mask density" in page and "<title>16-8 β=0.0001" in page
    assert json.loads((tmp_path / "beta-sweep.json").read_text())["claims"] == report["claims"]
    assert any("density as β grows" in c["what"] for c in report["claims"])


@pytest.mark.slow
def test_quick_sweep_density_falls_with_beta(tmp_path):
    report = beta_sweep.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    densities = [p["density"] for p in report["runs"][0][0]["points"]]
    assert densities[0] > densities[-1], "a hundred times the penalty must give sparser masks"
