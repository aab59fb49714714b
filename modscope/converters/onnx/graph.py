"""`OnnxGraphModule`: an ONNX graph run with torch operations.

Loading compiles the graph once (``compiler.py``): every node gets its handler and decoded attributes, nodes
whose inputs are all constants (``Constant`` nodes, shape arithmetic on constant initializers) are computed once
and kept as buffers, and the rest becomes a `Plan` (``plan.py``) that ``forward`` walks over a list of values,
freeing each intermediate value after its last use.

Float initializers that act as weights (see ``roles.py``) become `nn.Parameter`s named after the ONNX initializer
(made safe for torch), so gradients reach them, `torch.func.functional_call` can replace them (also under
`torch.func.vmap`), and results can be written back under the original name (``module.param_names``). Quantized
weights (constant integer initializers read by DequantizeLinear or the integer/QLinear operators, ``quantized.py``)
become parameters holding their dequantized float values, under the integer initializer's name. Every other
initializer is a buffer. Initializers that old exporters also list as graph inputs need not be fed, but may be:
pass them by ONNX name as keyword arguments.

A handler that fails while the model runs raises `OperatorError` naming the node and its operator, with the
original exception as ``__cause__``; `ModscopeError`s raised by handlers pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import onnx
import torch
from torch import nn

from ...errors import InvalidParameterError, ModelLoadError, ModscopeError, OperatorError, warn_nonfinite_weights
from .compiler import GraphCompiler
from .limits import resolve_max_tensor_bytes
from .plan import FIRST_SLOT, Plan
from .quantized import dequantize_weight, find_quantized_weights
from .registry import OpTable, _norm_domain
from .roles import all_initializers
from .tensors import tensor_from_proto


def safe_name(name: str, taken: set[str]) -> str:
    """``name`` made into a valid, unused torch attribute name (and added to ``taken``)."""
    base = re.sub(r"\W", "_", name) or "w"
    if base[0].isdigit():
        base = "w_" + base
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


class OnnxGraphModule(nn.Module):
    """Runs an ONNX model's main graph: ``module(*inputs)`` returns a tensor, or a tuple for several outputs.

    Args:
        model: the ModelProto (not modified).
        table: the op handlers to use.
        weight_initializers: the initializers that become parameters; None makes every float initializer with
            more than one element a parameter.
        base_dir: the model file's folder, for external data.
        max_tensor_bytes: the largest tensor a node may make, in bytes (None: ``$MODSCOPE_MAX_TENSOR_BYTES`` or
            2 GiB; see ``limits.py``). Checked at load for nodes that read only constants and, while the model
            runs, for the operators whose output size comes from values (Range, Tile, Expand, Pad, Resize ...).

    Attributes:
        input_names: the graph inputs the caller feeds, in order (initializers excluded).
        output_names: the graph outputs, in order.
        param_names: ONNX initializer name -> torch parameter name (``params.<safe name>``), for the weights.
        opsets: domain -> opset version the model imports.
        max_tensor_bytes: the per-tensor limit in force (see ``limits.py``).

    Raises:
        UnsupportedOperatorError: a node has no handler (every unsupported operator is named).
        ModelLoadError: the graph is inconsistent (a value nothing defines, an output never computed).
        ResourceLimitError: a node would make a tensor larger than ``max_tensor_bytes`` (also while running).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        table: OpTable,
        *,
        weight_initializers: Mapping[str, Any] | set[str] | None = None,
        base_dir: str | None = None,
        max_tensor_bytes: int | str | None = None,
    ):
        super().__init__()
        limit = self.max_tensor_bytes = resolve_max_tensor_bytes(max_tensor_bytes)
        self.opsets = {_norm_domain(o.domain): o.version for o in model.opset_import}
        self.params = nn.Module()
        self.consts = nn.Module()
        self.param_names: dict[str, str] = {}
        graph = model.graph
        self._taken: set[str] = set()
        self._buffer_values: list[str] = []  # the ONNX value each buffer holds, in registration order
        values = self._register_initializers(graph, weight_initializers, base_dir)
        init_names = set(values)
        self.input_names = tuple(i.name for i in graph.input if i.name not in init_names)
        self.output_names = tuple(o.name for o in graph.output)
        self._overridable = {i.name for i in graph.input if i.name in init_names}
        compiler = GraphCompiler(
            table,
            self.opsets,
            self.run_graph,
            weights=set(self.param_names),
            dequantized={n for n in self.param_names if n in self._quantized},
            overridable=self._overridable,
            add_buffer=lambda name, tensor: self._add_buffer(name, tensor, persistent=False),
            max_tensor_bytes=limit,
        )
        self._main, self._plans = compiler.compile(graph, values, self._presets, self.input_names)
        self._param_keys = tuple(self.params._parameters)
        self._buffer_keys = tuple(self.consts._buffers)

    # -- weights and constants ------------------------------------------------------------------------------------
    def _register_initializers(
        self, graph: onnx.GraphProto, weights: Mapping[str, Any] | set[str] | None, base_dir: str | None
    ) -> dict[str, torch.Tensor]:
        """Create the parameters (in weight order) and buffers; return every initializer by name."""
        protos: dict[str, onnx.TensorProto] = {}
        for init in all_initializers(graph):
            protos.setdefault(init.name, init)
        values = {name: tensor_from_proto(proto, base_dir) for name, proto in protos.items()}
        if weights is None:
            weights = [n for n, t in values.items() if t.is_floating_point() and t.numel() > 1]
        self._quantized = find_quantized_weights(graph)
        unmaskable: list[str] = []
        for name in weights:
            tensor = values.get(name)
            if name in self._quantized and tensor is not None and not tensor.is_floating_point():
                tensor = dequantize_weight(name, self._quantized[name], values, self.opsets.get("", 1))
            if tensor is None or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                if tensor is not None and tensor.is_floating_point():
                    unmaskable.append(name)
                continue  # tensors holding inf/nan are masks or limits, not trained weights
            safe = safe_name(name, self._taken)
            param = nn.Parameter(tensor)
            self.params.register_parameter(safe, param)
            self.param_names[name] = f"params.{safe}"
            values[name] = param
        warn_nonfinite_weights(unmaskable)  # said now, not as a misleading "nothing left to mask" later
        for name, tensor in values.items():
            if name not in self.param_names:
                self._add_buffer(name, tensor, persistent=True)
        return values

    def _presets(self) -> list[tuple[str, torch.Tensor]]:
        """(ONNX value, tensor) for every parameter and buffer, in the order `_initial_env` lists them."""
        names = [*self.param_names, *self._buffer_values]
        return list(zip(names, [*self.params._parameters.values(), *self.consts._buffers.values()]))

    def _add_buffer(self, name: str, tensor: torch.Tensor, *, persistent: bool) -> None:
        prefix = "" if persistent else "folded_"
        self.consts.register_buffer(safe_name(prefix + name, self._taken), tensor, persistent=persistent)
        self._buffer_values.append(name)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copies (deepcopy, pickle) hold copies of the sub-graphs: index their plans by the new objects
        super().__setstate__(state)
        self._plans = {id(g): (g, p) for g, p in self._plans.values()}

    # -- execution ------------------------------------------------------------------------------------------------
    def run_graph(self, graph: onnx.GraphProto, inputs: list[Any], outer: Mapping[str, Any]) -> list[Any]:
        """Run a sub-graph of this model with ``inputs`` bound to its formal inputs.

        Args:
            graph: the GraphProto from the node's attributes (``ctx.attrs``).
            inputs: values for the graph's formal inputs, in order (fewer is allowed: the rest are None).
            outer: the values of the enclosing scope (``ctx.env``).

        Returns:
            The graph's outputs, in order.
        """
        entry = self._plans.get(id(graph))
        if entry is None or entry[0] is not graph:
            raise ModelLoadError("run_graph was given a graph that is not part of this model")
        plan = entry[1]
        env: list[Any] = [None] * plan.n_slots
        for name, slot in plan.free_vars:
            env[slot] = outer[name]
        for slot, value in zip(plan.inputs, inputs):
            env[slot] = value
        return self._execute(plan, env)

    def _execute(self, plan: Plan, env: list[Any]) -> list[Any]:
        step = None
        try:
            for step in plan.steps:
                handler, ctx, fetch, arity, outputs, free, scoped, _ = step
                if scoped:
                    result = self._run_scoped(step, plan, env)
                elif arity == 1:
                    result = handler(ctx, fetch(env))
                elif arity:
                    result = handler(ctx, *fetch(env))
                else:
                    result = handler(ctx)
                if isinstance(result, tuple):
                    for slot, value in zip(outputs, result):
                        env[slot] = value
                else:
                    env[outputs[0]] = result
                for slot in free:
                    env[slot] = None
        except ModscopeError:
            raise
        except Exception as exc:
            raise _operator_error(step, env, exc) from exc
        return [env[i] for i in plan.outputs]

    @staticmethod
    def _run_scoped(step: Any, plan: Plan, env: list[Any]) -> Any:
        step.ctx.env = _EnvView(plan.slot_of, env)
        try:
            return step.handler(step.ctx, *[env[i] for i in step.inputs])
        finally:
            step.ctx.env = {}  # drop the reference to the value list

    def _initial_env(self) -> list[Any]:
        params, buffers = self.params._parameters, self.consts._buffers
        if tuple(params) == self._param_keys and tuple(buffers) == self._buffer_keys:
            presets = [*params.values(), *buffers.values()]
        else:  # a parametrization or similar replaced the storage: go through attribute access
            presets = [getattr(self.params, k) for k in self._param_keys]
            presets += [getattr(self.consts, k) for k in self._buffer_keys]
        return [None, None, *presets, *[None] * (self._main.n_slots - FIRST_SLOT - len(presets))]

    def forward(self, *inputs: Any, **named: Any) -> Any:
        """Run the graph.

        Args:
            *inputs: one value per name in ``input_names``, in order (tensors; numpy arrays are converted).
            **named: values by ONNX input name: the positional inputs, or initializers that the graph also lists
                as inputs (to override them for this call).

        Returns:
            The single output tensor, or a tuple of the outputs in ``output_names`` order.

        Raises:
            InvalidParameterError: the wrong number of inputs, or an unknown input name.
            OperatorError: a node failed (usually an input of the wrong shape or dtype).
        """
        plan = self._main
        if len(inputs) + sum(n in self.input_names for n in named) != len(self.input_names):
            raise InvalidParameterError(
                f"the model takes {len(self.input_names)} inputs {list(self.input_names)}, got {len(inputs)} "
                f"positional and {sorted(named)} by name"
            )
        env = self._initial_env()
        for slot, value in zip(plan.inputs, inputs):
            env[slot] = _as_value(value)
        for name, value in named.items():
            if name not in self._overridable and name not in self.input_names:
                raise InvalidParameterError(
                    f"'{name}' is not an input of the model; inputs are {list(self.input_names)}"
                    + (f" and the overridable initializers {sorted(self._overridable)}" if self._overridable else "")
                )
            env[plan.slot_of[name]] = _as_value(value)
        outputs = self._execute(plan, env)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class _EnvView(Mapping[str, Any]):
    """A read-only name -> value view over a running plan's value list (``ctx.env``)."""

    __slots__ = ("_slot_of", "_env")

    def __init__(self, slot_of: dict[str, int], env: list[Any]):
        self._slot_of, self._env = slot_of, env

    def __getitem__(self, name: str) -> Any:
        return self._env[self._slot_of[name]]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._slot_of if name)

    def __len__(self) -> int:
        return len(self._slot_of) - 1


def _as_value(value: Any) -> Any:
    if value is None or isinstance(value, torch.Tensor | list):
        return value
    return torch.as_tensor(value)


def _operator_error(step: Any, env: list[Any], exc: Exception) -> OperatorError:
    if step is None:
        return OperatorError(f"the converted model failed: {type(exc).__name__}: {exc}")
    node = step.ctx.node
    name = node.name or (node.output[0] if node.output else "?")
    got = ", ".join(_describe(env[i]) for i in step.inputs)
    return OperatorError(
        f"ONNX node '{name}' ({node.op_type}) failed on inputs ({got}): {type(exc).__name__}: {exc}; check that "
        "the model's inputs have the shapes and dtypes it expects",
        op_type=node.op_type,
        node=name,
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return "None" if value is None else type(value).__name__

