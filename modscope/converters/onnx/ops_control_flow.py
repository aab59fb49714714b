"""Control flow: If, Loop, Scan as sub-graphs."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
