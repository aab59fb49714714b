"""Hostile ONNX files: memory bombs of a few hundred bytes, lying tensor headers, malicious external-data entries.

Each builder returns a small ``onnx.ModelProto`` (or writes a file next to its external data) that a careless
converter would turn into gigabytes of memory, minutes of work or a traceback. The sizes are chosen far beyond any
sane limit, so a converter that checks before it allocates refuses them at once, whatever its configured limits.

Example:
    >>> proto = range_bomb()
    >>> len(proto.SerializeToString()) < 1000
    True
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
HUGE = 1 << 30  # elements: 4 GiB of float32, 8 GiB of int64: allocatable on a big machine, so it must be refused
SIDE = 1 << 15  # HUGE == SIDE * SIDE


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list | None = None,
           opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _i64(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _f32(name: str, values: list[float]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.float32), name)


def _scalars(**values: int) -> list[TensorProto]:
    return [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in values.items()]


def _x(shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, shape or [1, 4])


def _y(elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", elem, None)


def _plus_x(nodes: list[onnx.NodeProto], bomb: str) -> list[onnx.NodeProto]:
    """Make the bomb live: y = x + ReduceSum(bomb), so a converter cannot drop it as unused."""
    return [*nodes, helper.make_node("ReduceSum", [bomb], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"])]


# -- constant-folding bombs: every input is constant, so a folding converter computes them while loading -----------
def range_bomb() -> onnx.ModelProto:
    """Range(0, 2**30, 1): a 300-byte file asking for 8 GiB of int64."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT)]
    return _model(_plus_x(nodes, "rf"), [_x()], [_y()], _scalars(start=0, limit=HUGE, delta=1))


