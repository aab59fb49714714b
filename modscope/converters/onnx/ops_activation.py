"""Activations and softmax-like ops."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
