"""Whole models through the ONNX converter.

1. The real-model files shipped in the onnx package (``onnx/backend/test/data/{light,simple,pytorch-converted,
   pytorch-operator}``) load and match their stored outputs (rtol 1e-3, atol 1e-5: the stored outputs come from
   other runtimes, and the light models chain hundreds of convolutions).
2. The exporter matrix: models exported here from torch (TorchScript and dynamo exporters, opsets 13 to 20, with and
   without constant folding) and from scikit-learn (skl2onnx) load, match onnxruntime within 1e-4 relative (atol
   1e-5 for values near zero), pass gradients to every weight, and give under ``torch.func.vmap`` over stacked
   weight sets what a loop over the sets gives. The default run takes a representative slice; the full matrix is
   marked slow (``pytest -m slow tests/test_onnx_models.py``).

Needs ``onnxruntime``; the dynamo exporter needs ``onnxscript`` and the scikit-learn cases ``skl2onnx`` (each
skipped when missing).
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import modscope

ort = pytest.importorskip("onnxruntime")

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
STORED_TOL = {"rtol": 1e-3, "atol": 1e-5}
ORT_TOL = {"rtol": 1e-4, "atol": 1e-5}

#: backend models that are not numeric networks: string inputs, or training-only operators.
NOT_NN = {
    "test_gradient_of_add": "uses the training-only Gradient operator",
    "test_gradient_of_add_and_mul": "uses the training-only Gradient operator",
}
#: light models small enough for the default run (the others take seconds each and run with -m slow).
QUICK_LIGHT = {"light_squeezenet", "light_shufflenet"}


# -- 1. models shipped with onnx ----------------------------------------------------------------------------------
def _model_dirs() -> list:
    found = []
    for group in ("simple", "pytorch-converted", "pytorch-operator"):
        for folder in sorted((DATA / group).glob("*/")):
            if (folder / "model.onnx").is_file() and folder.name not in NOT_NN:
                found.append(pytest.param(folder, id=f"{group}/{folder.name}"))
    return found


def _read_value(path: Path, type_proto: onnx.TypeProto) -> object:
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(path.read_bytes())
        return [torch.from_numpy(np.array(a)) for a in numpy_helper.to_list(proto)]
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(path.read_bytes())
        value = numpy_helper.to_optional(proto)
        return None if value is None else torch.from_numpy(np.array(value))
    proto = onnx.TensorProto()
    proto.ParseFromString(path.read_bytes())
    return torch.from_numpy(np.array(numpy_helper.to_array(proto)))


def _assert_matches(out: object, expected: object, tol: dict, where: str) -> None:
    if isinstance(expected, list):
        assert isinstance(out, list) and len(out) == len(expected), where
        for o, e in zip(out, expected):
            _assert_matches(o, e, tol, where)
        return
    assert isinstance(out, torch.Tensor), where
    expected = torch.as_tensor(expected)
    assert out.shape == expected.shape and out.dtype == expected.dtype, (where, out.shape, expected.shape)
    if expected.is_floating_point():
        torch.testing.assert_close(out.detach(), expected, **tol, equal_nan=True, msg=where)
    else:
        assert torch.equal(out, expected), where


def _is_string_model(proto: onnx.ModelProto) -> bool:
    io_values = list(proto.graph.input) + list(proto.graph.output)
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.STRING for v in io_values)


@pytest.mark.parametrize("folder", _model_dirs())
def test_shipped_model_matches_stored_outputs(folder: Path):
    proto = onnx.load(folder / "model.onnx")
    if _is_string_model(proto):
        pytest.skip("string tensors are out of scope for a torch converter")
    model = modscope.load(folder / "model.onnx")
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    data_sets = sorted(folder.glob("test_data_set_*"))
    assert data_sets
    for data in data_sets:
        feeds = [_read_value(data / f"input_{k}.pb", i.type) for k, i in enumerate(inputs)]
        expected = [_read_value(data / f"output_{k}.pb", o.type) for k, o in enumerate(proto.graph.output)]
        with torch.no_grad():
            outs = model(*feeds)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        for k, (out, exp) in enumerate(zip(outs, expected)):
            _assert_matches(out, exp, STORED_TOL, f"{folder.name} {data.name} output {k}")


def _light_models() -> list:
    found = []
    for path in sorted((DATA / "light").glob("light_*.onnx")):
        marks = () if path.stem in QUICK_LIGHT else (pytest.mark.slow,)
        found.append(pytest.param(path, id=path.stem, marks=marks))
    return found


@pytest.mark.parametrize("path", _light_models())
def test_light_model_matches_stored_output(path: Path):
    # onnx's runner feeds arange(n) / n in the input's shape and stores the reference output beside the model
    proto = onnx.load(path)
    model = modscope.load(path)
    inits = {t.name for t in proto.graph.initializer}
    (graph_input,) = [i for i in proto.graph.input if i.name not in inits]
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in graph_input.type.tensor_type.shape.dim]
    n = int(np.prod(shape))
    x = torch.from_numpy((np.arange(n).reshape(shape) / n).astype(np.float32))
    expected = _read_value(path.with_name(f"{path.stem}_output_0.pb"), proto.graph.output[0].type)
    with torch.no_grad():
        out = model(x)
    _assert_matches(out if isinstance(out, torch.Tensor) else out[0], expected, STORED_TOL, path.stem)


# -- 2. the exporter matrix ---------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(6, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class Audio1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 8, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def _randomized(module: nn.Module) -> nn.Module:
    """Distinct values everywhere, as in a trained model (exporters merge equal tensors, e.g. fresh clones)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=gen)
            tensor.copy_(0.5 + noise if name.endswith("running_var") else tensor + 0.1 * noise)
    return module.eval()


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "mlp": lambda: (nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(5, 10),)),
    "cnn_bn": lambda: (ConvBN(), (torch.randn(2, 3, 16, 16),)),
    "lstm": lambda: (RecurrentClassifier(nn.LSTM), (torch.randn(2, 7, 6),)),
    "gru": lambda: (RecurrentClassifier(nn.GRU), (torch.randn(2, 7, 6),)),
    "transformer": lambda: (Encoder(), (torch.randint(0, 20, (2, 9)),)),
    "residual": lambda: (Residual(), (torch.randn(2, 4, 8, 8),)),
    "audio1d": lambda: (Audio1d(), (torch.randn(2, 1, 128),)),
    "embedding": lambda: (Bag(), (torch.randint(0, 30, (3, 5)),)),
}
EXPORTERS = ("torchscript", "dynamo")
OPSETS = range(13, 21)
DEFAULT_SLICE = {
    *[(name, "torchscript", 17, True) for name in ZOO],
    ("cnn_bn", "torchscript", 13, False),
    ("transformer", "torchscript", 20, False),
    ("mlp", "dynamo", 18, True),
}


