"""Format detection for model files (filled in by the converters issue)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..model import Model


def load_file(path: str | os.PathLike, **options: Any) -> Model:
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file {p} does not exist")
    from .onnx.loader import load_onnx

    return load_onnx(p, **options)
