"""The paper's LSTM encoder-decoder for SCAN (docs/method.md section 8.3), written with plain tensor ops.

Embeddings of 16 (never masked), a 2-layer LSTM of 200 units as encoder and as decoder, dropout 0.5 on the embeddings
and between the layers, the encoder's final states initialise the decoder, and a linear output layer 200 → 7 (six
actions and EOS). The LSTM cells are explicit gate matmuls per time step (no ``nn.LSTM``), so that
``torch.func.vmap`` can batch mask samples through them and the mask trainer needs no loop.

Teacher forcing is an input: ``forward(src, src_len, tgt, tf)`` feeds the decoder the true previous action where
``tf`` is true and its own greedy prediction elsewhere. As in the paper, training draws it once per batch with
probability 1/2 (`make_task`): the model itself holds no randomness, so vmap and resumed runs see the same draws.
Evaluation uses ``tf = False`` everywhere (greedy decoding).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..tasks import Task
from .scan_data import Encoded, Vocab


class LSTMLayer(nn.Module):
    """One LSTM layer's weights (gates stacked in the order i, f, o, g) and its cell step."""

    def __init__(self, n_in: int, n_hidden: int):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * n_hidden, n_in))
        self.weight_hh = nn.Parameter(torch.empty(4 * n_hidden, n_hidden))
        self.bias = nn.Parameter(torch.empty(4 * n_hidden))
        bound = 1 / math.sqrt(n_hidden)  # torch.nn.LSTM's default initialisation
        for w in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(w, -bound, bound)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The input part of the gates, ``x @ W_ih^T + b``, for any leading shape."""
        return x @ self.weight_ih.T + self.bias

    def step(self, gates_in: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step given the projected input ``(N, 4H)`` and the state ``(N, H)`` each."""
        # Few, large ops: the step runs ~60 times per sequence, so per-op overhead dominates on a CPU.
        gates = torch.addmm(gates_in, h, self.weight_hh.T)
        n = h.shape[-1]
        i, f, o = torch.sigmoid(gates[:, : 3 * n]).chunk(3, dim=-1)
        c = torch.addcmul(f * c, i, torch.tanh(gates[:, 3 * n :]))
        return o * torch.tanh(c), c


class ScanLSTM(nn.Module):
    """LSTM encoder-decoder; ``forward(src, src_len, tgt, tf) -> logits (N, T_out, n_out)``.

    Args:
        n_in: command words + EOS. n_out: actions + EOS (EOS doubles as the start symbol).
        hidden: LSTM units (paper 200). layers: LSTM layers (paper 2). embedding: embedding size (paper 16).
        dropout: on the embeddings and between layers in train mode (paper 0.5).

    Example:
        >>> net = ScanLSTM(13, 7, hidden=8)
        >>> src = torch.zeros(2, 9, dtype=torch.long); tgt = torch.full((2, 5), -1)
        >>> net(src, torch.tensor([1, 3]), tgt, torch.zeros(2, dtype=torch.bool)).shape
        torch.Size([2, 5, 7])
    """

    def __init__(self, n_in: int, n_out: int, *, hidden: int = 200, layers: int = 2, embedding: int = 16, dropout: float = 0.5):
        super().__init__()
        self.n_out, self.dropout = n_out, dropout
        self.src_embedding = nn.Embedding(n_in, embedding)
        self.tgt_embedding = nn.Embedding(n_out, embedding)
        self.encoder = nn.ModuleList([LSTMLayer(embedding if i == 0 else hidden, hidden) for i in range(layers)])
        self.decoder = nn.ModuleList([LSTMLayer(embedding if i == 0 else hidden, hidden) for i in range(layers)])
        self.output = nn.Linear(hidden, n_out)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Final (h, c) of every encoder layer, taken at each sequence's own length."""
        x = self._drop(self.src_embedding(src))
        states = []
        for li, layer in enumerate(self.encoder):
            gates = layer.project(x)
            h = gates.new_zeros(src.shape[0], layer.weight_hh.shape[1])
            c = torch.zeros_like(h)
            outs = []
            for t in range(src.shape[1]):
                h_new, c_new = layer.step(gates[:, t], h, c)
                live = (t < src_len).unsqueeze(-1)
                h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
                outs.append(h)
            states.append((h, c))
            if li + 1 < len(self.encoder):
                x = self._drop(torch.stack(outs, dim=1))
        return states

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt: torch.Tensor, tf: torch.Tensor) -> torch.Tensor:
        states = self.encode(src, src_len)
        eos = self.n_out - 1
        teacher = tgt.clamp(min=0)  # padding (-1) positions follow EOS; their inputs do not matter
        tf = tf.bool().unsqueeze(-1)
        token = torch.full_like(tgt[:, 0], eos)
        logits = []
        for t in range(tgt.shape[1]):
            x = self._drop(self.tgt_embedding(token))
            new_states = []
            for li, (layer, (h, c)) in enumerate(zip(self.decoder, states)):
                h, c = layer.step(layer.project(x), h, c)
                new_states.append((h, c))
                x = self._drop(h) if li + 1 < len(self.decoder) else h
            states = new_states
            step_logits = self.output(x)
            logits.append(step_logits)
            token = torch.where(tf[:, 0], teacher[:, t], step_logits.argmax(-1))
        return torch.stack(logits, dim=1)


class TeacherForcedTask(Task):
    """A training task whose batches are teacher-forced as a whole, with probability 1/2 (the paper's per-batch draw).

    The draw is a function of the batch's example indices (a hash), so it needs no state: the same seed gives the same
    draws, and a resumed run continues them.
    """

    def batch(self, index: torch.Tensor, device: torch.device | str | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        (src, src_len, tgt, tf), y = super().batch(index, device)
        return (src, src_len, tgt, torch.full_like(tf, batch_coin(index))), y


def batch_coin(index: torch.Tensor) -> bool:
    """A fair coin drawn from the batch's example indices."""
    digest = hashlib.blake2b(index.cpu().numpy().astype("<i8").tobytes(), digest_size=1).digest()
    return bool(digest[0] & 1)


def make_task(name: str, data: Encoded, *, teacher_forcing: bool | None = None) -> Task:
    """A `Task` over encoded SCAN examples (loss "seq_ce", sequence accuracy).

    Args:
        teacher_forcing: ``None`` for training (each batch teacher-forced with probability 1/2,
            `TeacherForcedTask`); ``False`` for greedy evaluation, ``True`` to force every example.
    """
    tf = torch.full((len(data.src),), bool(teacher_forcing), dtype=torch.bool)
    cls = TeacherForcedTask if teacher_forcing is None else Task
    return cls(name, (data.src, data.src_len, data.tgt, tf), data.tgt, loss="seq_ce")


def build(hidden: int = 200, layers: int = 2, dropout: float = 0.5, vocab: Vocab | None = None) -> ScanLSTM:
    """The paper's model for ``vocab`` (SCAN's by default; hidden 200, 2 layers, dropout 0.5)."""
    vocab = vocab or Vocab()
    return ScanLSTM(vocab.n_in, vocab.n_out, hidden=hidden, layers=layers, dropout=dropout)
