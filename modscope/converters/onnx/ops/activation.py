"""Activations, the softmax family and Dropout.

Every handler is a differentiable torch expression of the ONNX formula with the node's attributes (defaults as the
ONNX spec gives them), so gradients reach float weights (PRelu's slope, for one) and the handlers run under
``torch.func.vmap``. Where a formula has a branch that can overflow (the exponential of Selu), the unused branch is
computed on clamped values so it cannot turn the gradient into NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .util import normalize_axis
from ..registry import NodeContext, OpSet

ops = OpSet()

Tensor = torch.Tensor

_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875

# float16/bfloat16 softmax is computed step by step in the input's precision, as ONNX's function body does, so it
# rounds like the reference; torch's fused kernel rounds once and differs from it by an ulp.
_HALF_TYPES = (torch.float16, torch.bfloat16)


# -- rectifiers -----------------------------------------------------------------------------------------------------
@ops.register("Relu")
def relu(ctx: NodeContext, x: Tensor) -> Tensor:
    """max(x, 0)."""
    return torch.relu(x)


@ops.register("LeakyRelu")
def leaky_relu(ctx: NodeContext, x: Tensor) -> Tensor:
    """x for x >= 0, ``alpha`` * x (alpha 0.01) otherwise."""
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@ops.register("PRelu")
def prelu(ctx: NodeContext, x: Tensor, slope: Tensor) -> Tensor:
    """x for x >= 0, ``slope`` * x otherwise; ``slope`` broadcasts to x (before opset 7 a 1-D slope is per channel).
    """
    if ctx.opset < 7 and slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape(-1, *([1] * (x.dim() - 2)))
    return torch.where(x >= 0, x, x * slope)


@ops.register("ThresholdedRelu", since=10)
def thresholded_relu(ctx: NodeContext, x: Tensor) -> Tensor:
    """x for x > ``alpha`` (1.0), 0 otherwise."""
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros_like(x))


@ops.register("Shrink", since=9)
def shrink(ctx: NodeContext, x: Tensor) -> Tensor:
    """x + ``bias`` below -``lambd``, x - ``bias`` above ``lambd``, 0 between (bias 0, lambd 0.5)."""
    bias, lambd = ctx.attr("bias", 0.0), ctx.attr("lambd", 0.5)
    out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x, dtype=torch.float)))
    return out.to(x.dtype)


# -- exponential units ----------------------------------------------------------------------------------------------
@ops.register("Elu")
def elu(ctx: NodeContext, x: Tensor) -> Tensor:
    """x for x >= 0, ``alpha`` * (exp(x) - 1) otherwise (alpha 1.0)."""
    return F.elu(x, ctx.attr("alpha", 1.0))


@ops.register("Selu")
def selu(ctx: NodeContext, x: Tensor) -> Tensor:
    """``gamma`` * (x for x > 0, ``alpha`` * (exp(x) - 1) otherwise), with the SELU paper's constants as defaults."""
    alpha, gamma = ctx.attr("alpha", _SELU_ALPHA), ctx.attr("gamma", _SELU_GAMMA)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x.clamp(max=0)))


@ops.register("Celu", since=12)
def celu(ctx: NodeContext, x: Tensor) -> Tensor:
    """max(0, x) + min(0, ``alpha`` * (exp(x / alpha) - 1)) (alpha 1.0)."""
    return F.celu(x, ctx.attr("alpha", 1.0))


# -- smooth activations ---------------------------------------------------------------------------------------------
def _plain(fn: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def handler(ctx: NodeContext, x: Tensor) -> Tensor:
        return fn(x)

    handler.__doc__ = f"Element-wise ``{fn.__module__}.{fn.__name__}``."
    return handler


ops.register("Sigmoid")(_plain(torch.sigmoid))
ops.register("Tanh")(_plain(torch.tanh))
ops.register("Softplus")(_plain(F.softplus))
ops.register("Softsign")(_plain(F.softsign))
ops.register("Mish", since=18)(_plain(F.mish))
ops.register("HardSwish", since=14)(_plain(F.hardswish))


@ops.register("HardSigmoid")
def hard_sigmoid(ctx: NodeContext, x: Tensor) -> Tensor:
    """max(0, min(1, ``alpha`` * x + ``beta``)) (alpha 0.2, beta 0.5)."""
    return (ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5)).clamp(0, 1)