def tile_bomb() -> onnx.ModelProto:
    """Tile of a 4-element constant 2**28 times."""
    nodes = [helper.make_node("Tile", ["c", "reps"], ["t"])]
    return _model(_plus_x(nodes, "t"), [_x()], [_y()], [_f32("c", [1, 2, 3, 4]), _i64("reps", [HUGE // 4])])


def constant_of_shape_bomb() -> onnx.ModelProto:
    """ConstantOfShape([2**15, 2**15]): 4 GiB of zeros."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["z"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))]
    return _model(_plus_x(nodes, "z"), [_x()], [_y()], [_i64("shape", [SIDE, SIDE])])


def cos_of_huge_constant() -> onnx.ModelProto:
    """Cos(Expand(1.0, [2**15, 2**15])): the elementwise op on a huge constant computed at load."""
    nodes = [helper.make_node("Expand", ["one", "shape"], ["e"]), helper.make_node("Cos", ["e"], ["c"])]
    return _model(_plus_x(nodes, "c"), [_x()], [_y()], [_f32("one", [1.0]), _i64("shape", [SIDE, SIDE])])


def pad_bomb() -> onnx.ModelProto:
    """Pad of a 4-element constant to 2**30 elements."""
    nodes = [helper.make_node("Pad", ["c", "pads"], ["p"])]
    return _model(_plus_x(nodes, "p"), [_x()], [_y()], [_f32("c", [1, 2, 3, 4]), _i64("pads", [0, HUGE])])


def resize_bomb() -> onnx.ModelProto:
    """Resize of a 1x1x2x2 constant by 2**14 along both spatial axes."""
    nodes = [helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest")]
    c = numpy_helper.from_array(np.ones((1, 1, 2, 2), np.float32), "c")
    return _model(_plus_x(nodes, "r"), [_x()], [_y()], [c, _f32("scales", [1, 1, SIDE // 2, SIDE // 2])])


def concat_bomb() -> onnx.ModelProto:
    """Concat of one 4-million-element constant with itself 4,000 times (64 GB)."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["z"]),
             helper.make_node("Concat", ["z"] * 4000, ["cat"], axis=0)]
    return _model(_plus_x(nodes, "cat"), [_x()], [_y()], [_i64("shape", [1 << 22])])


def broadcast_bomb() -> onnx.ModelProto:
    """Add of a [2**17, 1] and a [1, 2**17] constant: 2**34 elements from two 512 KB operands."""
    nodes = [helper.make_node("ConstantOfShape", ["sa"], ["a"]), helper.make_node("ConstantOfShape", ["sb"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["ab"])]
    return _model(_plus_x(nodes, "ab"), [_x()], [_y()], [_i64("sa", [1 << 17, 1]), _i64("sb", [1, 1 << 17])])


def gather_bomb() -> onnx.ModelProto:
    """Gather of a [1, 2**15] constant by 2**15 zero indices: 2**30 elements from two 256 KiB operands."""
    zero = helper.make_tensor("v", TensorProto.INT64, [1], [0])
    nodes = [helper.make_node("ConstantOfShape", ["sd"], ["data"]),
             helper.make_node("ConstantOfShape", ["si"], ["idx"], value=zero),
             helper.make_node("Gather", ["data", "idx"], ["g"], axis=0)]
    return _model(_plus_x(nodes, "g"), [_x()], [_y()], [_i64("sd", [1, SIDE]), _i64("si", [SIDE])])


def sparse_constant_bomb() -> onnx.ModelProto:
    """A Constant node whose sparse value declares 2**30 dense elements and stores one."""
    values = numpy_helper.from_array(np.array([1.0], np.float32), "v")
    indices = numpy_helper.from_array(np.array([0], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [HUGE])
    nodes = [helper.make_node("Constant", [], ["c"], sparse_value=sparse)]
    return _model(_plus_x(nodes, "c"), [_x()], [_y()])


# -- bombs that only go off when the model runs ----------------------------------------------------------------------
def runtime_expand_bomb() -> onnx.ModelProto:
    """Expand(x, [2**15, 2**15]) of the graph input: nothing to fold, the forward pass would make 4 GiB."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"])]
    return _model(_plus_x(nodes, "e"), [_x([1, 1])], [_y()], [_i64("shape", [SIDE, SIDE])])


def runtime_tile_bomb() -> onnx.ModelProto:
    """Tile(x, repeats) with repeats from the graph input's shape times a huge constant (data-dependent size)."""
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Mul", ["sx", "k"], ["reps"]),
             helper.make_node("Tile", ["x", "reps"], ["t"])]
    return _model(_plus_x(nodes, "t"), [_x([1, 1])], [_y()], [_i64("k", [SIDE, SIDE])])


def declared_input_bomb() -> onnx.ModelProto:
    """A graph input declared as [2**15, 2**15] floats: a verifier that feeds random data of that shape explodes."""
    return _model([helper.make_node("Relu", ["x"], ["y"])], [_x([SIDE, SIDE])], [_y()])


def loop_bomb() -> onnx.ModelProto:
    """A Loop with a trip count of 2**40 whose body emits a scan output each time: it would run for days and keep
    every step."""
    def info(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"]),
         helper.make_node("Identity", ["v_in"], ["scan"])], "body",
        [info("iter", TensorProto.INT64, []), info("cond_in", TensorProto.BOOL, []), info("v_in", TensorProto.FLOAT, None)],
        [info("cond_out", TensorProto.BOOL, []), info("v_out", TensorProto.FLOAT, None), info("scan", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Loop", ["M", "cond", "x"], ["final", "scans"], body=body, name="loop")]
    inits = [numpy_helper.from_array(np.array(1 << 40, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond")]
    return _model(_plus_x(nodes, "scans"), [_x()], [_y()], inits)


# -- work bombs: bounded memory, but careless code is slow -------------------------------------------------------------
def reversed_chain(n: int = 3000) -> onnx.ModelProto:
    """``n`` Relu nodes in a chain, listed in reverse order (a quadratic sort takes minutes)."""
    names = ["x", *[f"h{i}" for i in range(1, n)], "y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]], name=f"n{i}") for i in range(n)]
    return _model(nodes[::-1], [_x()], [_y()])


def dead_bombs() -> onnx.ModelProto:
    """Range and ConstantOfShape bombs whose outputs nothing reads, next to a plain y = Relu(x)."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["dead_r"]),
             helper.make_node("ConstantOfShape", ["shape"], ["dead_z"]),
             helper.make_node("Relu", ["x"], ["y"])]
    inits = [*_scalars(start=0, limit=HUGE, delta=1), _i64("shape", [SIDE, SIDE])]
    return _model(nodes, [_x()], [_y()], inits)


def fold_chain(n: int = 400, numel: int = 1 << 21) -> onnx.ModelProto:
    """A chain of ``n`` Cos nodes over an 8 MB constant: folding all of it keeps 3 GB unless a budget stops it."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c0"])]
    nodes += [helper.make_node("Cos", [f"c{i}"], [f"c{i + 1}"]) for i in range(n)]
    nodes += [helper.make_node("Sum", [f"c{i}" for i in range(n + 1)], ["all"])]
    return _model(_plus_x(nodes, "all"), [_x()], [_y()], [_i64("shape", [numel])])


# -- tensors whose header lies about their bytes -----------------------------------------------------------------------
def _with_tensor(tensor: TensorProto) -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", tensor.name], ["y"])]
    return _model(nodes, [_x()], [_y()], [tensor])


def negative_dims() -> onnx.ModelProto:
    t = _f32("w", [1, 2, 3, 4])
    t.ClearField("dims")
    t.dims.extend([-2, -2])
    return _with_tensor(t)


def overflowing_dims() -> onnx.ModelProto:
    """Dims whose product wraps around to 0 in int64 (2**32 * 2**32), with no data."""
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 32, 1 << 32], raw_data=b"")
    return _with_tensor(t)


def huge_dims_typed_field() -> onnx.ModelProto:
    """A float tensor declaring 2**30 elements and holding 3 in ``float_data``."""
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[HUGE], float_data=[1.0, 2.0, 3.0])
    return _with_tensor(t)


def short_raw_data() -> onnx.ModelProto:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4], raw_data=b"\0" * 12)
    return _with_tensor(t)


def unknown_data_type() -> onnx.ModelProto:
    t = TensorProto(name="w", data_type=999, dims=[1, 4], raw_data=b"\0" * 16)
    return _with_tensor(t)


def unknown_data_type_in_attribute() -> onnx.ModelProto:
    value = TensorProto(name="v", data_type=999, dims=[1], raw_data=b"\0" * 4)
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])]
    return _model(nodes, [_x()], [_y()])


