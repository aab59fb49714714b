"""Transformer and LSTM files quantized by onnxruntime's tools load, match onnxruntime, keep their weights
maskable as dequantized floats, train masks under vmap and write back ablated files that onnxruntime runs.

The float files come from ``contrib_models.py`` (BERT, GPT-2, CLIP and ViT fused by ``optimize_model``; an
LSTM classifier) and are quantized three ways (`contrib_models.QUANTIZERS`): ``quantize_dynamic`` (MatMulInteger,
QAttention, QEmbedLayerNormalization, DynamicQuantizeLSTM), that file as onnxruntime's graph optimizer saves it
(DynamicQuantizeMatMul, MatMulIntegerToFloat) and the 4-bit ``MatMulNBitsQuantizer`` (MatMulNBits).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import modscope
from modscope.converters.export import export_masked

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("onnxruntime.transformers.optimizer")

from contrib_cases import (
    assert_loss_reaches_every_matrix,
    assert_outputs_close,
    run_ort,
    run_torch,
)
from contrib_models import (
    FAMILIES,
    QUANTIZERS,
    export_family,
    export_lstm,
    quantize_file,
)

#: operators each quantizer must have written into the files (at least one of each).
_EXPECTED_OPS = {
    "dynamic": {"MatMulInteger"},
    "dynamic_optimized": {"DynamicQuantizeMatMul"},
    "nbits": {"MatMulNBits"},
}
#: onnxruntime's quantized LSTM rounds the hidden state of as many examples together as its thread chunks hold
#: (modscope: each example alone) and saturates pairwise sums of full-range int8 weights; batches of several
#: examples match within 1e-2, one example to float rounding (checked separately). Every other file: 1e-4.
_TOLERANCE = {"lstm": 1e-2}

CASES = [(name, how) for name in FAMILIES for how in QUANTIZERS] + [("lstm", "dynamic"), ("lstm", "dynamic_optimized")]


@pytest.fixture(scope="session")
def quantized_files(tmp_path_factory: pytest.TempPathFactory):
    """(name, how) -> (float file, quantized file, inputs), made on first use."""
    floats: dict = {}
    cache: dict = {}

    def get(name: str, how: str):
        if name not in floats:
            folder = tmp_path_factory.mktemp(f"q_{name}")
            if name == "lstm":
                path, inputs = export_lstm(folder)
            else:
                if FAMILIES[name].needs:
                    pytest.importorskip(FAMILIES[name].needs)
                _, path, inputs = export_family(FAMILIES[name], folder)
            floats[name] = (path, inputs, folder)
        path, inputs, folder = floats[name]
        if (name, how) not in cache:
            cache[(name, how)] = (path, quantize_file(path, how, folder), inputs)
        return cache[(name, how)]

    return get


def _elements(model: modscope.Model) -> Counter:
    counts: Counter = Counter()
    for w in model.weights:
        counts[w.kind] += int(np.prod(w.shape))
    return counts


@pytest.mark.parametrize("name,how", CASES)
def test_quantized_file_matches_onnxruntime_with_every_float_weight_maskable(name: str, how: str, quantized_files):
    source, path, inputs = quantized_files(name, how)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    expected = {"DynamicQuantizeLSTM"} if name == "lstm" else _EXPECTED_OPS[how]
    assert expected <= ops, f"the quantizer wrote {sorted(ops)}"
    model = modscope.load(path)
    assert_outputs_close(run_torch(model, inputs), run_ort(path, inputs), _TOLERANCE.get(name, 1e-4))
    one = {k: v[:1] for k, v in inputs.items()}
    assert_outputs_close(run_torch(model, one), run_ort(path, one), 1e-4)
    assert _elements(model) == _elements(modscope.load(source))


@pytest.mark.parametrize("name,how", CASES)
def test_masks_train_on_the_quantized_file_with_vmap(name: str, how: str, quantized_files) -> None:
    _, path, feeds = quantized_files(name, how)
    model = modscope.load(path)
    xs = tuple(torch.from_numpy(feeds[n]) for n in model.module.input_names)
    output = FAMILIES[name].output if name in FAMILIES else None
    target = torch.from_numpy(run_torch(model, feeds)[output or 0]) + 0.1
    task = modscope.Task("t", xs, target, loss="mse", metric="mse", output=output)
    config = modscope.MaskConfig(n_steps=2, batch_size=8, n_samples=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = modscope.train_masks(model, [task], config, progress=False)
    assert masks.extra["vectorize"] == "vmap"
    assert_loss_reaches_every_matrix(model, feeds, output or 0)


@pytest.mark.parametrize("name,how", CASES)
def test_ablated_quantized_file_runs_in_onnxruntime_like_the_masked_model(name: str, how: str, quantized_files,
                                                                          tmp_path: Path) -> None:
    _, path, inputs = quantized_files(name, how)
    model = modscope.load(path)
    gen = torch.Generator().manual_seed(4)
    keep = {w.name: torch.rand(w.shape, generator=gen) > 0.3 for w in model.weights}
    out = export_masked(model, keep, tmp_path / "ablated.onnx")
    params = model.parameters()
    zeroed = {n: torch.where(k, params[n], torch.zeros(())) for n, k in keep.items()}
    assert_outputs_close(run_torch(model, inputs, zeroed), run_ort(out, inputs), _TOLERANCE.get(name, 1e-4))
    written = {t.name: t for t in onnx.load(out).graph.initializer}
    original = {t.name: t for t in onnx.load(path).graph.initializer}
    assert {n: t.data_type for n, t in written.items()} == {n: t.data_type for n, t in original.items()}


def _float_name(source_name: str) -> str:
    """The float file's name of a quantized weight (the quantizers append these suffixes)."""
    for suffix in ("_quantized", "_Transposed", "_Q4", "_Q8", "_Q2"):
        source_name = source_name.removesuffix(suffix)
    return source_name


