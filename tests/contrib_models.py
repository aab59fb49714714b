"""Small transformer models exported the way users export them, for the contrib-operator tests.

Each family (BERT, GPT-2 and CLIP's text encoder from ``transformers`` configs, a ViT in plain torch) builds a
tiny model with random weights (a ``transformers`` config, or plain torch in the classic
layout that onnxruntime's fusions recognise), exports it with ``torch.onnx.export`` (TorchScript exporter) and
fuses it with ``onnxruntime.transformers.optimizer.optimize_model`` for its model type. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """A model family: how to build and export it, and what fusing it must produce."""

    name: str
    model_type: str  # optimize_model's model_type
    build: Callable[[], tuple[nn.Module, dict[str, torch.Tensor]]]
    fused_ops: frozenset[str]  # com.microsoft operators the fused file must contain
    output: int | None  # which output the training test reads (None: the model has one)
    heads: int = 2
    hidden: int = 16
    needs: str = "transformers"  # the package the builder imports ("" for none)


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, so that no two initializers are equal (exporters store equal tensors once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def _text_inputs(batch: int, seq: int, vocab: int, *, segments: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq - 2 :] = 0  # right padding on every other row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if segments:
        inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    return inputs


class _Outputs(nn.Module):
    """A transformers model called with keyword inputs, returning the named outputs as a tuple."""

    def __init__(self, model: nn.Module, names: list[str], fields: tuple[str, ...]):
        super().__init__()
        self.model, self.names, self.fields = model, names, fields

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, inputs)))
        return tuple(getattr(out, f) for f in self.fields)


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, attn_implementation="eager",
    )
    inputs = _text_inputs(8, 7, 40, segments=True)
    model = _randomized(transformers.BertModel(config))
    return _Outputs(model, list(inputs), ("last_hidden_state", "pooler_output")), inputs


def _gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager", use_cache=False,
    )
    inputs = _text_inputs(8, 7, 40, segments=False)
    model = _randomized(transformers.GPT2LMHeadModel(config))
    return _Outputs(model, list(inputs), ("logits",)), inputs


def _clip() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=2,
        attn_implementation="eager",
    )
    inputs = _text_inputs(8, 7, 40, segments=False)
    model = _randomized(transformers.CLIPTextModel(config))
    return _Outputs(model, list(inputs), ("last_hidden_state", "pooler_output")), inputs


class _VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        context = (scores @ v).permute(0, 2, 1, 3).contiguous()
        return self.out(context.view(context.shape[0], context.shape[1], -1))


class _VitBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _VitAttention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class _Vit(nn.Module):
    """A ViT in the classic layout (patch Conv, class token, position table, pre-norm blocks, linear head)."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.ModuleList(_VitBlock(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(pixels.shape[0], -1, -1), patches], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    pixels = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return _randomized(_Vit()), {"pixel_values": pixels}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("bert", "bert", _bert, frozenset({"Attention", "EmbedLayerNormalization", "SkipLayerNormalization",
                                                 "BiasGelu"}), output=1),
        Family("gpt2", "gpt2", _gpt2, frozenset({"SkipLayerNormalization", "FastGelu"}), output=None),
        Family("clip", "clip", _clip, frozenset({"SkipLayerNormalization", "QuickGelu"}), output=1),
        Family("vit", "vit", _vit, frozenset({"Attention", "SkipLayerNormalization", "BiasGelu"}), output=None,
               needs=""),
    )
}


def export_family(
    family: Family, folder: Path, *, float16: bool = False
) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(unfused file, fused file, inputs by name) for ``family``, written into ``folder``; ``float16`` converts the
    fused file's weights and computations to half precision (inputs and outputs stay float32), as the optimizer's
    ``--float16`` option does."""
    from onnxruntime.transformers.optimizer import optimize_model

    module, inputs = family.build()
    plain = folder / f"{family.name}.onnx"
    fused = folder / f"{family.name}_fused.onnx"
    dynamic = {name: {0: "batch"} for name in inputs}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs.values()), str(plain), input_names=list(inputs), opset_version=17,
            dynamo=False, dynamic_axes=dynamic,
        )
        optimized = optimize_model(str(plain), model_type=family.model_type, num_heads=family.heads,
                                   hidden_size=family.hidden)
        if float16:
            optimized.convert_float_to_float16(keep_io_types=True)
            fused = folder / f"{family.name}_fused_fp16.onnx"
        optimized.save_model_to_file(str(fused))
    return plain, fused, {k: v.numpy() for k, v in inputs.items()}


class _Lstm(nn.Module):
    """A two-layer LSTM classifier over token embeddings."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 12, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def export_lstm(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A small LSTM classifier exported to ONNX (LSTM nodes), and its inputs."""
    tokens = torch.randint(0, 20, (8, 6), generator=torch.Generator().manual_seed(2))
    path = folder / "lstm.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_randomized(_Lstm()), (tokens,), str(path), input_names=["tokens"], opset_version=17,
                          dynamo=False, dynamic_axes={"tokens": {0: "batch"}})
    return path, {"tokens": tokens.numpy()}


#: how a float file is quantized: quantize_dynamic (MatMul -> MatMulInteger, Attention -> QAttention,
#: EmbedLayerNormalization -> QEmbedLayerNormalization, LSTM -> DynamicQuantizeLSTM), the same file as
#: onnxruntime's graph optimizer saves it (DynamicQuantizeMatMul), or the 4-bit MatMulNBits quantizer.
QUANTIZERS = ("dynamic", "dynamic_optimized", "nbits")


def quantize_file(source: Path, how: str, folder: Path) -> Path:
    """``source`` quantized ``how`` (one of `QUANTIZERS`), written into ``folder``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / f"{source.stem}_{how}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
        warnings.simplefilter("ignore")
        if how == "nbits":
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                MatMulNBitsQuantizer,
            )

            quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=16, is_symmetric=False)
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), False)
            return out
        dynamic = folder / f"{source.stem}_dynamic.onnx"
        quantize_dynamic(str(source), str(dynamic), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        if how == "dynamic":
            return dynamic
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(out)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(dynamic), options, providers=["CPUExecutionProvider"])
    return out


@contextlib.contextmanager
def _quiet_logging():
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
