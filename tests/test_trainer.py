"""The mask learner on networks with known answers."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
from torch import nn

import modscope
from modscope.errors import InvalidParameterError, ModscopeWarning

FAST = dict(n_steps=250, batch_size=64, n_samples=4, lr=0.05, beta=1e-3, log_every=25)


@pytest.fixture(scope="module")
def planted(toy_modular):
    net, tasks = toy_modular
    masks = modscope.train_masks(net, [tasks["a"], tasks["b"]], modscope.MaskConfig(**FAST, seed=0), progress=False)
    return net, tasks, masks


def test_planted_pathways_give_disjoint_masks(planted):
    net, tasks, masks = planted
    a, b = masks["a"], masks["b"]
    assert a.select("b.*").count() == 0, "task a's mask must not use pathway b"
    assert b.select("a.*").count() == 0, "task b's mask must not use pathway a"
    assert modscope.metrics.iou(masks).pair("a", "b") == 0.0
    assert a.count() > 0 and b.count() > 0


def test_removing_a_pathway_breaks_only_its_task(planted):
    net, tasks, masks = planted
    full_a, full_b = modscope.evaluate(net, tasks["a"]), modscope.evaluate(net, tasks["b"])
    assert full_a > 0.95 and full_b > 0.95
    assert modscope.evaluate(net, tasks["a"], masks["a"]) >= 0.9 * full_a
    assert modscope.evaluate(net, tasks["a"], masks["a"], invert=True) < 0.5
    assert modscope.evaluate(net, tasks["b"], masks["a"], invert=True) == full_b
    assert modscope.evaluate(net, tasks["b"], masks["b"], invert=True) < 0.5
    assert modscope.evaluate(net, tasks["a"], masks["b"], invert=True) == full_a


def test_training_never_touches_the_users_module(toy_modular):
    net, tasks = toy_modular
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    modscope.train_masks(net, [tasks["a"]], modscope.MaskConfig(n_steps=5, batch_size=16), progress=False)
    assert net.training and all(m.training for m in net.modules()), "train/eval flags must be restored"
    net.eval()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()), "gradients must reach only the mask logits"


def test_gradients_reach_only_the_logits(toy_modular):
    net, tasks = toy_modular
    masks = modscope.train_masks(net, [tasks["a"]], modscope.MaskConfig(n_steps=30, batch_size=16, lr=0.1), progress=False)
    changed = [n for n, lg in masks.logits["a"].items() if not torch.all(lg == 2.0)]
    assert changed, "the logits must move"
    assert all(p.grad is None for p in net.parameters())


def test_same_seed_gives_identical_masks(toy_modular):
    net, tasks = toy_modular
    cfg = modscope.MaskConfig(n_steps=40, batch_size=32, lr=0.05, seed=3)
    first = modscope.train_masks(net, [tasks["a"]], cfg, progress=False)
    second = modscope.train_masks(net, [tasks["a"]], cfg, progress=False)
    other = modscope.train_masks(net, [tasks["a"]], modscope.MaskConfig(n_steps=40, batch_size=32, lr=0.05, seed=4), progress=False)
    assert all(torch.equal(first.logits["a"][n], second.logits["a"][n]) for n in first.logits["a"])
    assert any(not torch.equal(first.logits["a"][n], other.logits["a"][n]) for n in first.logits["a"])


def test_vmap_and_loop_paths_give_the_same_masks(toy_modular):
    net, tasks = toy_modular
    base = dict(n_steps=60, batch_size=32, lr=0.05, seed=1)
    vm = modscope.train_masks(net, list(tasks.values()), modscope.MaskConfig(**base, vectorize="vmap"), progress=False)
    lp = modscope.train_masks(net, list(tasks.values()), modscope.MaskConfig(**base, vectorize="loop"), progress=False)
    assert vm.extra["vectorize"] == "vmap" and lp.extra["vectorize"] == "loop"
    for t in tasks:
        assert vm[t] == lp[t]
        for n in vm.logits[t]:
            torch.testing.assert_close(vm.logits[t][n], lp.logits[t][n], atol=1e-4, rtol=0)


def test_tasks_train_independently_of_each_other(toy_modular):
    """Clipping is per task and Adam is element-wise, so training a alone or with b gives a's same mask."""
    net, tasks = toy_modular
    cfg = modscope.MaskConfig(n_steps=40, batch_size=32, lr=0.05, seed=2)
    alone = modscope.train_masks(net, [tasks["a"]], cfg, progress=False)
    together = modscope.train_masks(net, [tasks["a"], tasks["b"]], cfg, progress=False)
    for n in alone.logits["a"]:
        torch.testing.assert_close(alone.logits["a"][n], together.logits["a"][n], atol=1e-5, rtol=0)