def _gradients(model: modscope.Model, inputs: dict[str, np.ndarray], output: int) -> dict[str, torch.Tensor]:
    """d(sum of output * fixed random weights)/d(weight), by source name."""
    params = {w.name: p.clone().requires_grad_(True) for w, p in zip(model.weights, model.parameters().values())}
    named = {k: torch.from_numpy(v) for k, v in inputs.items() if k in model.module.input_names}
    out = torch.func.functional_call(model.module, params, (), named, strict=False)
    out = out[output] if isinstance(out, tuple) else out
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * probe).sum().backward()
    return {w.source_name: params[w.name].grad for w in model.weights if params[w.name].grad is not None}


@pytest.mark.parametrize("name,how", CASES)
def test_weight_gradients_of_the_quantized_file_follow_the_float_file(name: str, how: str, quantized_files) -> None:
    """Gradients reach every weight matrix through the quantized activations (straight through their rounding), in
    the direction the float file's gradients point (cosine 0.93 or more here; where a uint8 activation cut them,
    the cosines fell to 0.3 and below)."""
    source, path, inputs = quantized_files(name, how)
    output = (FAMILIES[name].output if name in FAMILIES else None) or 0
    float_grads = _gradients(modscope.load(source), inputs, output)
    model = modscope.load(path)
    grads = _gradients(model, inputs, output)
    compared = 0
    for w in model.weights:
        reference = float_grads.get(_float_name(w.source_name))
        if w.kind != "weight" or reference is None:
            continue
        got = grads[w.source_name]
        if got.shape != reference.shape or "_Transposed" in w.source_name:
            got = got.transpose(-1, -2)
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
        assert float(cosine) > 0.9, (w.source_name, float(cosine))
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("name,how", [("bert", "dynamic"), ("gpt2", "nbits"), ("lstm", "dynamic_optimized")])
def test_verify_accepts_quantized_files_on_its_own_random_inputs(name: str, how: str, quantized_files) -> None:
    """What ``modscope inspect --verify`` runs: random inputs made from the file's input types, one example each
    (onnxruntime's LSTM then rounds as modscope does)."""
    from modscope.converters.verify import verify

    _, path, _ = quantized_files(name, how)
    result = verify(modscope.load(path))
    assert result.ok, result.to_dict()
