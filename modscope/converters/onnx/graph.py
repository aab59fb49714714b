"""`OnnxGraphModule`: an ONNX graph run with torch operations.

Loading compiles the graph once: every node gets its handler and decoded attributes, nodes whose inputs are all
constants (``Constant`` nodes, shape arithmetic on constant initializers) are computed once and kept as buffers,
and the rest becomes a `Plan` (see ``plan.py``) that ``forward`` walks over a list of values.

Float initializers that act as weights (see ``roles.py``) become `nn.Parameter`s named after the ONNX initializer
(made safe for torch), so gradients reach them, `torch.func.functional_call` can replace them (also under
`torch.func.vmap`), and results can be written back under the original name (``module.param_names``). Every other
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

from ...errors import InvalidParameterError, ModelLoadError, ModscopeError, OperatorError, UnsupportedOperatorError
from .fusion import fuse_linear
from .shapes import cache_shape_arithmetic
from .specialize import specialize
from .plan import FIRST_SLOT, Entry, Plan, build_plan, free_names, order_nodes
from .registry import Handler, NodeContext, OpTable, _norm_domain, decode_attribute
from .roles import all_initializers, subgraphs, walk_nodes
from .tensors import tensor_from_proto

#: operators whose result differs between runs, so they are never computed ahead of time.
_NOT_FOLDABLE = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial", "Dropout",
}
#: node inputs that hold statistics, never weights, even when an exporter merged them with an equal weight.
_STATISTICS_INPUTS = {"BatchNormalization": (3, 4)}
#: results larger than this many elements are recomputed on each call rather than kept in memory.
_FOLD_MAX_NUMEL = 1 << 22


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

    Attributes:
        input_names: the graph inputs the caller feeds, in order (initializers excluded).
        output_names: the graph outputs, in order.
        param_names: ONNX initializer name -> torch parameter name (``params.<safe name>``), for the weights.
        opsets: domain -> opset version the model imports.

    Raises:
        UnsupportedOperatorError: a node has no handler (every unsupported operator is named).
        ModelLoadError: the graph is inconsistent (a value nothing defines, an output never computed).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        table: OpTable,
        *,
        weight_initializers: Mapping[str, Any] | set[str] | None = None,
        base_dir: str | None = None,
    ):
        super().__init__()
        self.opsets = {_norm_domain(o.domain): o.version for o in model.opset_import}
        self._table = table
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
        self._prepared = self._prepare_nodes(graph)
        self._rewired = self._separate_statistics(graph, values)
        folded = self._fold_constants(graph, values)
        self._plans: dict[int, tuple[onnx.GraphProto, Plan]] = {}
        self._main = self._compile_main(graph, folded)
        del self._prepared, self._rewired, self._preset_shapes, self._constant_names, self._constant_values
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
        for name in weights:
            tensor = values.get(name)
            if tensor is None or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                continue  # tensors holding inf/nan are masks or limits, not trained weights
            safe = safe_name(name, self._taken)
            param = nn.Parameter(tensor)
            self.params.register_parameter(safe, param)
            self.param_names[name] = f"params.{safe}"
            values[name] = param
        for name, tensor in values.items():
            if name not in self.param_names:
                self._add_buffer(name, tensor, persistent=True)
        return values

    def _add_buffer(self, name: str, tensor: torch.Tensor, *, persistent: bool) -> None:
        prefix = "" if persistent else "folded_"
        self.consts.register_buffer(safe_name(prefix + name, self._taken), tensor, persistent=persistent)
        self._buffer_values.append(name)

    def _separate_statistics(self, graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> dict[tuple[int, int], str]:
        """Give running statistics that an exporter merged with an equal weight a buffer of their own.

        Exporters store bit-identical tensors once, so a fresh BatchNorm's running variance (all ones) may be the
        same initializer as its scale. Masking the scale must not change the statistics, so such node inputs read
        an unmasked copy instead. Returns (node id, input index) -> the name of the copy.
        """
        aliases = {n.output[0]: n.input[0] for n in walk_nodes(graph) if n.op_type == "Identity" and n.input}
        rewired: dict[tuple[int, int], str] = {}
        for node in walk_nodes(graph):
            for slot in _STATISTICS_INPUTS.get(node.op_type, ()):
                name = source = node.input[slot] if slot < len(node.input) else ""
                for _ in range(len(aliases)):
                    if source not in aliases:
                        break
                    source = aliases[source]
                if source not in self.param_names:
                    continue
                copy = f"{name}#statistics"
                if copy not in values:
                    values[copy] = values[source].detach().clone()
                    self._add_buffer(copy, values[copy], persistent=False)
                rewired[(id(node), slot)] = copy
        return rewired

    def _prepare_nodes(self, graph: onnx.GraphProto) -> dict[int, tuple[Handler, NodeContext]]:
        """Handler and context for every node (sub-graphs included), naming all unsupported operators at once."""
        prepared: dict[int, tuple[Handler, NodeContext]] = {}
        missing: dict[str, tuple[onnx.NodeProto, int]] = {}
        for node in walk_nodes(graph):
            domain = _norm_domain(node.domain)
            opset = self.opsets.get(domain, self.opsets.get("", 1) if domain == "" else 1)
            handler = self._table.lookup(domain, node.op_type, opset)
            if handler is None:
                missing.setdefault(f"{domain + '::' if domain else ''}{node.op_type}", (node, opset))
                continue
            attrs = {a.name: decode_attribute(a) for a in node.attribute}
            prepared[id(node)] = (handler, NodeContext(node=node, opset=opset, attrs=attrs, run_graph=self.run_graph))
        if missing:
            first, (node, opset) = next(iter(missing.items()))
            others = ", ".join(list(missing)[1:])
            hint = (f"the model also uses {others}; " if others else "") + (
                "pass op_handlers={...} to modscope.load to supply implementations"
            )
            raise UnsupportedOperatorError(node.op_type, node.domain, opset, node.name or node.output[0], hint)
        return prepared

    def _fold_constants(self, graph: onnx.GraphProto, values: dict[str, torch.Tensor]) -> set[int]:
        """Compute once every node that reads only constants; return the ids of the nodes folded away."""
        constants = {n: v for n, v in values.items() if n not in self.param_names and n not in self._overridable}
        self._constant_values = constants  # grows as nodes fold; read by the compiler's fast paths
        folded: set[int] = set()
        for node in walk_nodes(graph):  # Constant nodes anywhere, sub-graphs included
            if node.op_type == "Constant" and not node.input and _norm_domain(node.domain) == "":
                self._try_fold(node, constants, folded)
        known = set(values) | set(constants) | {i.name for i in graph.input}
        for node in order_nodes(graph.node, known, lambda n: self._reads(n, folded)):
            if id(node) in folded or node.op_type in _NOT_FOLDABLE or _norm_domain(node.domain) != "":
                continue
            if not subgraphs(node) and all(not name or name in constants for name in node.input):
                self._try_fold(node, constants, folded)
        return folded

    def _try_fold(self, node: onnx.NodeProto, constants: dict[str, torch.Tensor], folded: set[int]) -> None:
        handler, ctx = self._prepared[id(node)]
        args = [constants[name] if name else None for name in node.input]
        try:
            with torch.no_grad():
                result = handler(ctx, *args)
        except Exception:  # noqa: BLE001 - the node then runs normally and reports its error at run time
            return
        results = result if isinstance(result, tuple) else (result,)
        if len(results) < len(node.output) or not all(isinstance(r, torch.Tensor) for r in results):
            return
        if any(r.numel() > _FOLD_MAX_NUMEL for r in results):
            return
        for name, value in zip(node.output, results):
            if name:
                constants[name] = value
                self._add_buffer(name, value, persistent=False)
        folded.add(id(node))

    # -- compilation ----------------------------------------------------------------------------------------------
    def _reads(self, node: onnx.NodeProto, folded: set[int]) -> list[str]:
        names = [name for name in node.input if name]
        for sub in subgraphs(node):
            names += free_names(sub, folded)
        return names

    def _compile_main(self, graph: onnx.GraphProto, folded: set[int]) -> Plan:
        presets = [*self.param_names, *self._buffer_values]  # the order of _initial_env's list
        tensors = [*self.params._parameters.values(), *self.consts._buffers.values()]
        self._preset_shapes = {name: tuple(t.shape) for name, t in zip(presets, tensors) if t.is_floating_point()}
        self._constant_names = set(self._buffer_values) - self._overridable
        return self._compile(graph, set(presets), folded, presets=presets, inputs=self.input_names)

    def _compile(
        self,
        graph: onnx.GraphProto,
        visible: set[str],
        folded: set[int],
        *,
        presets: list[str] | None = None,
        inputs: tuple[str, ...] | None = None,
    ) -> Plan:
        free = sorted(free_names(graph, folded)) if presets is None else []
        formal = tuple(i.name for i in graph.input) if inputs is None else inputs
        known = visible | set(formal) | set(free)
        inner = known | {name for n in graph.node for name in n.output}
        entries = []
        aliases: dict[str, str] = {}
        for node in order_nodes(graph.node, known, lambda n: self._reads(n, folded)):
            if id(node) in folded:
                continue
            if _is_alias(node) and ("", "Identity") not in self._table.overridden:
                aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
                continue
            handler, ctx = self._prepared[id(node)]
            outer: set[str] = set()
            for sub in _graph_attributes(ctx):  # the very objects the handler will pass to run_graph
                self._compile(sub, inner, folded)
                outer |= free_names(sub, folded)
            names = [aliases.get(n, n) for n in node.input]
            names = [self._rewired.get((id(node), slot), name) for slot, name in enumerate(names)]
            entry = Entry(node, names, list(node.output), handler, ctx, frozenset(outer))
            entries.append(specialize(entry, self._constant_values, self._table.overridden))
        if ("", "MatMul") not in self._table.overridden and ("", "Add") not in self._table.overridden:
            entries = fuse_linear(entries, self._preset_shapes, keep={o.name for o in graph.output})
        entries = cache_shape_arithmetic(entries, self._constant_names)
        plan = build_plan(
            entries,
            inputs=formal,
            outputs=[o.name for o in graph.output],
            presets=presets or (),
            free_vars=free,
            aliases=aliases,
        )
        self._plans[id(graph)] = (graph, plan)
        return plan

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


def _graph_attributes(ctx: NodeContext) -> Iterator[onnx.GraphProto]:
    for value in ctx.attrs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, onnx.GraphProto):
                yield item


def _is_alias(node: onnx.NodeProto) -> bool:
    """An Identity node: its output is its input, so it needs no step of its own."""
    return node.op_type == "Identity" and _norm_domain(node.domain) == "" and len(node.input) == 1 and bool(node.input[0])
