"""Signal processing: DFT, STFT, window functions."""

from __future__ import annotations

from .registry import OpSet

ops = OpSet()
