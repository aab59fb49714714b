"""How large a node's output will be, worked out before the node runs.

Three ways, in this order:

1. *Rules* for the operators whose output size comes from tensor values (Range, Tile, Expand, ConstantOfShape,
   Pad, Resize, OneHot, window functions ...): a few lines each read the small shape-like inputs and multiply.
   They size the node exactly (or from above) without allocating anything, at load time and while the model runs
   (`SizeGuard`).
2. At load time, any other operator runs on *meta* tensors (shapes without data): broadcasting, MatMul, Concat,
   Einsum ... report their exact output shapes for free.
3. Operators that read values and never make more than their inputs hold (Reshape, Slice, Squeeze, reductions,
   TopK, NonZero ...) are bounded by the size of their inputs.

Anything else is *unknown*: such a node is not computed at load time and runs with the model.

Example:
    >>> import torch, onnx
    >>> from modscope.converters.onnx.registry import NodeContext
    >>> node = onnx.helper.make_node("Range", ["a", "b", "c"], ["r"])
    >>> ctx = NodeContext(node=node, opset=17, attrs={}, run_graph=None)
    >>> rule_size(ctx, [torch.tensor(0), torch.tensor(10**12), torch.tensor(1)])
    Size(numel=1000000000000, nbytes=8000000000000, exact=True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import onnx
import torch

from .limits import too_large
from .registry import NodeContext, _norm_domain

#: shape-like inputs with more entries than this are not read (no valid shape has that many dimensions).
_MAX_SHAPE_LEN = 1024


class Size(NamedTuple):
    """A node's output size: element count and bytes over all outputs (``inf`` when unbounded).

    ``exact`` is False for an upper bound from the inputs' sizes (the node may make less).
    """

    numel: float
    nbytes: float
    exact: bool


class _Unknown(Exception):
    """A rule cannot size the node from what it was given (the handler then reports the problem itself)."""


def _values(value: Any) -> list[float]:
    """The numbers of a small shape-like input (a tensor, list or scalar)."""
    if value is None:
        raise _Unknown
    if isinstance(value, torch.Tensor):
        if value.numel() > _MAX_SHAPE_LEN or value.device.type == "meta":
            raise _Unknown
        return value.reshape(-1).tolist()
    if isinstance(value, list | tuple):
        if len(value) > _MAX_SHAPE_LEN:
            raise _Unknown
        return list(value)
    return [value]


def _ints(value: Any, *, nonnegative: bool = True) -> list[int]:
    ints = [int(v) for v in _values(value)]
    if nonnegative and any(v < 0 for v in ints):
        raise _Unknown
    return ints


def _scalar(value: Any) -> float:
    values = _values(value)
    if len(values) != 1:
        raise _Unknown
    return values[0]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, torch.Tensor) and value.numel() == 0)


def _onnx_itemsize(code: int | None, default: int = 4) -> int:
    if code is None:
        return default
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(int(code)).itemsize
    except (KeyError, TypeError, ValueError):
        return default


def _arg(args: Sequence[Any], i: int) -> Any:
    return args[i] if i < len(args) else None


def _itemsize(x: Any) -> int:
    return x.element_size() if isinstance(x, torch.Tensor) else 8


# -- the rules: (ctx, inputs) -> (number of elements, bytes per element) ---------------------------------------------
Rule = Callable[[NodeContext, Sequence[Any]], tuple[float, int]]


def _range(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    start, limit, delta = (_scalar(_arg(args, i)) for i in range(3))
    if delta == 0 or any(math.isnan(v) for v in (start, limit, delta)):
        raise _Unknown
    try:
        n = max(math.ceil((limit - start) / delta), 0)
    except OverflowError:  # an infinite bound
        n = math.inf
    return n, _itemsize(_arg(args, 0))


def _tile(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    reps = _ints(_arg(args, 1)) if ctx.opset >= 6 else [int(_scalar(_arg(args, 1)))]
    if reps and reps[0] < 0:
        raise _Unknown
    return x.numel() * math.prod(reps), _itemsize(x)


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    rank = max(len(a), len(b))
    a, b = [1] * (rank - len(a)) + list(a), [1] * (rank - len(b)) + list(b)
    out = []
    for p, q in zip(a, b):
        if p != q and 1 not in (p, q):
            raise _Unknown  # not broadcastable: the handler says so
        out.append(q if p == 1 else p)
    return out


def _expand(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    return math.prod(_broadcast(list(x.shape), _ints(_arg(args, 1)))), _itemsize(x)


def _constant_of_shape(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    value = ctx.attr("value")
    return math.prod(_ints(_arg(args, 0))), _itemsize(value) if value is not None else 4


def _pad(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    rank = x.dim()
    if ctx.opset < 11:
        pads = [int(v) for v in ctx.attr("pads", ctx.attr("paddings", []))]
        axes = list(range(rank))
    else:
        pads = _ints(_arg(args, 1), nonnegative=False)
        given = _arg(args, 3)
        axes = [a % rank if rank else 0 for a in _ints(given, nonnegative=False)] if _present(given) else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise _Unknown
    dims = list(x.shape)
    for i, axis in enumerate(axes):
        dims[axis] = max(dims[axis] + pads[i] + pads[i + len(axes)], 0)
    return math.prod(dims), _itemsize(x)


def _resize(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    dims, rank = list(x.shape), x.dim()
    if ctx.op_type == "Upsample" or ctx.opset < 11:
        scales, sizes = _arg(args, 1), None
        if scales is None:
            scales = ctx.attr("scales")
    else:
        scales, sizes = _arg(args, 2), _arg(args, 3)
    axes = [a % rank for a in ctx.attr("axes", None) or range(rank)] if rank else []
    if _present(scales):
        factors = [float(v) for v in _values(scales)]
        if len(factors) != len(axes) or any(math.isnan(f) for f in factors):
            raise _Unknown
        for axis, f in zip(axes, factors):
            dims[axis] = math.inf if math.isinf(f) else max(math.ceil(dims[axis] * f), 0)
        return math.prod(dims), _itemsize(x)
    targets = _ints(sizes)
    if len(targets) != len(axes):
        raise _Unknown
    if ctx.attr("keep_aspect_ratio_policy", "stretch") == "stretch":
        for axis, size in zip(axes, targets):
            dims[axis] = size
    else:  # one common ratio; the larger one bounds both policies from above
        ratio = max((t / dims[a] if dims[a] else t) for a, t in zip(axes, targets)) if axes else 1.0
        for axis in axes:
            dims[axis] = math.ceil(dims[axis] * ratio) + 1
    return math.prod(dims), _itemsize(x)


def _center_crop_pad(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    targets, rank = _ints(_arg(args, 1)), x.dim()
    axes = [a % rank for a in ctx.attr("axes", None) or range(rank)] if rank else []
    if len(targets) != len(axes):
        raise _Unknown
    dims = list(x.shape)
    for axis, size in zip(axes, targets):
        dims[axis] = size
    return math.prod(dims), _itemsize(x)


def _one_hot(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    indices, values = args[0], _arg(args, 2)
    depth = _scalar(_arg(args, 1))
    if math.isnan(depth) or depth < 0:
        raise _Unknown
    return indices.numel() * (math.inf if math.isinf(depth) else int(depth)), _itemsize(values)


def _window(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    size = int(_scalar(_arg(args, 0)))
    if size < 0:
        raise _Unknown
    return size, _onnx_itemsize(ctx.attr("output_datatype", 1))


def _mel_weight_matrix(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    bins, dft_length = int(_scalar(_arg(args, 0))), int(_scalar(_arg(args, 1)))
    if bins < 0 or dft_length < 0:
        raise _Unknown
    return (dft_length // 2 + 1) * bins, _onnx_itemsize(ctx.attr("output_datatype", 1))


def _dft(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    if ctx.opset >= 20:
        axis = int(_scalar(args[2])) if _present(_arg(args, 2)) else -2
    else:
        axis = int(ctx.attr("axis", 1))
    dims = list(x.shape)
    if len(dims) < 2:
        raise _Unknown
    axis %= len(dims)
    given = _arg(args, 1)
    length = int(_scalar(given)) if _present(given) else 2 * dims[axis]  # an inverse one-sided DFT doubles it
    if length < 0:
        raise _Unknown
    dims[axis], dims[-1] = length, 2
    return math.prod(dims), _itemsize(x)


def _stft(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    signal, window = args[0], _arg(args, 2)
    step = int(_scalar(_arg(args, 1)))
    given = _arg(args, 3)
    if _present(given):
        length = int(_scalar(given))
    else:
        length = window.shape[0] if isinstance(window, torch.Tensor) else signal.shape[1]
    if step <= 0 or length <= 0 or signal.dim() < 2:
        raise _Unknown
    frames = max((signal.shape[1] - length) // step + 1, 0)
    return signal.shape[0] * frames * length * 2, _itemsize(signal)


def _col2im(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x = args[0]
    image, block = _ints(_arg(args, 1)), _ints(_arg(args, 2))
    if x.dim() != 3 or not math.prod(block):
        raise _Unknown
    return x.shape[0] * (x.shape[1] // math.prod(block)) * math.prod(image), _itemsize(x)


def _max_unpool(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    x, shape = args[0], _arg(args, 2)
    if _present(shape):
        return math.prod(_ints(shape)), _itemsize(x)
    kernel = list(ctx.attr("kernel_shape", []))
    strides = list(ctx.attr("strides", [1] * len(kernel)))
    pads = list(ctx.attr("pads", [0] * 2 * len(kernel)))
    spatial = x.shape[2:]
    if len(kernel) != len(spatial) or len(strides) != len(kernel) or len(pads) != 2 * len(kernel):
        raise _Unknown
    out = [(d - 1) * s + k - pads[i] - pads[i + len(kernel)] for i, (d, s, k) in enumerate(zip(spatial, strides, kernel))]
    return x.shape[0] * x.shape[1] * math.prod(max(o, 0) for o in out), _itemsize(x)


def _affine_grid(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    size = _ints(_arg(args, 1))
    if len(size) < 3:
        raise _Unknown
    spatial = size[2:]
    return size[0] * math.prod(spatial) * len(spatial), _itemsize(args[0])


def _constant(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    sparse = ctx.attr("sparse_value")
    if isinstance(sparse, onnx.SparseTensorProto):
        dims = [int(d) for d in sparse.dims]
        if any(d < 0 for d in dims):
            raise _Unknown
        return math.prod(dims), _onnx_itemsize(sparse.values.data_type)
    value = ctx.attr("value")
    if isinstance(value, torch.Tensor):
        return value.numel(), value.element_size()
    for key in ("value_floats", "value_ints"):
        if key in ctx.attrs:
            return len(ctx.attrs[key]), 8
    return 1, 8


def _random(ctx: NodeContext, args: Sequence[Any]) -> tuple[float, int]:
    shape = [int(d) for d in ctx.attr("shape", [])]
    if any(d < 0 for d in shape):
        raise _Unknown
    return math.prod(shape), _onnx_itemsize(ctx.attr("dtype", 1))


#: default-domain operators whose output size comes from input values or attributes, with their rules.
RULES: dict[str, Rule] = {
    "Range": _range,
    "Tile": _tile,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "CenterCropPad": _center_crop_pad,
    "OneHot": _one_hot,
    "HannWindow": _window,
    "HammingWindow": _window,
    "BlackmanWindow": _window,
    "MelWeightMatrix": _mel_weight_matrix,
    "DFT": _dft,
    "STFT": _stft,
    "Col2Im": _col2im,
    "MaxUnpool": _max_unpool,
    "AffineGrid": _affine_grid,
    "Constant": _constant,
    "RandomNormal": _random,
    "RandomUniform": _random,
}

#: operators that read values from their inputs but never make more than their inputs hold (times a small factor).
#: (Gather and GatherND are not among them: their output is a product of the two inputs' sizes; meta sizes them.)
INPUT_BOUNDED = frozenset({
    "Reshape", "Slice", "Squeeze", "Unsqueeze", "Split", "SplitToSequence", "TopK", "NonZero", "Compress", "Unique",
    "CumSum", "CumProd", "Trilu", "ReverseSequence", "TensorScatter", "NonMaxSuppression", "GatherElements", "ScatterElements", "ScatterND", "Flatten", "Identity", "Cast", "CastLike", "Shape", "Size",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "ArgMax", "ArgMin", "Transpose", "Clip",
})


def rule_size(ctx: NodeContext, args: Sequence[Any]) -> Size | None:
    """The output size of a node with a rule (`RULES`), or None when it has none or cannot tell."""
    rule = RULES.get(ctx.node.op_type) if _norm_domain(ctx.node.domain) == "" else None
    if rule is None:
        return None
    try:
        numel, itemsize = rule(ctx, args)
    except (_Unknown, AttributeError, IndexError, TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return Size(numel, numel * itemsize, True)


def predict(ctx: NodeContext, handler: Callable[..., Any], args: Sequence[Any]) -> Size | None:
    """The total size of a node's outputs for inputs ``args``, without computing them; None when unknown.

    Args:
        ctx: the node's context.
        handler: the node's handler (run on meta tensors when no rule applies).
        args: the node's inputs (constants, at load time).
    """
    size = rule_size(ctx, args)
    if size is not None:
        return size
    size = _on_meta(ctx, handler, args)
    if size is not None:
        return size
    if ctx.node.op_type in INPUT_BOUNDED and _norm_domain(ctx.node.domain) == "":
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        numel = sum(t.numel() for t in tensors)
        rank = max((t.dim() for t in tensors), default=0)
        return Size(numel * (rank + 4), 8 * numel * (rank + 4), False)
    return None


def _on_meta(ctx: NodeContext, handler: Callable[..., Any], args: Sequence[Any]) -> Size | None:
    """The size of the outputs the handler makes from data-less copies of ``args``, or None if it needs data."""
    try:
        meta = [_to_meta(a) for a in args]
    except _Unknown:
        return None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = handler(ctx, *meta)
    except Exception:  # noqa: BLE001 - the handler reads values (or rejects the inputs): not sizable this way
        return None
    results = result if isinstance(result, tuple) else (result,)
    if not all(isinstance(r, torch.Tensor) for r in results):
        return None
    numel = sum(r.numel() for r in results)
    return Size(numel, sum(r.numel() * r.element_size() for r in results), True)


def _to_meta(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    raise _Unknown


class SizeGuard:
    """A handler wrapper that sizes the node with its rule before running it, and refuses outputs over ``limit``.

    Used on the operators in `RULES` while the model runs; a node its rule cannot size runs unchecked (its handler
    then reports what is wrong with the inputs).
    """

    __slots__ = ("handler", "limit")

    def __init__(self, handler: Callable[..., Any], limit: int):
        self.handler, self.limit = handler, limit

    def __call__(self, ctx: NodeContext, *args: Any) -> Any:
        size = rule_size(ctx, args)
        if size is not None and size.nbytes > self.limit:
            node = ctx.node
            raise too_large(node.name or node.output[0], node.op_type, size.numel, size.nbytes, self.limit)
        return self.handler(ctx, *args)
