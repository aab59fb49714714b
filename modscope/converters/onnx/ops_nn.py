"""Composite neural-network ops: Attention, RotaryEmbedding, losses, GridSample, AffineGrid, Resize."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
