"""Signal processing: DFT, STFT, HannWindow, HammingWindow, BlackmanWindow, MelWeightMatrix.

ONNX carries complex numbers as a trailing axis of size 2 (real, imaginary); real signals have a trailing axis of
size 1. The transforms use ``torch.fft`` and stay differentiable in the signal.
"""

from __future__ import annotations

import math

import torch

from ....errors import InvalidParameterError, ShapeError
from .util import as_int, normalize_axis, torch_dtype
from ..registry import NodeContext, OpSet

ops = OpSet()


def _to_complex(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) real or (..., 2) complex ONNX layout -> a torch tensor (real or complex) without the last axis."""
    if x.shape[-1] == 1:
        return x.squeeze(-1)
    if x.shape[-1] == 2:
        return torch.complex(x[..., 0], x[..., 1])
    raise ShapeError(f"a signal's last axis must have size 1 (real) or 2 (complex), got shape {tuple(x.shape)}")


def _from_complex(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A complex torch tensor -> the ONNX (..., 2) layout in ``dtype``."""
    if not z.is_complex():
        z = torch.complex(z, torch.zeros_like(z))
    return torch.view_as_real(z).to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@ops.register("DFT", since=17)
def dft(
    ctx: NodeContext,
    x: torch.Tensor,
    dft_length: torch.Tensor | None = None,
    axis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discrete Fourier transform along one signal axis (attribute ``axis`` before opset 20, input after).

    ``onesided=1`` gives the half spectrum of a real signal (RFFT) or, with ``inverse=1``, the real signal of a
    half spectrum (IRFFT, default length ``2 * (n - 1)``); ``dft_length`` zero-pads or truncates the signal.
    """
    if ctx.opset >= 20:
        axis_value = -2 if axis is None else as_int(axis)
    else:
        axis_value = int(ctx.attr("axis", 1))
    dim = normalize_axis(axis_value, x.dim())
    if dim == x.dim() - 1:
        raise InvalidParameterError(
            f"DFT node '{ctx.name}' has axis {axis_value}, the complex-number axis; pick a signal axis"
        )
    n = None if dft_length is None else as_int(dft_length)
    inverse, onesided = bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0))
    signal = _to_complex(x.to(_compute_dtype(x)))
    if onesided and inverse:
        return torch.fft.irfft(signal, n=n, dim=dim).unsqueeze(-1).to(x.dtype)
    if onesided:
        if signal.is_complex():
            raise InvalidParameterError(f"DFT node '{ctx.name}' asks for a one-sided forward DFT of a complex signal")
        return _from_complex(torch.fft.rfft(signal, n=n, dim=dim), x.dtype)
    transform = torch.fft.ifft if inverse else torch.fft.fft
    return _from_complex(transform(signal, n=n, dim=dim), x.dtype)


@ops.register("STFT", since=17)
def stft(
    ctx: NodeContext,
    signal: torch.Tensor,
    frame_step: torch.Tensor,
    window: torch.Tensor | None = None,
    frame_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Short-time Fourier transform of signal (batch, length, 1|2) -> (batch, frames, bins, 2)."""
    step = as_int(frame_step)
    length = as_int(frame_length) if frame_length is not None else None
    if length is None:
        length = window.shape[0] if window is not None else signal.shape[1]
    if window is not None and window.shape[0] != length:
        raise ShapeError(f"STFT node '{ctx.name}' has a window of {window.shape[0]} samples but frame_length {length}")
    z = _to_complex(signal.to(_compute_dtype(signal)))  # (batch, length)
    frames = z.unfold(1, length, step)  # (batch, frames, length)
    if window is not None:
        frames = frames * window.to(frames.real.dtype if frames.is_complex() else frames.dtype)
    onesided = bool(ctx.attr("onesided", 1)) and not frames.is_complex()
    spectrum = torch.fft.rfft(frames, dim=-1) if onesided else torch.fft.fft(frames, dim=-1)
    return _from_complex(spectrum, signal.dtype)


def _cosine_window(ctx: NodeContext, size: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """``sum_k (-1)^k a_k cos(2 pi k n / N)`` with N = size (periodic) or size - 1 (symmetric)."""
    n_points = as_int(size)
    periodic = bool(ctx.attr("periodic", 1))
    denominator = n_points if periodic else n_points - 1
    n = torch.arange(n_points, dtype=torch.float64)
    phase = 2 * math.pi * n / max(denominator, 1)
    window = torch.zeros_like(n)
    for k, a in enumerate(coefficients):
        window = window + (-1) ** k * a * torch.cos(k * phase)
    return window.to(torch_dtype(ctx.attr("output_datatype", 1)))


@ops.register("HannWindow", since=17)
def hann_window(ctx: NodeContext, size: torch.Tensor) -> torch.Tensor:
    """Hann window ``0.5 - 0.5 cos(2 pi n / N)``."""
    return _cosine_window(ctx, size, (0.5, 0.5))


@ops.register("HammingWindow", since=17)
def hamming_window(ctx: NodeContext, size: torch.Tensor) -> torch.Tensor:
    """Hamming window with ONNX's coefficients 25/46 and 21/46."""
    return _cosine_window(ctx, size, (25 / 46, 21 / 46))


@ops.register("BlackmanWindow", since=17)
def blackman_window(ctx: NodeContext, size: torch.Tensor) -> torch.Tensor:
    """Blackman window ``0.42 - 0.5 cos(2 pi n / N) + 0.08 cos(4 pi n / N)``."""
    return _cosine_window(ctx, size, (0.42, 0.5, 0.08))


@ops.register("MelWeightMatrix", since=17)
def mel_weight_matrix(
    ctx: NodeContext,
    num_mel_bins: torch.Tensor,
    dft_length: torch.Tensor,
    sample_rate: torch.Tensor,
    lower_edge_hertz: torch.Tensor,
    upper_edge_hertz: torch.Tensor,
) -> torch.Tensor:
    """Triangular mel filters (peak 1) mapping ``dft_length // 2 + 1`` spectrum bins to ``num_mel_bins`` bands.

    Band edges are ``num_mel_bins + 2`` points evenly spaced on ``mel(f) = 2595 log10(1 + f / 700)`` (step
    ``range / (num_mel_bins + 2)``), each mapped to the spectrum bin ``floor((dft_length + 1) * f / sample_rate)``.
    """
    n_mel, n_fft, rate = as_int(num_mel_bins), as_int(dft_length), as_int(sample_rate)
    low_mel = 2595 * math.log10(1 + float(lower_edge_hertz) / 700)
    high_mel = 2595 * math.log10(1 + float(upper_edge_hertz) / 700)
    mels = torch.arange(n_mel + 2, dtype=torch.float64) * ((high_mel - low_mel) / (n_mel + 2)) + low_mel
    hertz = 700 * (torch.pow(10.0, mels / 2595) - 1)
    edges = torch.floor((n_fft + 1) * hertz / rate).long()
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    j = torch.arange(n_fft // 2 + 1).unsqueeze(1)
    rise_width, fall_width = (center - lower).clamp(min=1), (upper - center).clamp(min=1)
    rise = torch.where(center == lower, 1.0, (j - lower) / rise_width)
    fall = (upper - j) / fall_width
    in_rise = (j >= lower) & (j <= center)
    in_fall = (j >= center) & (j < upper)
    weights = torch.where(in_fall, fall, torch.where(in_rise, rise.to(torch.float64), 0.0))
    return weights.to(torch_dtype(ctx.attr("output_datatype", 1)))
