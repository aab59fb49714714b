"""Indexing: Gather*, Scatter*, Slice, Compress, NonZero, TopK, Unique, Trilu, Where-like selection."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
