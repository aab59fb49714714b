"""Batchable stand-ins: torch's MultiheadAttention/TransformerEncoderLayer, LSTM and GRU train under vmap (no loop
fallback) with the loop's masks; the stand-ins compute torch's outputs and leave nothing attached."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import modscope
from modscope.batchable import batchable_layers
from modscope.errors import ModscopeWarning


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.emb(x), src_key_padding_mask=pad)
        h, _ = self.mha(h, h, h, key_padding_mask=pad)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = cls(8, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 20, (16, 5), generator=gen)
    pad = torch.zeros(16, 5, dtype=torch.bool)
    pad[::2, 3:] = True
    return x, pad, torch.randint(0, 3, (16,), generator=gen)


@pytest.mark.parametrize("kind", ["attention", "lstm", "gru"])
def test_masks_train_under_vmap_and_equal_the_loop(kind: str) -> None:
    x, pad, y = _data()
    net = {"attention": Encoder, "lstm": lambda: Recurrent(nn.LSTM), "gru": lambda: Recurrent(nn.GRU)}[kind]().eval()
    xs = (x, pad) if kind == "attention" else x
    tasks = [modscope.Task("a", xs, y), modscope.Task("b", xs, y.flip(0))]
    runs = {}
    for mode in ("auto", "loop"):
        config = modscope.MaskConfig(n_steps=3, batch_size=8, n_samples=2, seed=0, vectorize=mode, threads=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ModscopeWarning)  # the loop fallback's warning would fail the test
            runs[mode] = modscope.train_masks(net, tasks, config, progress=False)
    assert runs["auto"].extra["vectorize"] == "vmap"
    for t in ("a", "b"):
        for name in runs["auto"][t]:
            assert torch.equal(runs["auto"][t][name], runs["loop"][t][name])
            torch.testing.assert_close(runs["auto"].logits[t][name], runs["loop"].logits[t][name], atol=1e-5, rtol=0)
    assert not any("forward" in vars(m) for m in net.modules())


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_stand_in_computes_torchs_outputs(cls: type[nn.Module], batch_first: bool) -> None:
    rnn = cls(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first).eval()
    x = torch.randn(4, 7, 3) if batch_first else torch.randn(7, 4, 3)
    h0 = torch.randn(4, 4, 5)
    hx = (h0, torch.randn(4, 4, 5)) if cls is nn.LSTM else h0
    expected = rnn(x, hx)
    with batchable_layers(rnn) as n:
        got = rnn(x, hx)
    assert n == 1
    # plain matmuls and gate maths against torch's fused kernel: float32 rounding only
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_stand_in_computes_torchs_outputs() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    expected, _ = mha(q, q, q, key_padding_mask=pad, need_weights=False)
    with batchable_layers(mha):
        got, weights = mha(q, q, q, key_padding_mask=pad, need_weights=False)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_nothing_stays_attached_after_an_error() -> None:
    net = Recurrent(nn.LSTM)
    with pytest.raises(RuntimeError, match="boom"), batchable_layers(net):
        assert "forward" in vars(net.rnn)
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in net.modules())
