"""Shape manipulation: Reshape, Transpose, Concat, Split, Squeeze, Expand, Tile, Pad, Shape, Size, Range ..."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
