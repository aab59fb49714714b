"""Normalization: BatchNormalization, LayerNormalization, InstanceNormalization, GroupNormalization, RMSNormalization, LRN, LpNormalization, MeanVarianceNormalization."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
