"""addmul-sizes: the report holds the sharing per network size, and the claim compares them in order."""

from __future__ import annotations

import json

import pytest

from modscope.experiments import addmul_sizes, get_experiment
from modscope.experiments.common import ExperimentOptions


def test_paper_sizes_are_small_medium_big_huge():
    assert addmul_sizes.SETTINGS["sizes"] == ((400, 400, 200), (800,) * 4, (2000,) * 4, (4000,) * 4)
    assert addmul_sizes.SETTINGS["beta"] == 1e-4 and addmul_sizes.SETTINGS["mask_steps"] == 20_000


def test_tiny_run_reports_sharing_per_size(tmp_path):
    tiny = {"sizes": ((8,), (16,), (32, 32)), "base_steps": 10, "mask_steps": 3, "n_valid": 100, "batch_size": 32}
    report = get_experiment("addmul-sizes").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    assert [runs[0]["hidden"] for runs in report["runs"]] == [[8], [16], [32, 32]]
    run = report["runs"][2][0]
    assert 0 <= run["shared"] <= 1 and 0 <= run["shared_chance"] <= 1
    assert run["n_weights"] == 42 * 32 + 32 * 32 + 32 * 20  # weights only: the paper leaves biases unmasked
    assert set(run["accuracy"]["mask"]) == {"add", "mul"}
    assert report["claims"][0]["paper"] == "falls as the network grows"
    assert report["claims"][0]["criterion"].startswith("the paper's words")
    assert report["preset"].startswith("full run: differs from the paper's settings in: ")
    assert "sizes 8/16/32x2 (paper 400-400-200/800x4/2000x4/4000x4)" in report["preset"]
    assert json.loads((tmp_path / "addmul-sizes.json").read_text())["claims"] == report["claims"]


def test_claim_holds_only_for_a_strict_decrease():
    def runs(values):
        return [[{"shared": v}] for v in values]

    assert addmul_sizes.claims(runs([0.6, 0.5, 0.4]))[0].holds is True
    assert addmul_sizes.claims(runs([0.6, 0.7, 0.4]))[0].holds is False


@pytest.mark.slow
def test_quick_preset_runs_three_sizes(tmp_path):
    report = addmul_sizes.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    assert len(report["runs"]) == 3 and all(r[0]["accuracy"]["mask"]["add"] > 0.5 for r in report["runs"])
