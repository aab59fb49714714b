"""Recurrent ops: LSTM, GRU, RNN. The layers themselves are in `modscope.recurrent` (plain tensor ops that
``torch.func.vmap`` batches, shared with the learner's stand-ins for torch's ``nn.LSTM``/``nn.GRU``); these handlers
register them for ONNX nodes, whose ``NodeContext`` gives the attributes and the wanted outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .... import recurrent
from ..registry import NodeContext, OpSet

ops = OpSet()


@ops.register("LSTM", since=1)
def lstm(
    ctx: NodeContext,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
    initial_c: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    *,
    recurrent_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = recurrent.recurrent_matmul,
) -> tuple:
    """LSTM (`modscope.recurrent.lstm`); ``recurrent_matmul`` replaces the hidden state's product."""
    return recurrent.lstm(ctx, x, w, r, b, sequence_lens, initial_h, initial_c, p, recurrent_matmul=recurrent_matmul)


@ops.register("GRU", since=1)
def gru(
    ctx: NodeContext,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
) -> tuple:
    """GRU (`modscope.recurrent.gru`)."""
    return recurrent.gru(ctx, x, w, r, b, sequence_lens, initial_h)


@ops.register("RNN", since=1)
def rnn(
    ctx: NodeContext,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
) -> tuple:
    """The simple (Elman) RNN (`modscope.recurrent.rnn`)."""
    return recurrent.rnn(ctx, x, w, r, b, sequence_lens, initial_h)
