"""Class removal and mask stability: image data, the CNN, the CIFAR-10 reader, and the experiments' reports."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from modscope.errors import MissingFileError, UntrustedFileError
from modscope.experiments import class_removal, get_experiment, image_data, stability
from modscope.experiments.common import ExperimentOptions
from modscope.metrics import ConfusionResult


def test_digits_split_80_20_and_normalized():
    data = image_data.load_digits()
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_valid.shape == (359, 1, 8, 8)
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-3
    assert set(np.unique(data.y_train)) == set(range(10)) and data.classes == tuple("0123456789")


def test_cnn_has_the_papers_layers_and_works_on_8x8_and_32x32():
    net = image_data.SimpleCNN(1, 10)
    convs = [m.out_channels for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert convs == [32, 64, 128, 256] and net.out_layer.in_features == 256
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert image_data.SimpleCNN(3, 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    no_dropout = image_data.SimpleCNN(1, 10, dropout=False).train()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(no_dropout(x), no_dropout(x), rtol=0, atol=0)


def _fake_cifar(path, payload=None):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 3):
            rng = np.random.RandomState(i)
            batch = payload if payload is not None else {
                b"data": rng.randint(0, 256, (20, 3072)).astype(np.uint8), b"labels": list(rng.randint(0, 10, 20)),
                b"batch_label": b"training batch", b"filenames": [b"x.png"] * 20}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_cifar_reader_reads_numpy_pickles(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar(path)
    data = image_data.load_cifar10(path)
    assert data.x_train.shape == (32, 3, 32, 32) and data.x_valid.shape == (8, 3, 32, 32)
    assert data.classes[3] == "cat"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    path = tmp_path / "evil.tar.gz"
    _fake_cifar(path, payload={b"data": _Evil(), b"labels": []})
    with pytest.raises(UntrustedFileError):
        image_data.load_cifar10(path)
    with pytest.raises(MissingFileError):
        image_data.load_cifar10(tmp_path / "missing.tar.gz")


def test_removal_effects_follow_the_papers_definitions():
    ref = np.eye(3) * 0.8 + 0.1 - np.eye(3) * 0.1  # diagonal 0.8
    diff = np.zeros((3, 3))
    diff[0, 0], diff[0, 2] = -0.4, 0.4  # class 0 loses half of its accuracy, to class 2
    diff[1, 1] = -0.04  # class 1 loses 5%
    effects = class_removal.removal_effects(ConfusionResult(ref, ref + diff, diff, -np.diag(diff) / np.diag(ref) * 100), 0)
    assert effects["target_drop"] == pytest.approx(50.0)
    assert effects["other_drops"] == {1: pytest.approx(5.0), 2: pytest.approx(0.0)}
    assert effects["largest_other_over_target"] == pytest.approx(10.0)
    assert effects["lost_to"] == 2 and effects["lost_to_share"] == pytest.approx(0.4)


def test_class_pairs_are_distinct_and_ordered():
    pairs = stability.class_pairs(10, 10, seed=0)
    assert len(set(pairs)) == 10 and all(a != b for a, b in pairs)
    assert stability.class_pairs(10, 10, seed=0) == pairs


def test_tiny_class_removal_reports_every_claimed_quantity(tmp_path):
    tiny = {"base_steps": 10, "mask_steps": 3, "classes": (0, 1), "batch_size": 32, "mask_batch_size": 32}
    report = get_experiment("class-removal").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    run = report["runs"][0]
    assert run["dataset"] == "digits" and set(run["per_class"]) == {0, 1}
    keys = {"target_drop", "other_drops", "mean_other_drop", "largest_other_over_target", "lost_to", "lost_to_share", "diff"}
    assert set(run["per_class"][0]) == keys and np.asarray(run["per_class"][0]["diff"]).shape == (10, 10)
    assert set(run["density"]) == {"control", "without_0", "without_1"}
    assert any("largest other-class drop" in c["what"] for c in report["claims"])
    assert json.loads((tmp_path / "class-removal.json").read_text())["claims"] == report["claims"]


def test_class_masks_freeze_the_output_layer_at_the_control(tmp_path):
    from modscope.experiments.common import ExperimentOptions as Options

    data = image_data.load_digits()
    settings = {**class_removal.SETTINGS, "base_steps": 5, "mask_steps": 30, "batch_size": 32, "mask_batch_size": 32, "mask_lr": 0.1}
    options = Options(out=tmp_path, progress=False, device="cpu")
    model = class_removal.base_network(data, settings, 0, options, "test")
    masks = class_removal.class_masks(model, data, [3], settings, 0, options)
    for name in ("out_layer.weight", "out_layer.bias"):
        torch.testing.assert_close(masks.logits["without_3"][name], masks.logits["control"][name], rtol=0, atol=0)
    assert not torch.equal(masks.logits["without_3"]["features.0.weight"], masks.logits["control"]["features.0.weight"])
    assert "features.0.bias" in masks.logits["control"], "the paper masks the CNN's biases"


def test_tiny_stability_reports_iou_and_chance(tmp_path):
    tiny = {"base_steps": 10, "mask_steps": 3, "n_pairs": 2, "batch_size": 32, "mask_batch_size": 32}
    report = get_experiment("stability").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    st = report["runs"][0]["stability"]
    assert len(st["tasks"]) == 2 and all(0 <= v <= 1 for v in st["mean"].values())
    assert set(st["chance"]) == set(st["tasks"]) and "out_layer" in st["per_layer"]
    assert any("chance" in c["what"] for c in report["claims"])


@pytest.mark.slow
def test_quick_class_removal_hurts_the_removed_class_most(tmp_path):
    report = class_removal.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    per_class = report["runs"][0]["per_class"].values()
    assert np.mean([g["target_drop"] for g in per_class]) > 3 * np.mean([g["mean_other_drop"] for g in per_class])


@pytest.mark.slow
def test_quick_stability_masks_agree_far_above_chance(tmp_path):
    report = stability.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    iou, chance = stability.summary(report["runs"][0])
    assert iou > 0.5 and iou > 3 * chance
