"""Control flow: If, Loop, Scan as sub-graphs.

Bodies are ONNX sub-graphs stored as node attributes; they run through ``ctx.run_graph(graph, inputs, outer)``,
which binds the body's formal inputs and lets it read every value visible at the node (``ctx.env``, outer scopes
included). Conditions and trip counts are read as python values (``bool``/``int``): they decide how many times a
body runs, so they cannot be batched by ``torch.func.vmap``; the tensors flowing through the bodies can.
Scan outputs are stacked with ``torch.stack``, so gradients reach every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch

from ....errors import InvalidParameterError, ShapeError
from ..limits import loop_too_large
from ..registry import NodeContext, OpSet

ops = OpSet()

#: bytes a Loop iteration costs beyond its scan outputs (the python objects that hold them), for its memory bound.
_STEP_OVERHEAD = 1024


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _graph_attr(ctx: NodeContext, name: str) -> onnx.GraphProto:
    graph = ctx.attr(name)
    if not isinstance(graph, onnx.GraphProto):
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' has no '{name}' sub-graph; the model is malformed."
        )
    return graph


def _empty_scan_output(graph: onnx.GraphProto, index: int) -> torch.Tensor:
    """A zero-length scan output for a loop that ran no iteration, typed (and shaped if known) from the body."""
    from .util import torch_dtype  # the shared ONNX -> torch dtype table

    tensor_type = graph.output[index].type.tensor_type
    dtype = torch_dtype(tensor_type.elem_type) if tensor_type.elem_type else torch.float32
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return torch.zeros((0, *dims) if dims and min(dims) >= 0 else (0,), dtype=dtype)


def _value(v: Any) -> Any:
    """numpy arrays and scalars (as callers may feed them) as tensors; tensors, lists and None unchanged."""
    return torch.from_numpy(np.array(v)) if isinstance(v, (np.ndarray, np.generic)) else v


def _stack(values: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    values = [torch.as_tensor(_value(v)) for v in values]
    try:
        return torch.stack(values, dim=dim)
    except RuntimeError as exc:
        raise ShapeError(f"scan outputs change shape between iterations ({exc}); ONNX requires equal shapes.") from exc


@ops.register("If", since=1)
def if_(ctx: NodeContext, cond: Any) -> tuple:
    """Run ``then_branch`` or ``else_branch`` depending on the scalar condition; return the branch's outputs."""
    branch = _graph_attr(ctx, "then_branch" if bool(cond) else "else_branch")
    return tuple(ctx.run_graph(branch, [], ctx.env))


@ops.register("Loop", since=1)
def loop(ctx: NodeContext, trip_count: Any = None, cond: Any = None, *initial: Any) -> tuple:
    """``for i in range(M) while cond``: outputs the final loop-carried values, then the scan outputs stacked.

    An omitted ``M`` means no trip limit; an omitted ``cond`` means the body's condition output is ignored. The
    values the loop holds (carried, scan outputs so far, and ``_STEP_OVERHEAD`` per iteration) may not exceed
    ``ctx.max_tensor_bytes``, which bounds both its memory and its number of iterations.
    """
    body = _graph_attr(ctx, "body")
    n_carried = len(initial)
    limit = int(trip_count) if trip_count is not None else None
    running = bool(cond) if cond is not None else True
    carried, steps, i, scanned = [_value(v) for v in initial], [], 0, 0
    while running and (limit is None or i < limit):
        outs = ctx.run_graph(body, [torch.tensor(i, dtype=torch.int64), torch.tensor(running), *carried], ctx.env)
        if cond is not None:
            running = bool(outs[0])
        carried = list(outs[1 : 1 + n_carried])
        steps.append(outs[1 + n_carried :])
        i += 1
        scanned += _STEP_OVERHEAD + sum(_nbytes(v) for v in steps[-1])
        held = scanned + sum(_nbytes(v) for v in carried)
        if held > ctx.max_tensor_bytes:  # a trip count of 2**40, a body that doubles a value
            raise loop_too_large(ctx.name or ctx.node.output[0], i, held, ctx.max_tensor_bytes)
    n_scan = len(body.output) - 1 - n_carried
    scans = [
        _stack([s[k] for s in steps]) if steps else _empty_scan_output(body, 1 + n_carried + k) for k in range(n_scan)
    ]
    return tuple(carried + scans)


