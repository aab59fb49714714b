"""Model files in and out.

`load` accepts a path, an ``onnx.ModelProto``, a ``torch.nn.Module`` or a ``torch.export.ExportedProgram`` and
detects a file's format from its content, not only its suffix (`detect_format`). `export_masked` writes a model
with some weights zeroed (an edited copy of its ONNX file, or a state_dict); `modscope.converters.verify.verify`
compares a converted model with its ONNX original in onnxruntime.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidParameterError
from ..model import Model
from .export import export_masked
from .files import detect_format

# `verify` stays in its module (``modscope.converters.verify.verify``): re-exporting the function here would hide
# the submodule of the same name.
__all__ = ["detect_format", "export_masked", "load"]


def load(source: Any, **options: Any) -> Model:
    """Load a model for analysis.

    Args:
        source: a path to a model file (ONNX, .pt2, TorchScript, state_dict/safetensors with ``factory=``) or to a
            local Hugging Face model folder (``config.json`` + ``*.safetensors``, read with transformers), an
            ``onnx.ModelProto``, a ``torch.nn.Module`` (a ``transformers.PreTrainedModel`` is called without cache
            and returns its tensors by name) or a ``torch.export.ExportedProgram``.
        **options: format-specific options, e.g. ``op_handlers`` for ONNX, ``factory`` and ``trust`` for torch files.

    Returns:
        A `Model`; the source object is never modified.

    Raises:
        MissingFileError, UnreadableFileError: the file is missing, a folder that is not a model folder, or the
            system will not read it.
        ModelLoadError: the file is corrupt or of an unknown format.
        UnsupportedOperatorError: an ONNX operator has no handler.
        UntrustedFileError: the file is a pickle and ``trust=True`` was not given.

    Example:
        >>> import torch, modscope
        >>> model = modscope.load(torch.nn.Linear(2, 3))
        >>> len(model.weights)
        2
    """
    import torch

    if isinstance(source, Model):
        return source
    from ..model import is_transformers_model, load_transformers

    if is_transformers_model(source):
        if options:
            raise InvalidParameterError(f"options {sorted(options)} do not apply to an in-memory transformers model")
        return load_transformers(source)
    if isinstance(source, torch.nn.Module):
        if options:
            raise InvalidParameterError(f"options {sorted(options)} do not apply to an in-memory torch module")
        return Model(source)
    import onnx

    if isinstance(source, onnx.ModelProto):
        from .onnx.loader import load_onnx

        return load_onnx(source, **options)
    if isinstance(source, str | os.PathLike):
        from .files import load_file

        return load_file(source, **options)
    export_cls = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if export_cls is not None and isinstance(source, export_cls):
        from .pytorch import load_exported_program

        return load_exported_program(source, **options)
    raise InvalidParameterError(
        f"cannot load a {type(source).__name__}; pass a file path, an onnx.ModelProto, a torch.nn.Module "
        "or a torch.export.ExportedProgram"
    )
