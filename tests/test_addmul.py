"""The add/mul experiment: data, model, report contents; the quick preset's guarantees (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modscope.experiments import addmul, get_experiment
from modscope.experiments.addmul import encode, targets
from modscope.experiments.common import ExperimentOptions
from modscope.model import Model
from modscope.tasks import Task


def test_encoding_is_little_endian_one_hot():
    x = addmul.encode(np.array([47]), np.array([5]), np.array([1]))
    assert x.shape == (1, 42) and x.sum() == 5
    assert np.flatnonzero(x[0]).tolist() == [7, 14, 25, 30, 41]  # 7, 4, 5, 0 (digits), op × at 40 + 1
    assert addmul.targets(np.array([47]), np.array([5]), np.array([1])).tolist() == [[5, 3]]  # 235 mod 100 = 35
    assert addmul.targets(np.array([99]), np.array([3]), np.array([0])).tolist() == [[2, 0]]  # 102 mod 100 = 2


def test_training_tasks_cover_every_combination_once():
    train, valid = addmul.make_tasks(n_valid=100)
    assert len(train["control"]) == 20_000 and len(train["add"]) == len(train["mul"]) == 10_000
    assert torch.all(train["add"].inputs[0][:, 40] == 1) and torch.all(train["mul"].inputs[0][:, 41] == 1)
    assert len(valid["iid"]) == 100 and len(valid["add"]) + len(valid["mul"]) == 100


def test_network_reads_two_digits():
    net = addmul.AddMulNet((16, 8))
    assert net(torch.zeros(3, 42)).shape == (3, 2, 10)


def test_tiny_run_reports_every_claimed_quantity(tmp_path):
    tiny = {"hidden": (32, 16), "base_steps": 30, "mask_steps": 10, "n_valid": 200, "batch_size": 32}
    report = get_experiment("addmul").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    run = report["runs"][0]
    assert set(run["accuracy"]) == {"full", "control", "add", "mul", "not_control", "not_add", "not_mul"}
    assert all(set(v) == {"add", "mul"} for v in run["accuracy"].values())
    assert set(run["sharing"]["per_layer"]) == set(run["layers"]) == {"layers.0", "layers.2", "layers.4"}
    assert len(run["iou"]["per_layer"]["layers.0"]) == 2
    assert any("also used by ×" in c["what"] for c in report["claims"])
    saved = json.loads((tmp_path / "addmul.json").read_text())
    assert saved["claims"] == report["claims"]
    assert (tmp_path / "addmul.html").read_text().count("<pre>") == 6  # settings, four tables, claims
    assert set(run["op_confusion"]) == {"full", "not_add", "not_mul"}
    assert np.asarray(run["op_confusion"]["full"]).shape == (2, 3)
    assert set(run["half_mask_drop"]) == {"early", "late"}
    judged = [c for c in report["claims"] if c["holds"] is not None]
    assert judged and all(c["criterion"].startswith(("modscope's criterion: ", "the paper's words: ")) for c in judged)


def test_defaults_are_the_papers_figure_settings():
    from modscope.experiments import addmul

    assert addmul.SETTINGS["hidden"] == (2000,) * 4  # the net of the paper's add/mul tables and figures
    assert addmul.SETTINGS["mask_steps"] == addmul.SETTINGS["base_steps"] == 20_000
    assert addmul.SETTINGS["beta"] == 1e-4 and addmul.SETTINGS["mask_lr"] == 1e-2


def test_quick_preset_says_how_it_differs_from_the_paper():
    from modscope.experiments import addmul
    from modscope.experiments.common import resolve_settings

    settings = resolve_settings(addmul.SETTINGS, addmul.QUICK, ExperimentOptions(quick=True))
    assert settings.describe().startswith("differs from the paper's settings in: hidden 400-400-200 (paper 2000x4)")
    assert "mask_steps 1,500 (paper 20,000)" in settings.describe()
    assert resolve_settings(addmul.SETTINGS, addmul.QUICK, ExperimentOptions()).describe() == "the paper's settings"


@pytest.mark.slow
def test_quick_preset_shows_what_the_method_must_do(tmp_path):
    report = addmul.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    acc = report["runs"][0]["accuracy"]
    for op in ("add", "mul"):
        assert acc[op][op] >= 0.9 * acc["full"][op], f"the {op} mask must keep its task"
        assert acc[f"not_{op}"][op] < 0.1, f"removing the {op} mask must break its task"


def test_op_confusion_counts_sum_product_and_neither():
    from modscope.experiments.addmul import op_confusion

    class Oracle(torch.nn.Module):
        """Predicts a + b for every example, whatever the operation."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            d = [x[:, 10 * s: 10 * s + 10].argmax(1) for s in range(4)]
            r = (d[0] + 10 * d[1] + d[2] + 10 * d[3]) % 100
            return torch.nn.functional.one_hot(torch.stack([r % 10, r // 10], 1), 10).float() * self.w

    a, b, op = np.array([3, 2, 7]), np.array([4, 2, 1]), np.array([0, 1, 1])
    task = Task("t", encode(a, b, op), targets(a, b, op))
    table = op_confusion(Model(Oracle()), task)
    np.testing.assert_allclose(table[0], [100, 0, 0])  # 3 + 4: the sum, not the product (12)
    np.testing.assert_allclose(table[1], [100, 50, 0])  # 2 × 2 = 2 + 2 counts for both; 7 × 1 != 7 + 1


def test_half_masks_split_the_layers_in_model_order():
    from modscope.experiments.addmul import AddMulNet, half_masks
    from modscope.masks.maskset import Mask

    model = Model(AddMulNet((8, 8, 8, 8)))
    names = [w.name for w in model.weights if w.kind == "weight"]
    control = Mask({n: torch.zeros(dict(model.module.named_parameters())[n].shape, dtype=torch.bool) for n in names})
    halves = half_masks(model, control)
    assert [n for n in names if not halves["early"][n].any()] == names[:3]  # ceil(5 / 2) early tensors masked
    assert [n for n in names if not halves["late"][n].any()] == names[3:]


def test_lstm_variant_runs_under_the_same_experiment(tmp_path):
    tiny = {"hidden": (8, 8), "base_steps": 10, "mask_steps": 3, "n_valid": 100, "batch_size": 16}
    report = get_experiment("addmul-lstm").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    assert report["experiment"] == "addmul-lstm" and report["settings"]["model"] == "lstm"
    assert set(report["runs"][0]["layers"]) == {"cells.0", "cells.1", "output"}
    assert (tmp_path / "addmul-lstm.json").exists()