def _matrix() -> list:
    cases = []
    for name, exporter, opset, fold in itertools.product(ZOO, EXPORTERS, OPSETS, (True, False)):
        marks = () if (name, exporter, opset, fold) in DEFAULT_SLICE else (pytest.mark.slow,)
        label = f"{name}-{exporter}-opset{opset}-{'fold' if fold else 'nofold'}"
        cases.append(pytest.param(name, exporter, opset, fold, id=label, marks=marks))
    return cases


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...], exporter: str, opset: int, fold: bool) -> bytes:
    buffer = io.BytesIO()
    options = {"do_constant_folding": fold} if exporter == "torchscript" else {"optimize": fold}
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, inputs, buffer, dynamo=exporter == "dynamo", opset_version=opset, verbose=False, **options
            )
        except Exception as exc:  # noqa: BLE001 - the exporter's limits are not the converter's
            pytest.skip(f"torch cannot export this combination: {type(exc).__name__}: {str(exc)[:120]}")
    return buffer.getvalue()


def _run_ort(data: bytes, inputs: tuple) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(x) for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def check_converted(data: bytes, inputs: tuple, tmp_path: Path) -> modscope.Model:
    """Load ``data`` from a file and check parity with onnxruntime, gradients and vmap; return the model."""
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    model = modscope.load(path)
    expected = _run_ort(data, tuple(x.numpy() if isinstance(x, torch.Tensor) else x for x in inputs))
    tensors = tuple(torch.as_tensor(x) for x in inputs)
    outs = model(*tensors)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    assert len(outs) == len(expected)
    for k, (out, exp) in enumerate(zip(outs, expected)):
        _assert_matches(out, torch.from_numpy(np.array(exp)), ORT_TOL, f"output {k} vs onnxruntime")

    loss = sum(o.double().sum() for o in outs if o.is_floating_point())
    if model.weights:
        loss.backward()
    for w in model.weights:
        grad = model.module.get_parameter(w.name).grad
        assert grad is not None, f"no gradient reached {w.source_name}"
        assert torch.isfinite(grad).all(), f"the gradient of {w.source_name} is not finite"

    gen = torch.Generator().manual_seed(1)
    params = model.parameters()
    stacked = {k: torch.stack([v, v * (1 + 0.05 * torch.randn(v.shape, generator=gen))]) for k, v in params.items()}

    def run(p: dict) -> tuple:
        out = model.functional_call(p, *tensors)
        return tuple(out) if isinstance(out, tuple) else (out,)

    if not stacked:  # scikit-learn's linear models keep their coefficients in attributes: nothing to batch
        return model
    batched = torch.func.vmap(run)(stacked)
    for i in range(2):
        looped = run({k: v[i] for k, v in stacked.items()})
        for b, one in zip(batched, looped):
            torch.testing.assert_close(b[i], one, **ORT_TOL, msg=f"vmap weight set {i}")
    return model


