"""`modscope inspect`: what a model file holds — format, inputs and outputs, operators, maskable weights per layer."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from ._common import add_model_options, model_options, print_json, text_table

HELP = "show a model's format, inputs/outputs, operators and maskable weights; --verify against onnxruntime"
DESCRIPTION = """\
Show what modscope reads from a model file: its format, the ONNX opset or torch version, the inputs and outputs with
their shapes, the operators it uses, and its maskable weights per layer (and which of them a default MaskConfig
masks). --verify runs the converted model and the ONNX file in onnxruntime on the same random inputs and compares
the outputs; the exit code is 1 when they differ."""
EXAMPLE = "modscope inspect model.onnx --verify"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model file")
    p.add_argument("--verify", action="store_true", help="compare the converted model with onnxruntime (ONNX files)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE|NAME=FILE.npy",
                   help="with --verify: the shape of a random input (e.g. x=1x3x224x224) or an array to feed; "
                        "repeat per input (default: shapes derived from the file)")
    p.add_argument("--json", action="store_true", help="print the description as JSON (with schema_version) on stdout")
    add_model_options(p)


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
        from ..converters.torchscript import read_script

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
    from ..converters.onnx.constants import describe_places

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


def describe(model: Any) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-ready data."""
    from ..converters.files import FORMAT_NAMES

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


def _shape(value: dict[str, Any]) -> str:
    shape = value["shape"]
    return "unknown shape" if shape is None else "(" + ", ".join(map(str, shape)) + ")" + f" {value['dtype']}"


def print_text(info: dict[str, Any]) -> None:
    version = f", opset {info['opset']}" if info["opset"] else ""
    torch_version = info["details"].get("torch")
    version += f", torch {torch_version}" if torch_version else ""
    print(f"{info['path']}\n  format: {info['format_name']}{version}\n  sha256: {info['checksum']}")
    for key in ("inputs", "outputs"):
        values = info[key]
        print(f"  {key}: " + ("not recorded in the file" if values is None else
                              "; ".join(f"{v['name']} {_shape(v)}" for v in values) or "none"))
    ops = info["operators"]
    print("  operators: " + (", ".join(f"{op} x{n}" for op, n in ops.items()) or "none"))
    print(f"\nMaskable weights: {info['n_weights']:,} ({info['n_masked_by_default']:,} masked by default)")
    rows = [[layer["layer"], ", ".join(sorted({w["kind"] for w in layer["weights"]})),
             "; ".join("x".join(map(str, w["shape"])) for w in layer["weights"]), layer["n_weights"], layer["n_masked"]]
            for layer in info["layers"]]
    print(text_table(["layer", "kind", "shapes", "weights", "masked by default"], rows))
    _print_storage(info.get("storage"))
    verify = info.get("verify")
    if verify:
        verdict = "outputs agree" if verify["ok"] else "OUTPUTS DIFFER"
        print(f"\nVerify against onnxruntime {verify['onnxruntime_version']} ({verify['provider']}): {verdict} "
              f"(rtol {verify['rtol']:g}, atol {verify['atol']:g})")
        print(text_table(["output", "shape", "max abs diff", "max rel diff", "ok"],
                         [[o["name"], "x".join(map(str, o["shape"])), o["max_abs_diff"], o["max_rel_diff"], o["ok"]]
                          for o in verify["outputs"]]))


def _print_storage(storage: dict[str, Any] | None) -> None:
    if storage is None:
        return
    found = ", ".join(f"{n} {where}" for where, n in storage["found_in"].items()) or "nowhere"
    coverage = storage["coverage"]
    share = ("" if coverage is None else
             f"; they hold {coverage:.1%} of the file's {storage['float_elements_rank2']:,} float elements in tensors "
             "of rank >= 2")
    print(f"\nWeights found in: {found}{share}")
    if not storage["found_in"]:
        print("  No tensor of this file is used as a weight: nothing feeds a Conv, Gemm, MatMul, recurrent, "
              "normalization or embedding input.")
    for t in storage["not_weights"][:10]:
        print(f"  not a weight: {t['name']} ({'x'.join(map(str, t['shape']))}, {t['where']}): {t['why']}")
    if len(storage["not_weights"]) > 10:
        print(f"  ... and {len(storage['not_weights']) - 10} more (--json lists them all)")


def parse_inputs(specs: list[str]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """``NAME=FILE.npy`` and ``NAME=SHAPE`` (``1x3x224x224`` or ``1,3,224,224``) as arrays and shapes by name.

    Example:
        >>> parse_inputs(["x=1x3x8x8", "mask=2,5"])[1]
        {'x': (1, 3, 8, 8), 'mask': (2, 5)}
    """
    import numpy as np

    from ..errors import DataError, InvalidParameterError

    arrays: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise InvalidParameterError(f"--input {spec!r} is not NAME=SHAPE or NAME=FILE.npy")
        if value.endswith(".npy"):
            try:
                arrays[name] = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"--input {name}: {value} cannot be read as a .npy array ({exc})") from exc
            continue
        try:
            dims = tuple(int(d) for d in value.replace(",", "x").split("x"))
        except ValueError:
            dims = ()
        if not dims or any(d < 0 for d in dims):
            raise InvalidParameterError(f"--input {name}: {value!r} is not a shape like 1x3x224x224 nor a .npy file")
        shapes[name] = dims
    return arrays, shapes


def run(args: argparse.Namespace) -> int:
    from ..converters import load

    model = load(args.model, **model_options(args))
    info = describe(model)
    ok = True
    if args.input and not args.verify:
        from ..errors import InvalidParameterError

        raise InvalidParameterError("--input only applies with --verify")
    if args.verify:
        from ..converters.verify import verify

        arrays, shapes = parse_inputs(args.input)
        result = verify(model, inputs=arrays or None, shapes=shapes or None)
        info["verify"] = result.to_dict()
        ok = result.ok
    if args.json:
        print_json(info)
    else:
        print_text(info)
    return 0 if ok else 1