def string_attribute_bomb() -> onnx.ModelProto:
    """A Constant holding one string but declaring 2**30 of them."""
    value = TensorProto(name="s", data_type=TensorProto.STRING, dims=[HUGE], string_data=[b"a"])
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Relu", ["x"], ["y"])]
    return _model(nodes, [_x()], [_y()])


def input_type_999() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", 999, [1, 4])
    return _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_y()])


def _external(location: str, **entries: str) -> onnx.ModelProto:
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, **entries}.items():
        t.external_data.add(key=key, value=value)
    return _with_tensor(t)


def external_nul_byte() -> onnx.ModelProto:
    return _external("weights\0.bin")


def external_negative_offset() -> onnx.ModelProto:
    return _external("weights.bin", offset="-5", length="16")


def external_negative_length() -> onnx.ModelProto:
    return _external("weights.bin", offset="0", length="-16")


def external_huge_length() -> onnx.ModelProto:
    """A length of 2**50 bytes against a 16-byte file: a reader that trusts it allocates a petabyte."""
    return _external("weights.bin", offset="0", length=str(1 << 50))


def external_escape() -> onnx.ModelProto:
    return _external("../outside.bin")


#: name -> builder, for the cases a loader must refuse with one sentence (exit 2).
REFUSED: dict[str, Callable[[], onnx.ModelProto]] = {
    "range_bomb": range_bomb,
    "tile_bomb": tile_bomb,
    "constant_of_shape_bomb": constant_of_shape_bomb,
    "cos_of_huge_constant": cos_of_huge_constant,
    "pad_bomb": pad_bomb,
    "resize_bomb": resize_bomb,
    "concat_bomb": concat_bomb,
    "broadcast_bomb": broadcast_bomb,
    "gather_bomb": gather_bomb,
    "sparse_constant_bomb": sparse_constant_bomb,
    "negative_dims": negative_dims,
    "overflowing_dims": overflowing_dims,
    "huge_dims_typed_field": huge_dims_typed_field,
    "short_raw_data": short_raw_data,
    "unknown_data_type": unknown_data_type,
    "unknown_data_type_in_attribute": unknown_data_type_in_attribute,
    "string_attribute_bomb": string_attribute_bomb,
    "input_type_999": input_type_999,
    "external_nul_byte": external_nul_byte,
    "external_negative_offset": external_negative_offset,
    "external_negative_length": external_negative_length,
    "external_huge_length": external_huge_length,
    "external_escape": external_escape,
}