@pytest.mark.parametrize("name, exporter, opset, fold", _matrix())
def test_exported_torch_model(name: str, exporter: str, opset: int, fold: bool, tmp_path: Path):
    torch.manual_seed(0)
    module, inputs = ZOO[name]()
    module = _randomized(module)
    data = _export(module, inputs, exporter, opset, fold)
    model = check_converted(data, inputs, tmp_path)
    assert model.weights, "a torch model's parameters must come out as weights"
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), module(*inputs), rtol=1e-4, atol=1e-5)
    kinds = {w.kind for w in model.weights}
    assert "weight" in kinds
    if name in ("transformer", "embedding"):
        assert "embedding" in kinds


# -- scikit-learn --------------------------------------------------------------------------------------------------
def _sklearn_models() -> dict[str, Callable[[], object]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "mlp_classifier": lambda: MLPClassifier(hidden_layer_sizes=(12,), max_iter=50, random_state=0),
        "scaler_logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
    }


@pytest.mark.parametrize("name", ["mlp_classifier", "scaler_logistic"])
def test_skl2onnx_model(name: str, tmp_path: Path):
    skl2onnx = pytest.importorskip("skl2onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5)
    estimator = _sklearn_models()[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator.fit(x, y)
        proto = skl2onnx.to_onnx(estimator, x[:1], options={"zipmap": False}, target_opset=17)
    model = check_converted(proto.SerializeToString(), (x[:7],), tmp_path)
    label, proba = model(torch.from_numpy(x[:7]))
    np.testing.assert_array_equal(label.numpy(), estimator.predict(x[:7]))
    np.testing.assert_allclose(proba.detach().numpy(), estimator.predict_proba(x[:7]), rtol=1e-4, atol=1e-5)
    if name == "mlp_classifier":
        assert {w.source_name for w in model.weights} == {"coefficient", "intercepts", "coefficient1", "intercepts1"}
