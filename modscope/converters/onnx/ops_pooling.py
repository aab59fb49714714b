"""Pooling: MaxPool, AveragePool, LpPool, global pools, MaxUnpool."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