#: name -> builder, for the files that load but whose forward pass must be refused (``inspect --verify``, exit 2).
REFUSED_WHEN_RUN: dict[str, Callable[[], onnx.ModelProto]] = {
    "runtime_expand_bomb": runtime_expand_bomb,
    "runtime_tile_bomb": runtime_tile_bomb,
    "declared_input_bomb": declared_input_bomb,
}

#: name -> builder, for hostile files that must load quickly, in little memory (exit 0).
ACCEPTED: dict[str, Callable[[], onnx.ModelProto]] = {
    "dead_bombs": dead_bombs,
    "fold_chain": fold_chain,
    "reversed_chain": reversed_chain,
}


def write(proto: onnx.ModelProto, folder: Path, name: str) -> Path:
    """Save ``proto`` as ``folder/name.onnx`` next to a 16-byte ``weights.bin`` (for the external-data cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = folder / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


# -- running the command line on them ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """How a ``modscope`` process ended: exit code, output streams, and its peak resident memory in bytes."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss: int


def run_modscope(*args: str | os.PathLike, env: dict[str, str] | None = None, address_space: int = 3 << 30,
                 cpu_seconds: int = 120) -> Outcome:
    """Run ``python -m modscope ARGS`` from this checkout under an address-space and CPU-time limit.

    The address-space limit keeps a bomb that slips through from taking the machine down (it then fails inside
    the process instead); the peak RSS is the operating system's account of that one child (``wait4``).
    """
    root = Path(__file__).resolve().parents[2]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **(env or {})}
    return _run([sys.executable, "-m", "modscope", *map(str, args)], full_env, address_space, cpu_seconds)


def _run(cmd: list[str], env: dict[str, str], address_space: int = 3 << 30, cpu_seconds: int = 120) -> Outcome:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Outcome(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       usage.ru_maxrss * 1024)


def one_sentence(text: str) -> bool:
    """Whether ``text`` is a single line holding a single sentence and no traceback."""
    line = text.strip()
    return bool(line) and "\n" not in line and "Traceback" not in line and not re.search(r"[.!?]\s+[A-Z]", line)


def run_cli_captured(argv: list[str]) -> tuple[int, io.StringIO, io.StringIO]:
    """The CLI's ``main(argv)`` in this process: its exit code and what it wrote; an escaping exception (a bug the
    test reports) becomes code -1 with its traceback as stderr."""
    from modscope.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - recorded: the test fails on it
            code, err = -1, io.StringIO(traceback.format_exc())
    return code, out, err


def _batch_main(spec_path: str) -> None:
    """Inside the limited child: run each case of the spec through the CLI's ``main`` and the API, record how each
    ended (exit code, stdout, stderr, exception class names) into the spec's ``out`` file."""
    import json

    import modscope

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for case in spec["cases"]:
        code, out, err = run_cli_captured(case["argv"])
        api: list[str] = []
        try:
            model = modscope.load(case["argv"][1])
            if case.get("forward"):
                import onnx
                import torch

                from modscope.converters.verify import random_inputs

                feeds = random_inputs(onnx.load(case["argv"][1], load_external_data=False))
                model.module(*[torch.from_numpy(v) for v in feeds.values()])
        except Exception as exc:  # noqa: BLE001 - the class names are what the test checks
            api = [c.__name__ for c in type(exc).__mro__]
        results[case["name"]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "api": api}
    Path(spec["out"]).write_text(json.dumps(results))


def run_batch(cases: list[dict], folder: Path, **limits: int) -> tuple[dict[str, dict], Outcome]:
    """Run many cases in one limited child (one interpreter start for all): ``{name: result}`` and the child's
    outcome, whose ``peak_rss`` bounds every case's.

    Each case is ``{"name": ..., "argv": ["inspect", path, ...], "forward": bool}``; ``forward`` also runs the
    loaded model on random inputs through the API.
    """
    import json

    spec, out = folder / "batch.json", folder / "batch-results.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import onnx_hostile as h; h._batch_main({str(spec)!r})"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    outcome = _run([sys.executable, "-c", code], env, **limits)
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, outcome