class _RNNClassifier(nn.Module):
    """torch's fused Elman RNN (aten::rnn_tanh) has no batching rule and no modscope stand-in (LSTM/GRU have one)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_ops_without_batching_rule_fall_back_to_a_loop_and_say_so():
    net = _RNNClassifier().eval()
    x = torch.randn(32, 5, 3)
    task = modscope.Task("t", x, (x[:, :, 0].sum(1) > 0).long())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = modscope.train_masks(net, [task], modscope.MaskConfig(n_steps=3, batch_size=8), progress=False)
    assert masks.extra["vectorize"] == "loop"
    announcements = [w for w in caught if issubclass(w.category, ModscopeWarning)]
    assert len(announcements) == 1 and "loop" in str(announcements[0].message)


def test_curves_and_density_are_recorded(planted):
    _, _, masks = planted
    curve = masks.curves["a"]
    assert curve["step"][-1] == FAST["n_steps"] and len(curve["step"]) == FAST["n_steps"] // FAST["log_every"]
    assert curve["density"][0] > curve["density"][-1], "the sparsity penalty must shrink the mask"
    assert curve["density"][-1] == pytest.approx(masks["a"].density())


def test_freeze_keeps_initial_logits(toy_modular):
    net, tasks = toy_modular
    init = {"a.2.weight": torch.full((4, 16), -3.0)}
    cfg = modscope.MaskConfig(n_steps=20, batch_size=16, freeze=("a.2.*",))
    masks = modscope.train_masks(net, [tasks["a"]], cfg, initial_logits=init, progress=False)
    assert torch.equal(masks.logits["a"]["a.2.weight"], init["a.2.weight"])
    assert not torch.equal(masks.logits["a"]["a.0.weight"], torch.full((16, 2), 2.0))


def test_resume_gives_the_same_masks_as_an_uninterrupted_run(toy_modular, tmp_path):
    net, tasks = toy_modular
    cfg = modscope.MaskConfig(n_steps=40, batch_size=16, lr=0.05, seed=7)
    full = modscope.train_masks(net, [tasks["a"]], cfg, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    short = modscope.MaskConfig(n_steps=40, batch_size=16, lr=0.05, seed=7)
    # a real SIGINT in the middle of step 26: the step finishes, the checkpoint is written, then it stops
    calls = {"n": 0}
    original = tasks["a"].batch

    def interrupting(index, device=None):
        calls["n"] += 1
        if calls["n"] == 26:
            os.kill(os.getpid(), signal.SIGINT)
        return original(index, device)

    tasks["a"].batch = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            modscope.train_masks(net, [tasks["a"]], short, checkpoint=ckpt, checkpoint_every=10, progress=False)
    finally:
        del tasks["a"].batch
    assert ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] == 26
    resumed = modscope.train_masks(net, [tasks["a"]], short, checkpoint=ckpt, resume=True, progress=False)
    for n in full.logits["a"]:
        assert torch.equal(full.logits["a"][n], resumed.logits["a"][n])
    assert resumed.curves == full.curves


def test_checkpoint_of_another_run_is_refused(toy_modular, tmp_path):
    net, tasks = toy_modular
    ckpt = tmp_path / "ckpt.pt"
    modscope.train_masks(net, [tasks["a"]], modscope.MaskConfig(n_steps=20, batch_size=16), checkpoint=ckpt, checkpoint_every=10, progress=False)
    with pytest.raises(InvalidParameterError, match="different run"):
        modscope.train_masks(net, [tasks["b"]], modscope.MaskConfig(n_steps=20, batch_size=16), checkpoint=ckpt, resume=True, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_steps=0), "n_steps"),
        (dict(batch_size=10, n_samples=4), "divisible"),
        (dict(lr=-1.0), "lr"),
        (dict(vectorize="gpu"), "vectorize"),
        (dict(grad_clip=0.0), "grad_clip"),
    ],
)
def test_bad_config_values_are_rejected(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        modscope.MaskConfig(**kwargs)


def test_bad_training_arguments(toy_modular):
    net, tasks = toy_modular
    with pytest.raises(InvalidParameterError, match="unique"):
        modscope.train_masks(net, [tasks["a"], tasks["a"]], modscope.MaskConfig(n_steps=1, batch_size=4), progress=False)
    with pytest.raises(InvalidParameterError, match="at least one"):
        modscope.train_masks(net, [], modscope.MaskConfig(n_steps=1, batch_size=4), progress=False)
    with pytest.raises(InvalidParameterError, match="no weight is left"):
        modscope.train_masks(net, [tasks["a"]], modscope.MaskConfig(n_steps=1, batch_size=4, include=("nothing*",)), progress=False)


def test_a_model_that_rejects_the_data_gets_one_clear_error():
    from modscope.errors import ShapeError

    net = nn.Sequential(nn.Linear(5, 2))
    task = modscope.Task("t", torch.randn(16, 3), torch.zeros(16, dtype=torch.long))
    with pytest.raises(ShapeError, match="chunks of 4 examples"):
        modscope.train_masks(net, [task], modscope.MaskConfig(n_steps=2, batch_size=16), progress=False)
