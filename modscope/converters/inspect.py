"""What a model holds, as JSON-ready data: its format, inputs and outputs, operators (ONNX, torch.fx and TorchScript
graphs, or a module's layers), maskable weights per layer and, for ONNX files, where the weights are stored.

`describe` is what ``modscope inspect`` prints (the command only formats it); an ONNX file is read once for its
inputs, operators and weight storage.

Example:
    >>> import torch, modscope
    >>> info = describe(modscope.load(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())))
    >>> info["format"], info["n_weights"], info["operators"]
    ('torch', 16, {'Linear': 1, 'ReLU': 1})
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..model import Model


# -- inputs, outputs and operators ------------------------------------------------------------------------------------
def _onnx_io(proto: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    inits = {i.name for i in proto.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim] if t.HasField("shape") else None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        return {"name": value.name, "shape": dims, "dtype": dtype}

    return [describe(v) for v in proto.graph.input if v.name not in inits], [describe(v) for v in proto.graph.output]


def _onnx_operators(graph: Any, counts: Counter[str] | None = None) -> Counter[str]:
    """Operator counts over the graph and its sub-graphs (If/Loop/Scan bodies)."""
    counts = counts if counts is not None else Counter()
    for node in graph.node:
        counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _onnx_operators(sub, counts)
    return counts


def _fx_io_and_ops(module: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter[str]]:
    def describe(name: str, val: Any) -> dict[str, Any]:
        shape = [int(d) if str(d).isdigit() else str(d) for d in val.shape] if hasattr(val, "shape") else None
        return {"name": name, "shape": shape, "dtype": str(getattr(val, "dtype", "?")).replace("torch.", "")}

    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    ops: Counter[str] = Counter()
    for node in module.graph.nodes:
        if node.op == "placeholder":
            inputs.append(describe(node.name, node.meta.get("val")))
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], tuple | list) else (node.args[0],)
            outputs += [describe(getattr(r, "name", f"output{i}"), getattr(r, "meta", {}).get("val")) for i, r in enumerate(results)]
        elif node.op == "call_function":
            ops[str(node.target).removeprefix("aten.").removesuffix(".default")] += 1
        elif node.op == "call_module":
            ops[type(module.get_submodule(node.target)).__name__] += 1
    return inputs, outputs, ops


def _onnx_file(model: Any) -> Any | None:
    """The ONNX file the model was read from, without its external data (None for other sources)."""
    if model.source.format != "onnx" or not model.source.path:
        return None
    import onnx

    return onnx.load(model.source.path, load_external_data=False)


def io_and_operators(model: Any, proto: Any | None = None) -> tuple[list[dict[str, Any]] | None,
                                                                     list[dict[str, Any]] | None, dict[str, int]]:
    """The model's inputs and outputs (None where the file does not record them) and its operator counts; ``proto``
    is the model's ONNX file when the caller has read it already."""
    import torch

    src = model.source
    proto = proto if proto is not None else _onnx_file(model)
    if proto is not None:
        inputs, outputs = _onnx_io(proto)
        return inputs, outputs, dict(_onnx_operators(proto.graph).most_common())
    if isinstance(model.module, torch.fx.GraphModule):
        inputs, outputs, ops = _fx_io_and_ops(model.module)
        return inputs, outputs, dict(ops.most_common())
    if src.format == "torchscript" and src.path:
        from .torchscript import read_script

        script = read_script(src.path)  # stdout kept clean of the archive's own prints
        kinds = Counter(n.kind().removeprefix("aten::") for n in script.inlined_graph.nodes() if n.kind().startswith("aten::"))
        names = [i.debugName() for i in list(script.graph.inputs())[1:]]  # the first input is the module itself
        return [{"name": n, "shape": None, "dtype": "?"} for n in names], None, dict(kinds.most_common())
    leaves = Counter(type(m).__name__ for m in model.module.modules() if not list(m.children()))
    return None, None, dict(leaves.most_common())  # a state_dict or a pickled module records no input shapes


# -- weights ----------------------------------------------------------------------------------------------------------
def layers(model: Any) -> list[dict[str, Any]]:
    """The maskable weights grouped by layer, and whether a default MaskConfig masks them."""
    from ..errors import InvalidParameterError
    from ..masks.config import MaskConfig
    from ..masks.selection import select_weights

    try:
        masked = {w.name for w in select_weights(model, MaskConfig())}
    except InvalidParameterError:
        masked = set()
    out: dict[str, dict[str, Any]] = {}
    for w in model.weights:
        layer = out.setdefault(w.layer, {"layer": w.layer, "weights": [], "n_weights": 0, "n_masked": 0})
        layer["weights"].append({"name": w.source_name, "shape": list(w.shape), "kind": w.kind, "masked": w.name in masked})
        layer["n_weights"] += w.numel
        layer["n_masked"] += w.numel if w.name in masked else 0
    return list(out.values())


def weight_storage(model: Any, proto: Any | None) -> dict[str, Any] | None:
    """For an ONNX file (``proto``, the model's file): where the maskable weights are stored, how much of the file's
    float tensors of rank >= 2 they cover, and the float tensors of rank >= 2 that are not weights (None without a
    file)."""
    if proto is None:
        return None
    from .onnx.constants import describe_places

    places = describe_places(proto.graph)
    maskable = {w.source_name for w in model.weights}
    found = Counter(f"{'sub-graph ' if p.in_subgraph else ''}{p.where}s" for p in places if p.key in maskable)
    matrices = [p for p in places if p.float and len(p.shape) >= 2]
    covered = sum(p.numel for p in matrices if p.key in maskable)
    total = sum(p.numel for p in matrices)
    return {
        "found_in": dict(found.most_common()),
        "float_elements_rank2": total,
        "coverage": covered / total if total else None,
        "not_weights": [{"name": p.key, "shape": list(p.shape), "where": p.where,
                         "why": "no node computes with it as a weight (a table, mask or constant input)"}
                        for p in matrices if p.key not in maskable],
    }


def describe(model: Model) -> dict[str, Any]:
    """Everything ``modscope inspect`` shows, as JSON-ready data.

    Args:
        model: a loaded model (`modscope.load`).

    Returns:
        ``path``, ``format``, ``format_name``, ``checksum``, ``opset``, ``details``, ``inputs`` and ``outputs``
        (lists of ``{name, shape, dtype}``, or None where the file records none), ``operators`` (name -> count),
        ``n_weights``, ``n_masked_by_default``, ``layers`` (`layers`) and ``storage`` (`weight_storage`).
    """
    from .files import FORMAT_NAMES

    src = model.source
    proto = _onnx_file(model)  # read once for the inputs, operators and weight storage
    inputs, outputs, ops = io_and_operators(model, proto)
    by_layer = layers(model)
    return {
        "path": src.path,
        "format": src.format,
        "format_name": FORMAT_NAMES.get(src.format, src.format),
        "checksum": src.checksum,
        "opset": src.opset,
        "details": dict(src.details),
        "inputs": inputs,
        "outputs": outputs,
        "operators": ops,
        "n_weights": sum(layer["n_weights"] for layer in by_layer),
        "n_masked_by_default": sum(layer["n_masked"] for layer in by_layer),
        "layers": by_layer,
        "storage": weight_storage(model, proto),
    }
