"""Transformer files fused by onnxruntime's optimizer load, match onnxruntime, keep their weights maskable, train
masks under vmap and write back ablated files that onnxruntime runs.

The files are made the way users make them (``contrib_models.py``): a small BERT, GPT-2 and CLIP text encoder
(``transformers``) and a ViT (plain torch) with random weights, exported with ``torch.onnx.export`` and fused by
``onnxruntime.transformers.optimizer.optimize_model``. They are generated once per test session.
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

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.transformers.optimizer")

from contrib_cases import assert_loss_reaches_every_matrix
from contrib_models import FAMILIES, export_family


@pytest.fixture(scope="session")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (unfused path, fused path, inputs), exported on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if FAMILIES[name].needs:
                pytest.importorskip(FAMILIES[name].needs)
            cache[name] = export_family(FAMILIES[name], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _run_torch(model: modscope.Model, feeds: dict[str, np.ndarray], params: dict | None = None) -> list[np.ndarray]:
    named = {k: torch.from_numpy(v) for k, v in feeds.items() if k in model.module.input_names}
    with torch.no_grad():
        out = torch.func.functional_call(model.module, params or {}, (), named, strict=False)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _assert_close(got: list[np.ndarray], expected: list[np.ndarray], rtol: float = 1e-4) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        scale = float(np.abs(e).max()) or 1.0
        np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_file_uses_contrib_ops_and_matches_onnxruntime(name: str, family_files) -> None:
    _, fused, feeds = family_files(name)
    ops = {n.op_type for n in onnx.load(fused).graph.node if n.domain == "com.microsoft"}
    assert FAMILIES[name].fused_ops <= ops, f"optimize_model did not fuse {FAMILIES[name].fused_ops - ops}"
    model = modscope.load(fused)
    _assert_close(_run_torch(model, feeds), _run_ort(fused, feeds))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_file_has_the_maskable_weights_of_the_unfused_export(name: str, family_files) -> None:
    plain, fused, _ = family_files(name)

    def elements(path: Path) -> Counter:
        counts: Counter = Counter()
        for w in modscope.load(path).weights:
            counts[w.kind] += int(np.prod(w.shape))
        return counts

    before, after = elements(plain), elements(fused)
    assert before["weight"] > 0 and after == before


@pytest.mark.parametrize("name", list(FAMILIES))
def test_masks_train_on_the_fused_file_with_vmap(name: str, family_files) -> None:
    _, fused, feeds = family_files(name)
    model = modscope.load(fused)
    _train_without_fallback(model, feeds, name, mask_norms=True, mask_biases=True)
    assert_loss_reaches_every_matrix(model, feeds, FAMILIES[name].output or 0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ablated_fused_file_runs_in_onnxruntime_like_the_masked_model(name: str, family_files, tmp_path: Path) -> None:
    _, fused, feeds = family_files(name)
    _assert_ablated_file_runs_like_the_masked_model(modscope.load(fused), onnx.load(fused), feeds, tmp_path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_half_precision_fused_file_matches_onnxruntime_and_exports(name: str, tmp_path: Path) -> None:
    """optimize_model's float16 conversion: fp16 weights and contrib ops, float32 inputs and outputs."""
    if FAMILIES[name].needs:
        pytest.importorskip(FAMILIES[name].needs)
    _, fused, feeds = export_family(FAMILIES[name], tmp_path, float16=True)
    model = modscope.load(fused)
    assert {w.shape for w in model.weights} and all(model.module.get_parameter(w.name).dtype == torch.float16
                                                    for w in model.weights if w.kind == "weight")
    _assert_close(_run_torch(model, feeds), _run_ort(fused, feeds), rtol=5e-3)
    gen = torch.Generator().manual_seed(3)
    keep = {w.name: torch.rand(w.shape, generator=gen) > 0.3 for w in model.weights}
    out = export_masked(model, keep, tmp_path / "ablated.onnx")
    params = model.parameters()
    zeroed = {n: torch.where(k, params[n], torch.zeros((), dtype=params[n].dtype)) for n, k in keep.items()}
    _assert_close(_run_ort(out, feeds), _run_torch(model, feeds, zeroed), rtol=5e-3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_verify_accepts_fused_files_on_its_own_random_inputs(name: str, family_files) -> None:
    """What ``modscope inspect --verify`` runs on the fused file: random inputs from its input types."""
    from modscope.converters.verify import verify

    _, fused, _ = family_files(name)
    result = verify(modscope.load(fused))
    assert result.ok, result.to_dict()


def _elements(model: modscope.Model) -> Counter:
    counts: Counter = Counter()
    for w in model.weights:
        counts[w.kind] += int(np.prod(w.shape))
    return counts


@pytest.mark.parametrize("rewrite", ["constants", "if_branch"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_weights_in_constant_nodes_or_an_if_branch(name: str, rewrite: str, family_files, tmp_path: Path) -> None:
    """The unfused export rewritten as paddle2onnx/OpenVINO write files (every weight a Constant node), or moved into
    an If branch: same outputs as onnxruntime, the same maskable elements, masks train with vmap, and the ablated
    file keeps its structure and runs in onnxruntime like the masked model."""
    from onnx_rewrites import as_constants, in_if_branch

    plain, _, feeds = family_files(name)
    proto = as_constants(onnx.load(plain)) if rewrite == "constants" else in_if_branch(onnx.load(plain))
    path = tmp_path / f"{name}_{rewrite}.onnx"
    onnx.save(proto, path)
    feeds = {**feeds, "flag": np.array(True)} if rewrite == "if_branch" else feeds
    model = modscope.load(path)
    _assert_close(_run_torch(model, feeds), _run_ort(path, feeds))
    reference = _elements(modscope.load(plain))
    assert _elements(model) == (reference if rewrite == "constants" else Counter({k: 2 * v for k, v in reference.items()}))

    if rewrite == "constants":  # (the If's condition is one scalar, not a per-example input a Task can hold)
        _train_without_fallback(model, feeds, name)
    _assert_ablated_file_runs_like_the_masked_model(model, proto, feeds, tmp_path)


def _train_without_fallback(model: modscope.Model, feeds: dict[str, np.ndarray], name: str, **config) -> None:
    """Two steps of one task's mask under vmap; any warning (the loop fallback's) fails."""
    inputs = tuple(torch.from_numpy(feeds[n]) for n in model.module.input_names)
    output = FAMILIES[name].output
    target = torch.from_numpy(_run_torch(model, feeds)[output or 0]) + 0.1
    task = modscope.Task("t", inputs, target, loss="mse", metric="mse", output=output)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = modscope.train_masks(model, [task], modscope.MaskConfig(n_steps=2, batch_size=8, n_samples=2, seed=0,
                                                                        **config), progress=False)
    assert masks.extra["vectorize"] == "vmap"


def _assert_ablated_file_runs_like_the_masked_model(model: modscope.Model, source: onnx.ModelProto,
                                                    feeds: dict[str, np.ndarray], folder: Path) -> None:
    """Random masks written back: onnxruntime on the file equals the model with those weights zeroed, and the file
    keeps the source's operators."""
    gen = torch.Generator().manual_seed(3)
    keep = {w.name: torch.rand(w.shape, generator=gen) > 0.3 for w in model.weights}
    out = export_masked(model, keep, folder / "ablated.onnx")
    params = model.parameters()
    zeroed = {n: torch.where(k, params[n], torch.zeros(())) for n, k in keep.items()}
    _assert_close(_run_ort(out, feeds), _run_torch(model, feeds, zeroed))
    assert [n.op_type for n in onnx.load(out).graph.node] == [n.op_type for n in source.graph.node]