def _run_scan(
    ctx: NodeContext,
    body: onnx.GraphProto,
    states: list[Any],
    scan_inputs: Sequence[torch.Tensor],
    in_axes: Sequence[int],
    in_reverse: Sequence[bool],
    n_steps: int,
) -> tuple[list[Any], list[list[torch.Tensor]]]:
    """Iterate the body ``n_steps`` times; return the final states and each scan output's per-step values."""
    n_states = len(states)
    per_step: list[list[torch.Tensor]] = []
    for t in range(n_steps):
        elements = [x.select(a, n_steps - 1 - t if rev else t) for x, a, rev in zip(scan_inputs, in_axes, in_reverse)]
        outs = ctx.run_graph(body, [*states, *elements], ctx.env)
        states = list(outs[:n_states])
        per_step.append(list(outs[n_states:]))
    n_out = len(body.output) - n_states
    return states, [[step[k] for step in per_step] for k in range(n_out)]


def _flags(ctx: NodeContext, name: str, count: int) -> list[int]:
    values = list(ctx.attr(name, [0] * count))
    if len(values) != count:
        raise InvalidParameterError(f"Scan node '{ctx.name}': '{name}' has {len(values)} entries, expected {count}.")
    return values


def _scan_length(ctx: NodeContext, scan_inputs: Sequence[torch.Tensor], axes: Sequence[int]) -> int:
    lengths = {x.shape[a] for x, a in zip(scan_inputs, axes)}
    if len(lengths) > 1:
        raise ShapeError(f"Scan node '{ctx.name}': scan inputs have different lengths {sorted(lengths)}.")
    if not lengths:
        raise InvalidParameterError(f"Scan node '{ctx.name}' has no scan inputs; set num_scan_inputs >= 1.")
    return lengths.pop()


@ops.register("Scan", since=9)
def scan(ctx: NodeContext, *values: Any) -> tuple:
    """Scan (opset 9+): N states then M scan inputs, each scanned along its own axis and direction."""
    body = _graph_attr(ctx, "body")
    n_scan_in = int(ctx.attr("num_scan_inputs"))
    n_states = len(values) - n_scan_in
    states = [_value(v) for v in values[:n_states]]
    scan_inputs = [torch.as_tensor(_value(v)) for v in values[n_states:]]
    in_axes = [a + x.dim() if a < 0 else a for a, x in zip(_flags(ctx, "scan_input_axes", n_scan_in), scan_inputs)]
    in_reverse = [bool(d) for d in _flags(ctx, "scan_input_directions", n_scan_in)]
    n_steps = _scan_length(ctx, scan_inputs, in_axes)
    states, outputs = _run_scan(ctx, body, states, scan_inputs, in_axes, in_reverse, n_steps)
    out_axes = _flags(ctx, "scan_output_axes", len(outputs))
    out_reverse = _flags(ctx, "scan_output_directions", len(outputs))
    stacked = []
    for k, (steps, axis, rev) in enumerate(zip(outputs, out_axes, out_reverse)):
        if not steps:
            stacked.append(_empty_scan_output(body, n_states + k))
            continue
        rank = torch.as_tensor(steps[0]).dim() + 1
        stacked.append(_stack(steps[::-1] if rev else steps, dim=axis + rank if axis < 0 else axis))
    return tuple(states + stacked)


@ops.register("Scan", since=8)
def scan_v8(ctx: NodeContext, sequence_lens: Any, *values: Any) -> tuple:
    """Scan (opset 8): a leading batch axis on every state and scan input, scan axis 1, per-item lengths.

    Steps past an item's length are not run; its scan outputs are zero there.
    """
    body = _graph_attr(ctx, "body")
    n_scan_in = int(ctx.attr("num_scan_inputs"))
    n_states = len(values) - n_scan_in
    states = [torch.as_tensor(_value(v)) for v in values[:n_states]]
    scan_inputs = [torch.as_tensor(_value(v)) for v in values[n_states:]]
    in_reverse = [bool(d) for d in _flags(ctx, "directions", n_scan_in)]
    n_steps = _scan_length(ctx, scan_inputs, [1] * n_scan_in)
    batch = scan_inputs[0].shape[0]
    lengths = torch.as_tensor(sequence_lens).tolist() if sequence_lens is not None else [n_steps] * batch
    final_states, scan_outputs = [], []
    for b in range(batch):
        item_states, outputs = _run_scan(
            ctx,
            body,
            [s[b] for s in states],
            [x[b, : lengths[b]] for x in scan_inputs],
            [0] * n_scan_in,
            in_reverse,
            int(lengths[b]),
        )
        final_states.append(item_states)
        padded = []
        for steps in outputs:
            item = _stack(steps)
            if item.shape[0] < n_steps:
                item = torch.cat([item, item.new_zeros(n_steps - item.shape[0], *item.shape[1:])])
            padded.append(item)
        scan_outputs.append(padded)
    n_out = len(body.output) - n_states
    return tuple(
        [_stack([fs[k] for fs in final_states]) for k in range(n_states)]
        + [_stack([so[k] for so in scan_outputs]) for k in range(n_out)]
    )
