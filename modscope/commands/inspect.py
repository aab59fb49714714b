"""`modscope inspect`: what a model file holds — format, inputs and outputs, operators, maskable weights per layer."""

from __future__ import annotations

import argparse
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
    from ..converters.inspect import describe

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
