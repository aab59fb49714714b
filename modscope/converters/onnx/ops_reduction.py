"""Reductions: Reduce*, ArgMax/ArgMin, CumSum, CumProd."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
