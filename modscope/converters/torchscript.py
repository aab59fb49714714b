"""TorchScript archives in: exported to ONNX in memory, then converted by the ONNX converter.

TorchScript archives are read by TorchScript's own C++ unpickler, which resolves class names only to
TorchScript types compiled from the archive's ``code/`` folder and never imports or calls Python objects
(a ``data.pkl`` naming ``os.system`` fails with "Unknown type name"; ``tests/test_torch_checkpoints.py``
checks this). The TorchScript code itself can call any registered torch operator, so a hostile archive is
still not harmless when *run*; modscope does not run it, it exports it. We treat TorchScript as safe to load
without ``trust``; while it is loaded and exported, stdout (file descriptor 1) goes to stderr, so that a
``__setstate__`` that prints cannot corrupt ``inspect --json`` (docs/security.md). Script modules' parameters cannot be swapped reliably with ``torch.func.functional_call``,
so the archive is exported to ONNX in memory (``torch.onnx.export(..., dynamo=False)``) and loaded through
the ONNX converter; weight names stay the script module's parameter names wherever the exporter keeps them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checksums import file_sha256
from ..errors import InvalidParameterError, ModelLoadError
from ..model import Model, Source, WeightInfo
from .pytorch import first_line, weight_kind


def load_torchscript(
    path: Path,
    *,
    example_inputs: Any = None,
    op_handlers: Mapping[Any, Callable[..., Any]] | None = None,
    opset: int | None = None,
    trust: bool = False,
) -> Model:
    """Load a TorchScript archive by exporting it to ONNX in memory and converting that.

    Args:
        path: the archive (``torch.jit.save``).
        example_inputs: a tensor or tuple of tensors with the right rank and dtype (sizes do not matter: every
            dimension is exported as dynamic). When omitted, modscope infers them when each input goes straight
            into a linear, convolution or embedding layer.
        op_handlers: extra ONNX op handlers for the converter (see `modscope.load`).
        opset: the ONNX opset to export with (torch's default when omitted).
        trust: accepted for symmetry with other torch files; TorchScript archives are read without running
            Python code (see the module docstring).

    Returns:
        A `Model` of format ``"torchscript"`` whose weights carry the script module's parameter names.

    Raises:
        ModelLoadError: the archive cannot be read, its input shapes cannot be inferred, or the ONNX export or
            conversion fails (the message names what failed and suggests torch.export or ONNX).
    """
    del trust
    with stdout_to_stderr():  # a __setstate__ in the archive may print; stdout is for modscope's --json output
        script = read_script(path)
        inputs = _as_tuple(example_inputs) if example_inputs is not None else _infer_script_inputs(script, path)
        proto = _script_to_onnx(script, inputs, opset, path)
    from .onnx.loader import load_onnx

    try:
        converted = load_onnx(proto, op_handlers=op_handlers)
    except Exception as exc:
        raise ModelLoadError(
            f"TorchScript archive {path} exported to ONNX but the ONNX graph cannot be converted ({first_line(exc)}); "
            "save the model with torch.export (.pt2) or export it to ONNX yourself"
        ) from exc
    weights = _script_weight_infos(script, converted.weights)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    source = Source("torchscript", str(path), file_sha256(path), opset_used, {"converted_via": "onnx"})
    return Model(converted.module, weights=weights, source=source)


def read_script(path: str | Path) -> Any:
    """``torch.jit.load`` on the CPU with stdout sent to stderr (the archive's ``__setstate__`` code runs here).

    Raises:
        ModelLoadError: the archive cannot be loaded.
    """
    from .archives import check_zip

    check_zip(path)
    with stdout_to_stderr():
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot load TorchScript archive {path}: {first_line(exc)}") from exc


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    items = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise InvalidParameterError("example_inputs must be a tensor or a tuple of tensors")
    return items


def _infer_script_inputs(script: Any, path: Path) -> tuple[torch.Tensor, ...]:
    graph = script.graph.copy()
    torch._C._jit_pass_inline(graph)
    graph_inputs = list(graph.inputs())
    tensors = dict(script.named_parameters())
    tensors.update(dict(script.named_buffers()))
    order = {node: i for i, node in enumerate(graph.nodes())}
    inferred = []
    for value in graph_inputs[1:]:
        users = sorted((u.user for u in value.uses() if u.user in order), key=lambda n: order[n])
        guess = _guess_input(users[0], value, tensors, graph_inputs[0]) if users else None
        if guess is None:
            first = users[0].kind() if users else "nothing"
            raise ModelLoadError(
                f"cannot tell the input shape of TorchScript archive {path} (input {value.debugName()!r} goes into "
                f"{first}); pass example_inputs=(tensor, ...) with the right rank and dtype"
            )
        inferred.append(guess)
    return tuple(inferred)


_GUESSABLE = ("aten::linear", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution", "aten::embedding")


def _guess_input(node: Any, value: Any, tensors: Mapping[str, torch.Tensor], self_value: Any) -> torch.Tensor | None:
    kind = node.kind()
    args = list(node.inputs())
    if kind not in _GUESSABLE or len(args) < 2:
        return None
    weight_path = _attr_path(args[1] if kind != "aten::embedding" else args[0], self_value)
    weight = tensors.get(weight_path or "")
    if weight is None:
        return None
    if kind == "aten::linear" and args[0] is value and weight.dim() >= 1:
        return torch.zeros(2, weight.shape[-1])
    if kind in ("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution") and args[0] is value:
        if weight.dim() < 3 or (kind == "aten::_convolution" and len(args) < 9):
            return None
        groups = args[-1].toIValue() if kind != "aten::_convolution" else args[8].toIValue()
        if not isinstance(groups, int):
            return None
        n_spatial = weight.dim() - 2
        return torch.zeros(1, weight.shape[1] * int(groups or 1), *[32] * n_spatial)
    if kind == "aten::embedding" and args[1] is value:
        return torch.zeros(2, 4, dtype=torch.long)
    return None


def _attr_path(value: Any, self_value: Any) -> str | None:
    parts = []
    while value is not self_value:
        node = value.node()
        if node.kind() != "prim::GetAttr" or not node.hasAttribute("name"):
            return None
        parts.append(node.s("name"))
        value = node.input()
    return ".".join(reversed(parts))


def _script_to_onnx(script: Any, inputs: tuple[torch.Tensor, ...], opset: int | None, path: Path) -> Any:
    import onnx

    names = [f"input_{i}" for i in range(len(inputs))]
    dynamic = {name: {d: f"{name}_d{d}" for d in range(t.dim())} for name, t in zip(names, inputs)}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _onnx_log_to_stderr():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                script,
                inputs,
                buffer,
                dynamo=False,
                input_names=names,
                dynamic_axes=dynamic,
                do_constant_folding=False,  # keeps weights as they are (no BN folding, no pre-transposed copies)
                keep_initializers_as_inputs=True,  # no merging of equal-valued weights (a fresh BN weight = running_var)
                **({"opset_version": opset} if opset is not None else {}),
            )
    except Exception as exc:
        raise ModelLoadError(
            f"TorchScript archive {path} cannot be converted: exporting it to ONNX failed ({first_line(exc)}); "
            "save the model with torch.export (.pt2) or export it to ONNX yourself"
        ) from exc
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (Python's and C++'s stdout) to stderr while the block runs.

    Example:
        >>> with stdout_to_stderr():
        ...     print("this goes to stderr")
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _onnx_log_to_stderr() -> Iterator[None]:
    """The TorchScript exporter prints the graph to stdout when it fails; stdout is for modscope's JSON output."""
    set_stream = getattr(torch._C, "_jit_set_onnx_log_output_stream", None)
    if set_stream is None:
        yield
        return
    set_stream("stderr")
    try:
        yield
    finally:
        set_stream("stdout")  # torch's default


def _script_weight_infos(script: Any, converted: Sequence[WeightInfo]) -> list[WeightInfo]:
    """Give converted weights the kind and layer of the script parameter of the same name, where there is one."""
    params = dict(script.named_parameters())
    classes = {name: getattr(m, "original_name", "") for name, m in script.named_modules()}
    out = []
    for w in converted:
        if w.source_name in params:
            layer, _, leaf = w.source_name.rpartition(".")
            w = replace(w, kind=weight_kind(leaf, classes.get(layer, "")), layer=layer or w.source_name)
        out.append(w)
    return out
