"""onnxruntime's quantized contrib operators, one node at a time, against onnxruntime.

Their integer weights must load as float parameters of the dequantized values (of the float weight's shape: (K, N)
for MatMulNBits' packed nibbles), with gradients, under vmap, and be written back with removed elements set to
the zero point, so that onnxruntime runs the ablated file like modscope runs the masked model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from contrib_cases import Case, check, floats, rng

from modscope.converters.onnx.ops.contrib_quantized import (
    nbits_ablated,
    nbits_dequantize,
)


def _ints(gen: np.random.Generator, dtype: type, *shape: int, low: int | None = None, high: int | None = None):
    info = np.iinfo(dtype)
    return gen.integers(info.min if low is None else low, (info.max if high is None else high) + 1, shape).astype(dtype)


# -- DynamicQuantizeMatMul, MatMulIntegerToFloat --------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["int8_tensor", "uint8_column", "int8_no_zero_point", "batched_bias"])
def test_dynamic_quantize_matmul_matches_onnxruntime(variant: str, tmp_path: Path) -> None:
    gen = rng(11)
    k, n = 12, 5
    a = floats(gen, 2, 3, k) if variant == "batched_bias" else floats(gen, 4, k)
    if variant == "uint8_column":
        b, scale, zp = _ints(gen, np.uint8, k, n), (gen.random(n) * 0.05 + 0.01).astype(np.float32), _ints(gen, np.uint8, n, low=100, high=150)
    else:
        b, scale, zp = _ints(gen, np.int8, k, n, low=-63, high=63), np.array(0.03, np.float32), np.array(0, np.int8)
    inputs = [("a", a), ("b", b), ("b_scale", scale), ("b_zp", None if variant == "int8_no_zero_point" else zp)]
    weights = {"b": "weight"}
    if variant in ("int8_tensor", "batched_bias"):
        inputs.append(("bias", floats(gen, n)))
        weights["bias"] = "bias"
    case = Case("DynamicQuantizeMatMul", inputs, weights, constants=("b_scale", "b_zp"))
    check(case, rtol=1e-4, export_to=tmp_path)


@pytest.mark.parametrize("variant", ["tensor", "column_bias"])
def test_matmul_integer_to_float_matches_onnxruntime(variant: str, tmp_path: Path) -> None:
    gen = rng(12)
    k, n = 10, 6
    b_scale = np.array(0.02, np.float32) if variant == "tensor" else (gen.random(n) * 0.05 + 0.01).astype(np.float32)
    inputs = [("a", _ints(gen, np.uint8, 3, k)), ("b", _ints(gen, np.int8, k, n, low=-63, high=63)),
              ("a_scale", np.array(0.1, np.float32)), ("b_scale", b_scale), ("a_zp", np.array(128, np.uint8)),
              ("b_zp", np.zeros(b_scale.shape, np.int8))]
    weights = {"b": "weight"}
    if variant == "column_bias":
        inputs.append(("bias", floats(gen, n)))
        weights["bias"] = "bias"
    case = Case("MatMulIntegerToFloat", inputs, weights, constants=("a_scale", "b_scale", "a_zp", "b_zp"))
    check(case, rtol=1e-4, export_to=tmp_path)


# -- QAttention, QEmbedLayerNormalization ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "lengths", "causal"])
def test_q_attention_matches_onnxruntime(variant: str, tmp_path: Path) -> None:
    gen = rng(13)
    b, s, d = 2, 4, 8
    mask = np.array([4, 2], np.int32) if variant == "lengths" else None
    inputs = [("x", _ints(gen, np.uint8, b, s, d)), ("w", _ints(gen, np.int8, d, 3 * d, low=-63, high=63)),
              ("bias", floats(gen, 3 * d)), ("x_scale", np.array(0.02, np.float32)),
              ("w_scale", np.array(0.01, np.float32)), ("mask", mask), ("x_zp", np.array(128, np.uint8)),
              ("w_zp", np.array(0, np.int8))]
    attrs = {"num_heads": 2, "unidirectional": int(variant == "causal")}
    case = Case("QAttention", inputs, {"w": "weight", "bias": "bias"}, attrs, constants=("x_scale", "w_scale", "x_zp", "w_zp"))
    check(case, rtol=1e-4, export_to=tmp_path)


def test_q_embed_layer_normalization_matches_onnxruntime(tmp_path: Path) -> None:
    gen = rng(14)
    b, s, d = 2, 5, 8
    mask = np.ones((b, s), np.int32)
    mask[1, 3:] = 0
    tables = {"word": (10, d), "position": (7, d), "segment": (2, d), "gamma": (d,), "beta": (d,)}
    quantized = [(name, _ints(gen, np.uint8, *shape)) for name, shape in tables.items()]
    scales = [(f"{name}_scale", np.array(0.01 + 0.01 * i, np.float32)) for i, name in enumerate(tables)]
    zero_points = [(f"{name}_zp", np.array(120 + i, np.uint8)) for i, name in enumerate(tables)]
    inputs = [("ids", gen.integers(0, 10, (b, s)).astype(np.int32)),
              ("segments", (np.arange(s) >= 2).astype(np.int32)[None].repeat(b, 0)),
              *quantized, ("mask", mask), *scales, *zero_points]
    weights = {"word": "embedding", "position": "embedding", "segment": "embedding", "gamma": "norm", "beta": "bias"}
    constants = tuple(name for name, _ in scales + zero_points)
    case = Case("QEmbedLayerNormalization", inputs, weights, {"epsilon": 1e-5}, 2, int_outputs=(1,), constants=constants)
    check(case, rtol=1e-4, export_to=tmp_path)


# -- MatMulNBits ----------------------------------------------------------------------------------------------------
def _nbits_inputs(gen: np.random.Generator, k: int, n: int, block: int, bits: int, zero_points: bool):
    blocks = -(-k // block)
    codes = gen.integers(0, 1 << bits, (n, blocks * block))
    per_byte = 8 // bits
    packed = (codes.reshape(n, blocks, -1, per_byte) << (np.arange(per_byte) * bits)).sum(-1).astype(np.uint8)
    scales = (gen.random((n, blocks)) * 0.05 + 0.01).astype(np.float32)
    zp = None
    if zero_points:
        zp_codes = gen.integers(0, 1 << bits, (n, -(-blocks // per_byte) * per_byte))
        zp = (zp_codes.reshape(n, -1, per_byte) << (np.arange(per_byte) * bits)).sum(-1).astype(np.uint8)
    return packed, scales, zp


@pytest.mark.parametrize(
    "k,block,bits,zero_points,accuracy,bias",
    [(32, 16, 4, True, 0, False), (40, 16, 4, False, 0, True), (64, 32, 4, True, 4, False), (32, 16, 8, True, 0, False),
     (48, 16, 2, True, 0, False)],
)
def test_matmul_nbits_matches_onnxruntime(k, block, bits, zero_points, accuracy, bias, tmp_path: Path) -> None:
    gen = rng(15)
    n = 6
    packed, scales, zp = _nbits_inputs(gen, k, n, block, bits, zero_points)
    inputs = [("a", floats(gen, 2, 3, k)), ("b", packed), ("scales", scales), ("zp", zp), ("g_idx", None),
              ("bias", floats(gen, n) if bias else None)]
    while inputs[-1][1] is None:
        inputs.pop()
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy}
    weights = {"b": "weight", **({"bias": "bias"} if bias else {})}
    model = check(Case("MatMulNBits", inputs, weights, attrs, constants=("scales", "zp")), rtol=1e-4, export_to=tmp_path)
    assert model.weight("b").shape == (k, n)


def test_nbits_write_back_sets_removed_codes_to_their_block_zero_point() -> None:
    gen = rng(16)
    k, n, block = 40, 3, 16
    packed, scales, zp = _nbits_inputs(gen, k, n, block, 4, True)
    attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
    keep = gen.random((k, n)) > 0.5
    ablated = nbits_ablated(packed, keep, zp, attrs)
    before = nbits_dequantize(torch.from_numpy(packed), torch.from_numpy(scales), torch.from_numpy(zp), attrs)
    after = nbits_dequantize(torch.from_numpy(ablated), torch.from_numpy(scales), torch.from_numpy(zp), attrs)
    torch.testing.assert_close(after, torch.where(torch.from_numpy(keep), before, torch.zeros(())))
    assert ablated.shape == packed.shape and ablated.dtype == np.uint8


# -- DynamicQuantizeLSTM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_column", [False, True])
def test_dynamic_quantize_lstm_matches_onnxruntime(per_column: bool, tmp_path: Path) -> None:
    gen = rng(17)
    t, b, i, h = 5, 1, 4, 3  # one example: onnxruntime then rounds the hidden state as modscope does on any machine
    shape = (1, 4 * h) if per_column else (1,)
    w_scale, r_scale = [(gen.random(shape) * 0.02 + 0.02).astype(np.float32) for _ in range(2)]
    # 7-bit weights: onnxruntime's uint8 x int8 kernels saturate pairwise int16 sums of full-range values
    w, r = (_ints(gen, np.int8, 1, rows, 4 * h, low=-63, high=63) for rows in (i, h))
    inputs = [("x", floats(gen, t, b, i)), ("w", w), ("r", r),
              ("bias", floats(gen, 1, 8 * h, scale=0.1)), ("lens", None), ("h0", None), ("c0", None), ("p", None),
              ("w_scale", w_scale), ("w_zp", np.zeros(shape, np.int8)), ("r_scale", r_scale),
              ("r_zp", np.zeros(shape, np.int8))]
    case = Case("DynamicQuantizeLSTM", inputs, {"w": "weight", "r": "weight", "bias": "bias"}, {"hidden_size": h},
                3, constants=("w_scale", "w_zp", "r_scale", "r_zp"))
    check(case, rtol=1e-4, export_to=tmp_path)
