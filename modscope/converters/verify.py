"""Parity check: run the original ONNX file in onnxruntime and the converted model in torch, compare the outputs.

onnxruntime is the reference and is optional (``pip install modscope[verify]``, or ``modscope[gpu]`` for CUDA);
it is imported only when a check runs. ``onnxruntime`` and ``onnxruntime-gpu`` share the import name and break
each other when both are installed (CUDA silently disappears), so `import_onnxruntime` warns when it finds both.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import (
    InvalidParameterError,
    ModelLoadError,
    ModscopeError,
    ModscopeWarning,
    OperatorError,
    ResourceLimitError,
    ShapeError,
)
from ..fileio import require_file
from ..install import install_hint
from ..model import Model

_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")


@dataclass(frozen=True)
class OutputDiff:
    """How one output of the converted model compares with onnxruntime's.

    Attributes:
        name: the ONNX output name.
        shape: the reference (onnxruntime) shape.
        max_abs_diff: the largest ``|torch - reference|`` (inf when the shapes differ).
        max_rel_diff: the largest ``|torch - reference| / |reference|`` over non-zero reference entries.
        ok: whether ``numpy.allclose(torch, reference, rtol, atol)`` holds and the shapes agree.
        note: why it failed beyond the numbers (shape mismatch, non-tensor output), else empty.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify`.

    Attributes:
        ok: every output agrees within tolerance.
        provider: the onnxruntime execution provider that ran the reference (e.g. ``CPUExecutionProvider``).
        outputs: one `OutputDiff` per graph output, in graph order.
        rtol: the relative tolerance used.
        atol: the absolute tolerance used.
        onnxruntime_version: the onnxruntime version that ran.
    """

    ok: bool
    provider: str
    outputs: tuple[OutputDiff, ...]
    rtol: float
    atol: float
    onnxruntime_version: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists for tuples; ``None`` for an infinite difference, explained by ``note``)."""
        data = asdict(self)
        data["outputs"] = [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else list(v) if isinstance(v, tuple) else v)
             for k, v in out.items()}
            for out in data["outputs"]
        ]
        return data


def verify(
    model: Model,
    source: str | os.PathLike | Any | None = None,
    inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    providers: Sequence[str] | None = None,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> VerifyResult:
    """Compare a converted model with its ONNX original run in onnxruntime.

    Args:
        model: a `Model` converted from ONNX.
        source: the ONNX file or ``onnx.ModelProto`` to compare with; defaults to the file the model was loaded
            from.
        inputs: arrays by input name or in graph-input order; random ones from the graph's input types when
            omitted (see `random_inputs`).
        rtol: relative tolerance, default 1e-4.
        atol: absolute tolerance, default 1e-5.
        providers: onnxruntime execution providers, default ``["CPUExecutionProvider"]``.
        seed: seed of the random inputs.
        shapes: shapes of the random inputs by name, where the file's declared ones will not do.

    Returns:
        A `VerifyResult` with the largest absolute and relative difference per output and the provider that ran.

    Raises:
        ModscopeError: onnxruntime is not installed (the message gives the pip command).
        InvalidParameterError: there is no ONNX source to compare with, or ``inputs`` do not name the graph inputs.

    Example:
        >>> import torch, modscope
        >>> from modscope.converters.verify import verify
        >>> _ = torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), "/tmp/doc_v.onnx", dynamo=False)
        >>> verify(modscope.load("/tmp/doc_v.onnx")).ok
        True
    """
    import torch

    ort = import_onnxruntime()
    proto, path = _onnx_source(model, source)
    input_names = _graph_input_names(proto)
    feeds = _feeds(proto, input_names, inputs, seed, getattr(model.module, "max_tensor_bytes", None), shapes)
    # the converted model runs first: its size limits stop a hostile file before onnxruntime allocates for it
    with model.frozen() as module, torch.no_grad():
        device = model.device
        try:
            got = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in input_names])
        except OperatorError as exc:
            if inputs is not None or shapes:
                raise
            raise ShapeError(f"{exc}; the inputs were made up from the file's declared shapes "
                             f"({_described(feeds)}): give workable ones (inspect: --input NAME=SHAPE or "
                             "NAME=FILE.npy)") from exc
    try:
        session = ort.InferenceSession(
            _reference_model(proto, path), providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes; the user needs one sentence
        raise ModelLoadError(f"onnxruntime cannot load the file ({_first_line(exc)}), so there is no reference to "
                             "compare with") from exc
    try:
        reference = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        raise ShapeError(f"onnxruntime cannot run the file on inputs {_described(feeds)} ({_first_line(exc)}); give "
                         "workable inputs with --input NAME=SHAPE or --input NAME=FILE.npy") from exc
    got_list = list(got) if isinstance(got, tuple | list) else [got]
    names = [o.name for o in session.get_outputs()]
    diffs = tuple(_compare(n, g, r, rtol, atol) for n, g, r in zip(names, got_list, reference))
    if len(got_list) != len(reference):
        diffs += (OutputDiff("<outputs>", (len(reference),), float("inf"), float("inf"), False,
                             f"torch gave {len(got_list)} outputs, onnxruntime {len(reference)}"),)
    return VerifyResult(all(d.ok for d in diffs), session.get_providers()[0], diffs, rtol, atol, ort.__version__)


def random_inputs(
    proto: Any, *, seed: int = 0, symbolic_dim: int | None = None, max_tensor_bytes: int | str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Random arrays for a graph's inputs, from their declared element types and shapes.

    A shape in ``shapes`` wins over the declared one. Otherwise a symbolic or unknown dimension gets a size that
    works for most networks, the same for every input that names the same symbol: 2 for the first (batch)
    dimension, 64 for the spatial dimensions of an image-like input (rank 4 or more, so that pooling and strided
    convolutions still have something to reduce), 8 elsewhere; ``symbolic_dim`` sets one size for all of them.
    Floats are standard normal, integers 0 or 1 (valid indices for any embedding), booleans random.

    Args:
        proto: an ``onnx.ModelProto``.
        seed: the random seed.
        symbolic_dim: size used for symbolic dimensions.
        max_tensor_bytes: the most random data one input may take (as 8-byte numbers); None:
            ``$MODSCOPE_MAX_TENSOR_BYTES`` or 2 GiB.

    Returns:
        ``{input name: array}`` for every graph input that is not an initializer.

    Raises:
        ShapeError: an input is not a tensor (sequence, map, optional).
        ResourceLimitError: an input's declared shape would take more than ``max_tensor_bytes`` of random data.

    Example:
        >>> import onnx
        >>> x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])
        >>> g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
        >>> random_inputs(onnx.helper.make_model(g))["x"].shape
        (2, 3)
    """
    from onnx.helper import tensor_dtype_to_np_dtype

    rng = np.random.default_rng(seed)
    initializers = {i.name for i in proto.graph.initializer}
    unknown = sorted(set(shapes or ()) - {v.name for v in proto.graph.input} )
    if unknown:
        raise InvalidParameterError(f"the model has no input {unknown[0]!r}; its inputs are "
                                    f"{[v.name for v in proto.graph.input if v.name not in initializers]}")
    sizes: dict[str, int] = {}
    out = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise ShapeError(f"graph input {value.name!r} is not a tensor; pass inputs= explicitly")
        t = value.type.tensor_type
        if shapes and value.name in shapes:
            shape = tuple(int(d) for d in shapes[value.name])
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                          else sizes.setdefault(d.dim_param or f"{value.name}:{i}",
                                                symbolic_dim or _workable_size(i, len(t.shape.dim)))
                          for i, d in enumerate(t.shape.dim))
        dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type))
        _check_input_size(value.name, shape, max_tensor_bytes)
        if dtype.kind == "f":
            out[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[value.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind == "b":
            out[value.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise ShapeError(f"graph input {value.name!r} has type {dtype}, which random_inputs cannot make; pass inputs=")
    return out


def _workable_size(position: int, rank: int) -> int:
    if position == 0:
        return 2
    return 64 if rank >= 4 and position >= 2 else 8


def _described(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, a.shape))}" for n, a in feeds.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]


def _reference_model(proto: Any, path: Path | None) -> str | bytes:
    """What onnxruntime loads: the file, or the model without its dead nodes (which onnxruntime would compute, and a
    hostile file can make huge) when it has some and keeps its weights inside."""
    from .onnx.plan import without_dead_nodes

    external = any(init.data_location == init.EXTERNAL for init in proto.graph.initializer)
    pruned = None if external else without_dead_nodes(proto)
    if pruned is not None:
        return pruned.SerializeToString()
    return str(path) if path is not None else proto.SerializeToString()


def _check_input_size(name: str, shape: tuple[int, ...], limit: int | str | None) -> None:
    """Refuse a declared input shape whose random data (made as 8-byte numbers) would exceed the tensor limit."""
    from .onnx.limits import format_bytes, resolve_max_tensor_bytes

    limit, nbytes = resolve_max_tensor_bytes(limit), 8 * math.prod(shape)
    if nbytes > limit:
        raise ResourceLimitError(
            f"graph input {name!r} is declared with shape {list(shape)}, whose random data would take "
            f"{format_bytes(nbytes)}, more than the limit of {format_bytes(limit)} per tensor; pass smaller inputs "
            "or raise MODSCOPE_MAX_TENSOR_BYTES"
        )


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime, warning when several builds that share its import name are installed.

    Raises:
        ModscopeError: onnxruntime is not installed.
    """
    installed = onnxruntime_distributions()
    if len(installed) > 1:
        warnings.warn(
            f"{' and '.join(installed)} are installed together; they share the import name 'onnxruntime' and break "
            f"each other (CUDA disappears). Keep one: pip uninstall -y {' '.join(installed)} && pip install "
            f"onnxruntime-gpu (or `{install_hint('verify')}` for the CPU build)",
            ModscopeWarning,
            stacklevel=3,
        )
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModscopeError(
            f"onnxruntime is not installed; run `{install_hint('verify')}` (or the extra gpu for CUDA)"
        ) from exc
    return onnxruntime


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` package."""
    found = []
    for name in _ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _onnx_source(model: Model, source: Any) -> tuple[Any, Path | None]:
    """The ONNX proto to compare with (external data not loaded) and its path, if it is a file."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        return source, None
    if source is None:
        if model.source.format != "onnx" or not model.source.path:
            raise InvalidParameterError(
                f"the model was loaded from {model.source.format!r}{'' if model.source.path else ' in memory'}, "
                "so there is no ONNX file to compare with; pass source='model.onnx'"
            )
        source = model.source.path
    path = require_file(source, "ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False), path
    except Exception as exc:
        raise ModelLoadError(f"cannot read ONNX file {path}: {exc}") from exc


def _graph_input_names(proto: Any) -> list[str]:
    initializers = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _feeds(proto: Any, names: list[str], inputs: Any, seed: int, limit: int | None = None,
           shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    if inputs is None:
        return random_inputs(proto, seed=seed, max_tensor_bytes=limit, shapes=shapes)
    if isinstance(inputs, Mapping):
        unknown = [n for n in inputs if n not in names]
        if unknown:
            raise InvalidParameterError(f"the model has no input {unknown[0]!r}; its inputs are {names}")
        missing = [n for n in names if n not in inputs]
        made = random_inputs(proto, seed=seed, max_tensor_bytes=limit, shapes=shapes) if missing else {}
        return {n: _as_array(inputs[n]) if n in inputs else made[n] for n in names}
    items = list(inputs)
    if len(items) != len(names):
        raise InvalidParameterError(f"inputs has {len(items)} arrays but the graph has {len(names)} inputs {names}")
    return {n: _as_array(v) for n, v in zip(names, items)}


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _compare(name: str, got: Any, ref: Any, rtol: float, atol: float) -> OutputDiff:
    ref = np.asarray(ref)
    if not hasattr(got, "detach"):
        return OutputDiff(name, ref.shape, float("inf"), float("inf"), False, f"torch output is a {type(got).__name__}")
    g = got.detach().cpu()
    g = (g.float() if str(g.dtype) == "torch.bfloat16" else g).numpy()  # numpy has no bfloat16
    if g.shape != ref.shape:
        return OutputDiff(name, ref.shape, float("inf"), float("inf"), False, f"shape {g.shape} vs reference {ref.shape}")
    a, b = g.astype(np.float64), ref.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities and NaN against NaN count as equal
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    nonzero = np.abs(b) > 0
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff[nonzero] / np.abs(b[nonzero])).max()) if nonzero.any() else 0.0
    ok = bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    return OutputDiff(name, tuple(ref.shape), max_abs, max_rel, ok)
