"""The mask learner on module types beyond MLPs: attention, convolution, dropout; CPU vs GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modscope


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def test_transformer_layer_trains_under_vmap_with_the_fast_path_off():
    net = _Encoder().eval()
    x = torch.randn(32, 5, 8)
    task = modscope.Task("t", x, torch.randint(0, 3, (32,)))
    masks = modscope.train_masks(net, [task], modscope.MaskConfig(n_steps=3, batch_size=8, vectorize="vmap"), progress=False)
    assert masks.extra["vectorize"] == "vmap"
    assert any("self_attn" in n for n in masks.logits["t"])
    assert torch.backends.mha.get_fastpath_enabled(), "the fast-path switch must be restored"


def test_conv_net_with_dropout_runs_in_eval_mode():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.9), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(16, 1, 8, 8)
    task = modscope.Task("t", x, torch.randint(0, 2, (16,)))
    keep_all = {w.name: torch.ones(w.shape, dtype=torch.bool) for w in modscope.load(net).weights}
    # eval mode: dropout off, so evaluation is deterministic
    assert modscope.evaluate(net, task, keep_all) == modscope.evaluate(net, task, keep_all)
    masks = modscope.train_masks(net, [task], modscope.MaskConfig(n_steps=3, batch_size=8), progress=False)
    assert masks.extra["vectorize"] == "vmap" and set(masks.logits["t"]) == {"0.weight", "4.weight"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_gpu_give_the_same_masks(toy_modular):
    net, tasks = toy_modular
    base = dict(n_steps=60, batch_size=32, lr=0.05, seed=1)
    cpu = modscope.train_masks(net, list(tasks.values()), modscope.MaskConfig(**base, device="cpu"), progress=False)
    gpu = modscope.train_masks(net, list(tasks.values()), modscope.MaskConfig(**base, device="cuda"), progress=False)
    for t in tasks:
        for n in cpu.logits[t]:
            torch.testing.assert_close(cpu.logits[t][n], gpu.logits[t][n], atol=1e-3, rtol=0)
