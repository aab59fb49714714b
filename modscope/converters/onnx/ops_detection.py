"""Detection ops: NonMaxSuppression, RoiAlign."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
