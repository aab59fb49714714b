"""Metric laws on hand-made masks, cross-checked against direct computations and scipy/sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modscope
from modscope import metrics
from modscope.errors import InvalidParameterError


def _ms(**masks):
    layers = {"w1": "l1", "w2": "l2"}
    return modscope.MaskSet.from_masks({t: {k: torch.tensor(v, dtype=torch.bool) for k, v in m.items()} for t, m in masks.items()}, layers)


@pytest.fixture
def three():
    return _ms(
        a={"w1": [1, 1, 1, 0, 0, 0], "w2": [1, 0, 0, 0]},
        b={"w1": [0, 1, 1, 1, 0, 0], "w2": [0, 1, 0, 0]},
        c={"w1": [0, 0, 0, 0, 1, 1], "w2": [0, 0, 1, 1]},
    )


def test_iou_is_symmetric_one_on_identical_zero_on_disjoint(three):
    r = metrics.iou(three)
    np.testing.assert_allclose(r.total, r.total.T)
    np.testing.assert_allclose(np.diag(r.total), 1.0)
    assert r.pair("a", "c") == 0.0 and r.pair("b", "c") == 0.0
    # a ∧ b: 2 (w1) + 0 (w2) = 2; a ∨ b: 4 + 2 = 6
    assert r.pair("a", "b") == pytest.approx(2 / 6)
    assert r.pair("a", "b", layer="l1") == pytest.approx(2 / 4)
    assert r.pair("a", "b", layer="l2") == 0.0


def test_iomin(three):
    r = metrics.iomin(three)
    assert r.pair("a", "b") == pytest.approx(2 / 4)  # |a|=4, |b|=4
    sub = _ms(x={"w1": [1, 1, 0, 0, 0, 0], "w2": [0, 0, 0, 0]}, y={"w1": [1, 1, 1, 1, 0, 0], "w2": [1, 0, 0, 0]})
    assert metrics.iomin(sub).pair("x", "y") == 1.0


def test_iou_against_scipy_jaccard(three):
    from scipy.spatial.distance import jaccard

    flat = {t: np.concatenate([three[t][w].numpy() for w in ("w1", "w2")]) for t in three}
    r = metrics.iou(three)
    for a in flat:
        for b in flat:
            assert r.pair(a, b) == pytest.approx(1 - jaccard(flat[a], flat[b]))


def test_chance_overlap_matches_random_masks():
    gen = torch.Generator().manual_seed(0)
    n, p, q = 20_000, 0.3, 0.6
    ms = modscope.MaskSet.from_masks({"a": {"w": torch.rand(n, generator=gen) < p}, "b": {"w": torch.rand(n, generator=gen) < q}})
    r = metrics.iou(ms)
    expected = p * q / (p + q - p * q)
    assert r.chance_total[0, 1] == pytest.approx(expected, rel=0.02)
    assert r.total[0, 1] == pytest.approx(r.chance_total[0, 1], rel=0.03), "independent masks overlap at chance level"
    assert metrics.iomin(ms).chance_total[0, 1] == pytest.approx(q, rel=0.03)
    s = metrics.sharing(ms)
    assert s.chance_total["a"] == pytest.approx(q, rel=0.03) and s.total["a"] == pytest.approx(q, rel=0.03)


def test_sharing_follows_the_paper_formula(three):
    s = metrics.sharing(three)
    # a: w1 ones at 0,1,2; others' union at 1,2,3,4,5 -> shared 2; w2: a at 0, others at 1,2,3 -> 0
    assert s.per_layer["l1"]["a"] == pytest.approx(2 / 3)
    assert s.per_layer["l2"]["a"] == 0.0
    assert s.total["a"] == pytest.approx(2 / 4)
    assert s.counts["l1"]["a"] == 3 and s.union["l1"] == 6
    assert s.total["c"] == 0.0


def test_sharing_of_an_empty_mask_is_zero():
    s = metrics.sharing(_ms(a={"w1": [0] * 6, "w2": [0] * 4}, b={"w1": [1] * 6, "w2": [1] * 4}))
    assert s.total["a"] == 0.0 and s.per_layer["l1"]["a"] == 0.0


def test_results_serialise(three):
    import json

    for r in (metrics.iou(three), metrics.iomin(three), metrics.sharing(three), metrics.cluster(three)):
        json.dumps(r.to_dict())


def test_cluster_groups_overlapping_masks():
    ms = _ms(
        a1={"w1": [1, 1, 1, 0, 0, 0], "w2": [1, 1, 0, 0]},
        a2={"w1": [1, 1, 0, 0, 0, 0], "w2": [1, 1, 0, 0]},
        b1={"w1": [0, 0, 0, 1, 1, 1], "w2": [0, 0, 1, 1]},
        b2={"w1": [0, 0, 0, 0, 1, 1], "w2": [0, 0, 1, 1]},
    )
    r = metrics.cluster(ms, n_clusters=2)
    assert sorted(sorted(v) for v in r.modules().values()) == [["a1", "a2"], ["b1", "b2"]]
    assert r.spectral is not None and r.spectral["a1"] == r.spectral["a2"] != r.spectral["b1"] == r.spectral["b2"]
    assert r.linkage.shape == (3, 4)
    with pytest.raises(InvalidParameterError):
        metrics.cluster(_ms(a={"w1": [1] * 6, "w2": [1] * 4}))


def test_stability_is_mean_pairwise_iou():
    r1 = _ms(t={"w1": [1, 1, 0, 0, 0, 0], "w2": [0, 0, 0, 0]})
    r2 = _ms(t={"w1": [1, 1, 0, 0, 0, 0], "w2": [0, 0, 0, 0]})
    r3 = _ms(t={"w1": [1, 0, 0, 0, 0, 0], "w2": [0, 0, 0, 0]})
    r = metrics.stability([r1, r2, r3])
    assert r.pairs["t"] == pytest.approx([1.0, 0.5, 0.5])
    assert r.mean["t"] == pytest.approx(2 / 3)
    with pytest.raises(InvalidParameterError):
        metrics.stability([r1])


def test_ablation_on_planted_pathways(toy_modular):
    net, tasks = toy_modular
    masks = modscope.train_masks(net, [tasks["a"], tasks["b"]], modscope.MaskConfig(n_steps=250, batch_size=64, lr=0.05, beta=1e-3), progress=False)
    r = metrics.ablation(net, masks, [tasks["a"], tasks["b"]], per_layer=True)
    assert r.value("a", "a") < 0.5 and r.value("b", "b") < 0.5
    assert r.value("a", "b") == pytest.approx(r.full[1]) and r.value("b", "a") == pytest.approx(r.full[0])
    assert r.kept[0, 0] >= 0.9 * r.full[0]
    np.testing.assert_allclose(r.relative_removed, r.removed / r.full[None, :])
    assert set(r.per_layer) == set(masks.layers.values())
    cd = metrics.confusion_diff(net, tasks["a"], masks["a"])
    np.testing.assert_allclose(cd.reference.sum(1), 1.0)
    assert cd.drop.mean() > 40  # removing a's weights destroys a's classes


def test_confusion_matrix_counts():
    out = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1])
    np.testing.assert_allclose(metrics.confusion_matrix(out, y, 2), [[1.0, 0.0], [0.5, 0.5]])
