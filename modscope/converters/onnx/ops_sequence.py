"""ONNX sequences and optionals."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
