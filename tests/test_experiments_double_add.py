"""Double addition: data, the per-pair forward, the removal masks, and the experiment's report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modscope.experiments import double_add, get_experiment
from modscope.experiments.common import ExperimentOptions
from modscope.masks.maskset import MaskSet
from modscope.model import Model


def test_digits_and_targets_are_little_endian_sums():
    digits, targets = double_add.sample_digits(500, seed=3)
    assert digits.shape == (500, 8) and targets.shape == (500, 4)
    a1, b1 = digits[:, 0] + 10 * digits[:, 1], digits[:, 2] + 10 * digits[:, 3]
    a2, b2 = digits[:, 4] + 10 * digits[:, 5], digits[:, 6] + 10 * digits[:, 7]
    np.testing.assert_array_equal(targets[:, 0] + 10 * targets[:, 1], (a1 + b1) % 100)
    np.testing.assert_array_equal(targets[:, 2] + 10 * targets[:, 3], (a2 + b2) % 100)
    np.testing.assert_array_equal(double_add.sample_digits(500, seed=3)[0], digits)  # deterministic


def test_each_pair_is_read_from_its_own_slot_with_the_other_pair_zeroed():
    torch.manual_seed(0)
    net = double_add.DoubleAddNet((16, 16))
    digits = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2)
    pair = torch.tensor([0, 1])
    out = net(digits, pair)
    assert out.shape == (2, 2, 10)
    other = digits.clone()
    other[:, 4:] = 0  # pair 2 changes: pair 1's prediction must not
    torch.testing.assert_close(net(other, pair)[0], out[0], rtol=0, atol=0)
    x1, x2 = torch.zeros(1, 80), torch.zeros(1, 80)
    x1[0, [1, 12, 23, 34]] = 1  # one-hot of pair 1's digits only
    x2[0, [45, 56, 67, 78]] = 1  # of pair 2's
    torch.testing.assert_close(out[0], net.layers(x1)[0, :20].view(2, 10), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], net.layers(x2)[0, 20:].view(2, 10), rtol=1e-6, atol=1e-6)


def test_the_two_passes_are_separate_rows_so_they_get_separate_mask_samples():
    digits, targets = double_add.sample_digits(5, seed=0)
    tasks = double_add.make_tasks(digits, targets)
    assert len(tasks["both"]) == 10 and len(tasks["pair1"]) == len(tasks["pair2"]) == 5
    (d, pair), y = tasks["both"].batch(torch.tensor([0, 5]))
    assert torch.equal(d[0], d[1]) and pair.tolist() == [0, 1]
    assert torch.equal(y, torch.as_tensor(np.stack([targets[0, :2], targets[0, 2:]])))


def test_removal_masks_protect_the_io_layers():
    net = double_add.DoubleAddNet((4, 4))
    model = Model(net)
    io = double_add.io_weights(model)
    assert io == ("layers.0.weight", "layers.0.bias", "layers.4.weight", "layers.4.bias")
    names = [w.name for w in model.weights if w.kind == "weight"]
    gen = torch.Generator().manual_seed(0)
    masks = MaskSet.from_masks({t: {n: torch.rand(dict(net.named_parameters())[n].shape, generator=gen) > 0.5 for n in names}
                                for t in ("both", "pair1", "pair2")})
    tests = double_add.removal_masks(masks, tuple(n for n in io if n in names), "pair1")
    assert torch.equal(tests["removed"]["layers.2.weight"], ~masks["pair1"]["layers.2.weight"])
    assert tests["removed_io_kept"]["layers.0.weight"].all() and tests["removed_io_kept"]["layers.4.weight"].all()
    assert torch.equal(tests["removed_io_kept"]["layers.2.weight"], ~masks["pair1"]["layers.2.weight"])
    assert torch.equal(tests["removed_io_control"]["layers.0.weight"], masks["both"]["layers.0.weight"])
    assert torch.equal(tests["removed_io_control"]["layers.2.weight"], ~masks["pair1"]["layers.2.weight"])


def test_tiny_run_reports_every_claimed_quantity(tmp_path):
    tiny = {"hidden": (16, 16, 16), "base_steps": 20, "mask_steps": 4, "n_train": 2000, "n_valid": 200, "batch_size": 32}
    report = get_experiment("double-add").run(ExperimentOptions(out=tmp_path, seeds=2, progress=False, overrides=tiny))
    assert len(report["runs"]) == 2
    run = report["runs"][0]
    expected = {"full", "both", "pair1", "pair2"} | {f"{t}_{p}" for t in ("removed", "removed_io_kept", "removed_io_control") for p in double_add.PAIRS}
    assert set(run["accuracy"]) == expected
    assert all(set(v) == set(double_add.PAIRS) for v in run["accuracy"].values())
    assert run["layers"] == ["layers.0", "layers.2", "layers.4", "layers.6"] and run["io_layers"] == ["layers.0", "layers.6"]
    assert set(run["iou"]["per_layer"]) == set(run["layers"]) and set(run["sharing"]["per_layer"]) == set(run["layers"])
    whats = [c["what"] for c in report["claims"]]
    assert "pair 1 removed, I/O kept: pair 2 acc (of full)" in whats and any("hidden-layer IoU" in w for w in whats)
    assert any("±" in c["measured"] for c in report["claims"]), "two seeds must report mean ± std"
    assert json.loads((tmp_path / "double-add.json").read_text())["claims"] == report["claims"]


@pytest.mark.slow
def test_quick_preset_shows_no_reuse(tmp_path):
    report = double_add.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    acc = report["runs"][0]["accuracy"]
    for pair, other in (("pair1", "pair2"), ("pair2", "pair1")):
        assert acc[pair][pair] >= 0.9 * acc["full"][pair]
        assert acc[f"removed_{pair}"][pair] < 0.1
        assert acc[f"removed_{pair}"][other] >= 0.5 * acc["full"][other], "the other pair must survive"