def _swish(x: Tensor, alpha: float) -> Tensor:
    return x * torch.sigmoid(alpha * x)


@ops.register("Swish", since=24)
def swish(ctx: NodeContext, x: Tensor) -> Tensor:
    """x * sigmoid(``alpha`` * x) (alpha 1.0)."""
    return _swish(x, ctx.attr("alpha", 1.0))


@ops.register("SwiGLU", since=28)
def swiglu(ctx: NodeContext, gate: Tensor, value: Tensor) -> Tensor:
    """Swish(``gate``) * ``value`` with Swish's ``alpha`` (1.0)."""
    return _swish(gate, ctx.attr("alpha", 1.0)) * value


@ops.register("Gelu", since=20)
def gelu(ctx: NodeContext, x: Tensor) -> Tensor:
    """0.5 * x * (1 + erf(x / sqrt 2)), or its tanh approximation when ``approximate`` is "tanh"."""
    return F.gelu(x, approximate="tanh" if ctx.attr("approximate", "none") == "tanh" else "none")


# -- softmax family -------------------------------------------------------------------------------------------------
def _along_axis(ctx: NodeContext, x: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``fn(x, dim)`` with the opset's axis rule: from opset 13 along ``axis`` (default -1); before, on x coerced
    to 2-D as [prod(shape[:axis]), prod(shape[axis:])] (default axis 1) and reshaped back."""
    if ctx.opset >= 13:
        return fn(x, ctx.attr("axis", -1))
    if x.dim() == 0:
        return fn(x.reshape(1), 0).reshape(x.shape)
    axis = normalize_axis(ctx.attr("axis", 1), x.dim())
    return fn(x.flatten(start_dim=axis), -1).reshape(x.shape)


def _hardmax(x: Tensor, dim: int) -> Tensor:
    """1 at the first maximum along ``dim``, 0 elsewhere."""
    return torch.zeros_like(x).scatter(dim, x.argmax(dim, keepdim=True), 1)


def _softmax(x: Tensor, dim: int) -> Tensor:
    if x.dtype not in _HALF_TYPES:
        return torch.softmax(x, dim)
    shifted = torch.exp(x - x.amax(dim, keepdim=True))
    return shifted / shifted.sum(dim, keepdim=True)


def _log_softmax(x: Tensor, dim: int) -> Tensor:
    if x.dtype not in _HALF_TYPES:
        return torch.log_softmax(x, dim)
    shifted = x - x.amax(dim, keepdim=True)
    return shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))


@ops.register("Softmax")
def softmax(ctx: NodeContext, x: Tensor) -> Tensor:
    """exp(x) normalised to sum 1 along ``axis`` (see `_along_axis` for the opset rules)."""
    return _along_axis(ctx, x, _softmax)


@ops.register("LogSoftmax")
def log_softmax(ctx: NodeContext, x: Tensor) -> Tensor:
    """log(softmax(x)) along ``axis``."""
    return _along_axis(ctx, x, _log_softmax)


@ops.register("Hardmax")
def hardmax(ctx: NodeContext, x: Tensor) -> Tensor:
    """One-hot of the first maximum along ``axis``."""
    return _along_axis(ctx, x, _hardmax)


# -- dropout --------------------------------------------------------------------------------------------------------
@ops.register("Dropout")
def dropout(ctx: NodeContext, x: Tensor, *_: Any) -> Tensor | tuple[Tensor, Tensor]:
    """The identity, with a mask of ones as the optional second output (bool from opset 10, x's type before).

    modscope evaluates graphs in inference mode, so ``ratio``, ``training_mode``, ``is_test`` and ``seed`` are
    read by nobody: a frozen network's dropout is off.
    """
    if ctx.n_outputs < 2:
        return x
    return x, torch.ones_like(x, dtype=torch.bool if ctx.opset >= 10 else x.dtype)
