"""Batchable stand-ins for torch layers whose fused kernels ``torch.func.vmap`` cannot batch over weights.

Mask training runs K tasks x S samples of the network in one `torch.func.vmap` call. Three common torch layers
dispatch to fused kernels without a batching rule, which would force the slow loop over samples:

- ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``) with
  ``need_weights=False`` calls ``scaled_dot_product_attention``, whose CPU kernel has no batching rule. The stand-in
  asks for the weights, which takes torch's own matmul + softmax path, and drops them when they were not asked for.
- ``nn.LSTM`` and ``nn.GRU`` call ``aten::lstm``/``aten::gru``. The stand-in runs the recurrent layers the ONNX
  converter uses too (`modscope.recurrent`), written with plain tensor ops, on the module's own weights, reordered
  from torch's gate order to ONNX's.

`batchable_layers` installs the stand-ins as instance ``forward`` attributes and removes them on exit (also after an
error), so the user's module is as it was. Both are the same functions as the originals up to float rounding; layers
the stand-ins do not cover (an LSTM with ``proj_size``, packed sequences) keep their own forward.

Example:
    >>> import torch
    >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
    >>> x = torch.randn(2, 5, 3)
    >>> with batchable_layers(lstm):
    ...     y, _ = lstm(x)
    >>> torch.allclose(y, lstm(x)[0], atol=1e-6), "forward" in vars(lstm)
    (True, False)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: gate order of torch's fused weights -> the ONNX order the recurrent ops use (LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h).
_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2)}


@contextlib.contextmanager
def batchable_layers(module: nn.Module) -> Iterator[int]:
    """Give every covered layer of ``module`` a batchable forward while the block runs; yields how many.

    Args:
        module: the network; its MultiheadAttention, LSTM and GRU layers get the stand-ins.
    """
    patched: list[nn.Module] = []
    try:
        for m in module.modules():
            if "forward" in vars(m):  # someone already set an instance forward: leave it alone
                continue
            stand_in = _stand_in(m)
            if stand_in is not None:
                m.forward = functools.partial(stand_in, m)  # type: ignore[method-assign]
                patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            vars(m).pop("forward", None)


def _stand_in(m: nn.Module) -> Callable[..., Any] | None:
    if isinstance(m, nn.MultiheadAttention):
        return _attention
    if type(m) in (nn.LSTM, nn.GRU) and not getattr(m, "proj_size", 0):
        return _recurrent
    return None


def _attention(m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
               attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
               is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, weights = nn.MultiheadAttention.forward(
        m, query, key, value, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
        average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    return out, (weights if need_weights else None)


def _recurrent(m: nn.LSTM | nn.GRU, x: Any, hx: Any = None) -> Any:
    if not isinstance(x, torch.Tensor):  # a PackedSequence: torch's own kernel
        return type(m).forward(m, x, hx)
    from . import recurrent

    kind = "LSTM" if isinstance(m, nn.LSTM) else "GRU"
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if m.batch_first else 1)
        hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if kind == "LSTM" else hx.unsqueeze(1)
    seq = x.transpose(0, 1) if m.batch_first else x  # (T, B, I)
    n_dirs = 2 if m.bidirectional else 1
    h0, c0 = (hx if kind == "LSTM" else (hx, None)) if hx is not None else (None, None)
    node = _node(kind, n_dirs, m.batch_first)
    finals: list[list[torch.Tensor]] = []
    for layer in range(m.num_layers):
        w, r, b = _onnx_weights(m, kind, layer, n_dirs)
        initial = [s[layer * n_dirs:(layer + 1) * n_dirs] if s is not None else None for s in (h0, c0)]
        if kind == "LSTM":
            y, *states = recurrent.lstm(node, seq, w, r, b, None, *initial)
        else:
            y, *states = recurrent.gru(node, seq, w, r, b, None, initial[0])
        seq = y.permute(0, 2, 1, 3).flatten(2)  # (T, D, B, H) -> (T, B, D*H)
        if m.training and m.dropout and layer < m.num_layers - 1:
            seq = nn.functional.dropout(seq, m.dropout, training=True)
        finals.append(states)
    out = seq.transpose(0, 1) if m.batch_first else seq
    stacked = [torch.cat([f[i] for f in finals]) for i in range(len(finals[0]))]
    if unbatched:
        out = out.squeeze(0 if m.batch_first else 1)
        stacked = [s.squeeze(1) for s in stacked]
    return (out, tuple(stacked)) if kind == "LSTM" else (out, stacked[0])


def _onnx_weights(m: nn.Module, kind: str, layer: int, n_dirs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H) of one layer, gates in ONNX order."""
    order = _GATE_ORDER[kind]

    def gates(t: torch.Tensor) -> torch.Tensor:
        chunks = t.chunk(len(order), dim=0)
        return torch.cat([chunks[i] for i in order], dim=0)

    suffixes = ["", "_reverse"][:n_dirs]
    w = torch.stack([gates(getattr(m, f"weight_ih_l{layer}{s}")) for s in suffixes])
    r = torch.stack([gates(getattr(m, f"weight_hh_l{layer}{s}")) for s in suffixes])
    if not m.bias:
        return w, r, None
    b = torch.stack([torch.cat([gates(getattr(m, f"bias_ih_l{layer}{s}")), gates(getattr(m, f"bias_hh_l{layer}{s}"))])
                     for s in suffixes])
    return w, r, b


@functools.lru_cache(maxsize=16)
def _node(kind: str, n_dirs: int, batch_first: bool) -> Any:
    """The ONNX attributes of the node a torch layer of this shape corresponds to (the layers read them from it)."""
    from .recurrent import RecurrentSpec

    attrs = {"direction": "bidirectional" if n_dirs == 2 else "forward"}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1  # torch's GRU applies the reset gate after the recurrent product
    outputs = ("y", "y_h", "y_c") if kind == "LSTM" else ("y", "y_h")
    return RecurrentSpec(kind, attrs, outputs, name=f"torch {kind}")
