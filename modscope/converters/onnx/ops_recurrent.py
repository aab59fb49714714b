"""Recurrent layers: LSTM, GRU, RNN, written with plain tensor ops so they run under torch.func.vmap."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
