"""Quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinear ops."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
