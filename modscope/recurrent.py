"""Recurrent layers: LSTM, GRU, RNN in ONNX's formulation, written with plain tensor ops so they run under
torch.func.vmap.

Two callers share them: the ONNX converter's LSTM/GRU/RNN handlers (`modscope.converters.onnx.ops.recurrent`) and
the batchable stand-ins for torch's own ``nn.LSTM``/``nn.GRU`` (`modscope.batchable`). A leaf module (torch and
`modscope.errors` only), so the mask learner can run recurrent layers without the ONNX converter. A layer reads its
attributes (direction, layout, activations, clip, ...) from a `RecurrentNode`: the converter's ``NodeContext`` or a
`RecurrentSpec`.

Each layer is computed time step by time step with one matmul against the recurrent weights ``R`` and element-wise
gate maths; the input projection ``X @ W^T`` for every step is done up front with one matmul. Both directions of a
bidirectional layer run in the same loop, stacked on a leading direction axis, so a bidirectional layer costs one
pass over time. Nothing here calls torch's fused ``aten::lstm``/``aten::gru``: those have no ``vmap`` batching rule
over weights, and the plain form is differentiable with respect to ``W``, ``R``, ``B``, ``P`` and the initial states.

Sequence lengths (``sequence_lens``): steps past a sequence's own length leave its state unchanged and write zeros
to ``Y``, so the final states are those of each sequence's last valid step. A reverse direction reads each sequence
backwards from its own last valid step (the batch is never sorted or packed).

Shapes (layout 0; layout 1 swaps the batch axis to the front):
    X: (T, B, I); W: (D, G*H, I); R: (D, G*H, H); B: (D, 2*G*H); initial_h/initial_c: (D, B, H); P: (D, 3*H)
    Y: (T, D, B, H); Y_h/Y_c: (D, B, H)
with D = 2 for bidirectional else 1, G the number of gates (LSTM 4, GRU 3, RNN 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from .errors import InvalidParameterError, ShapeError


class RecurrentNode(Protocol):
    """What a layer reads about its node: names for messages, the ONNX attributes, which outputs are wanted."""

    @property
    def name(self) -> str: ...

    @property
    def op_type(self) -> str: ...

    @property
    def outputs(self) -> Sequence[str]: ...

    def attr(self, name: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class RecurrentSpec:
    """A `RecurrentNode` without an ONNX graph: the attributes of a layer given directly.

    Attributes:
        op_type: "LSTM", "GRU" or "RNN".
        attrs: ONNX attributes (``direction``, ``layout``, ``linear_before_reset``, ``activations`` ...).
        outputs: output names; an empty name is an output not wanted (``("y", "y_h", "y_c")`` wants all).
        name: the layer's name in messages.

    Example:
        >>> spec = RecurrentSpec("GRU", {"direction": "forward"}, ("y", "y_h"))
        >>> x, w, r = torch.zeros(5, 2, 3), torch.zeros(1, 12, 3), torch.zeros(1, 12, 4)
        >>> [t.shape for t in gru(spec, x, w, r)]
        [torch.Size([5, 1, 2, 4]), torch.Size([1, 2, 4])]
    """

    op_type: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("y", "y_h")
    name: str = ""

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


Activation = Callable[[torch.Tensor], torch.Tensor]

#: activation name (lower case) -> (function of x, alpha, beta; default alpha or None; default beta or None).
#: An activation consumes an entry of ``activation_alpha``/``activation_beta`` only if it has that parameter.
_ACTIVATIONS = MappingProxyType(
    {
        "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
        "tanh": (lambda x, a, b: torch.tanh(x), None, None),
        "relu": (lambda x, a, b: torch.relu(x), None, None),
        "softsign": (lambda x, a, b: x / (1 + x.abs()), None, None),
        "softplus": (lambda x, a, b: torch.nn.functional.softplus(x), None, None),
        "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), 0.01, None),
        "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
        "elu": (lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)), 1.0, None),
        "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
        "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
        "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    }
)


@dataclass(frozen=True)
class _ActSpec:
    name: str
    alpha: float | None
    beta: float | None
    clip: float | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = torch.clamp(x, -self.clip, self.clip)
        return _ACTIVATIONS[self.name][0](x, self.alpha, self.beta)


class _DirActivation:
    """One activation slot (f, g or h) for every direction; x has the direction axis first."""

    def __init__(self, specs: Sequence[_ActSpec]):
        self.specs = tuple(specs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if all(s == self.specs[0] for s in self.specs):
            return self.specs[0](x)
        return torch.stack([spec(x[d]) for d, spec in enumerate(self.specs)])


def _activations(ctx: RecurrentNode, defaults: Sequence[str], n_dirs: int) -> list[_DirActivation]:
    """The activation slots of the node (``defaults`` per direction), with alpha/beta/clip bound."""
    names = [n.lower() for n in ctx.attr("activations", [])] or [d.lower() for d in defaults] * n_dirs
    per_dir = len(defaults)
    if len(names) == per_dir and n_dirs == 2:
        names = names * 2
    if len(names) != per_dir * n_dirs:
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' lists {len(names)} activations; it needs {per_dir * n_dirs} "
            f"({per_dir} per direction)."
        )
    alphas, betas = list(ctx.attr("activation_alpha", [])), list(ctx.attr("activation_beta", []))
    clip = ctx.attr("clip")
    specs = []
    for name in names:
        if name not in _ACTIVATIONS:
            raise InvalidParameterError(
                f"{ctx.op_type} node '{ctx.name}' uses activation '{name}'; supported: {', '.join(_ACTIVATIONS)}."
            )
        _, default_alpha, default_beta = _ACTIVATIONS[name]
        alpha = (alphas.pop(0) if alphas else default_alpha) if default_alpha is not None else None
        beta = (betas.pop(0) if betas else default_beta) if default_beta is not None else None
        specs.append(_ActSpec(name, alpha, beta, clip))
    return [_DirActivation(specs[slot::per_dir]) for slot in range(per_dir)]


def _reverse_time(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """x (T, B, ...) with each sequence reversed within its own length; padding steps stay in place.

    The permutation is its own inverse, so the same call turns reversed outputs back into time order.
    """
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return x[index, torch.arange(x.shape[1], device=x.device)]


@dataclass
class _Layer:
    """The common inputs of an RNN-family node, normalized to layout 0."""

    x: torch.Tensor  # (T, B, I)
    w: torch.Tensor  # (D, G*H, I)
    r: torch.Tensor  # (D, G*H, H)
    b: torch.Tensor | None  # (D, 2*G*H)
    lengths: torch.Tensor | None  # (B,) int64
    states: list[torch.Tensor]  # each (D, B, H)
    reverse: tuple[bool, ...]  # per direction
    batch_major: bool

    @property
    def hidden(self) -> int:
        return self.r.shape[-1]


def _parse_layer(
    ctx: RecurrentNode,
    n_gates: int,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None,
    lengths: torch.Tensor | None,
    initial: Sequence[torch.Tensor | None],
) -> _Layer:
    direction = ctx.attr("direction", "forward")
    reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}.get(direction)
    if reverse is None:
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}' has direction '{direction}'; use forward, reverse or bidirectional."
        )
    batch_major = bool(ctx.attr("layout", 0))
    if batch_major:
        x = x.transpose(0, 1)
        initial = [s.transpose(0, 1) if s is not None else None for s in initial]
    n_dirs, hidden = len(reverse), r.shape[-1]
    if w.dim() != 3 or w.shape[0] != n_dirs or w.shape[1] != n_gates * hidden or r.shape[:2] != w.shape[:2]:
        raise ShapeError(
            f"{ctx.op_type} node '{ctx.name}': W {tuple(w.shape)} and R {tuple(r.shape)} do not fit "
            f"{n_dirs} direction(s) of {n_gates} gates with hidden size {hidden}."
        )
    batch = x.shape[1]
    zeros = x.new_zeros(n_dirs, batch, hidden)
    states = [s if s is not None else zeros for s in initial]
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    return _Layer(x, w, r, b, lengths, states, reverse, batch_major)


def _input_projection(layer: _Layer, n_bias: int) -> torch.Tensor:
    """X @ W^T (+ the first ``n_bias`` gate columns of Wb + Rb) for every direction and step: (D, T, B, G*H).

    Reverse directions see X already reversed, so the recurrence below always runs forward in time.
    """
    xs = [_reverse_time(layer.x, layer.lengths) if rev else layer.x for rev in layer.reverse]
    xd = torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0)
    proj = torch.matmul(xd, layer.w.transpose(1, 2).unsqueeze(1))
    if layer.b is not None:
        gh = layer.w.shape[1]
        bias = layer.b[:, :gh] + _pad_cols(layer.b[:, gh:], n_bias, gh)
        proj = proj + bias[:, None, None, :]
    return proj


def _pad_cols(rb: torch.Tensor, n_keep: int, total: int) -> torch.Tensor:
    """The first ``n_keep`` columns of ``rb``, the rest zeroed (recurrent biases that can be added up front)."""
    if n_keep >= total:
        return rb
    return torch.cat([rb[:, :n_keep], torch.zeros_like(rb[:, n_keep:])], dim=1)


Step = Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]


def _run(layer: _Layer, proj: torch.Tensor, step: Step, want_y: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Run ``step`` over time; return Y (T, D, B, H) in time order (or None) and the final states (D, B, H)."""
    states = list(layer.states)
    n_steps = proj.shape[1]
    valid = None
    if layer.lengths is not None:
        valid = torch.arange(n_steps, device=proj.device).unsqueeze(1) < layer.lengths  # (T, B)
    ys = []
    for t in range(n_steps):
        new = step(proj[:, t], states)
        if valid is not None:
            keep = valid[t].view(1, -1, 1)
            new = [torch.where(keep, n, s) for n, s in zip(new, states)]
            if want_y:
                ys.append(torch.where(keep, new[0], torch.zeros_like(new[0])))
        elif want_y:
            ys.append(new[0])
        states = new
    if not want_y:
        return None, states
    y = torch.stack(ys) if ys else proj.new_zeros(0, *states[0].shape)
    if any(layer.reverse):
        dirs = [_reverse_time(y[:, d], layer.lengths) if rev else y[:, d] for d, rev in enumerate(layer.reverse)]
        y = torch.stack(dirs, dim=1)
    return y, states


def _outputs(ctx: RecurrentNode, layer: _Layer, y: torch.Tensor | None, states: list[torch.Tensor]) -> tuple:
    """The node outputs (Y, then each final state) in the node's layout; unrequested ones are None."""
    if y is not None and layer.batch_major:
        y = y.permute(2, 0, 1, 3)
    finals = [s.transpose(0, 1) if layer.batch_major else s for s in states]
    wanted = [bool(name) for name in ctx.outputs]
    values = [y, *finals][: len(wanted)]
    return tuple(v if w else None for v, w in zip(values, wanted))


def _wants_y(ctx: RecurrentNode) -> bool:
    return bool(ctx.outputs) and bool(ctx.outputs[0])


def recurrent_matmul(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h (D, B, H) @ r^T with r (D, K, H) -> (D, B, K)."""
    return torch.matmul(h, r.transpose(1, 2))


def lstm(
    ctx: RecurrentNode,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
    initial_c: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    *,
    recurrent_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = recurrent_matmul,
) -> tuple:
    """LSTM with gates in ONNX order i, o, f, c; peepholes P = (P_i, P_o, P_f); optional input_forget coupling.

    ``recurrent_matmul(h, R)`` computes the hidden state's product (onnxruntime's DynamicQuantizeLSTM rounds h).
    """
    layer = _parse_layer(ctx, 4, x, w, r, b, sequence_lens, [initial_h, initial_c])
    f_act, g_act, h_act = _activations(ctx, ("Sigmoid", "Tanh", "Tanh"), len(layer.reverse))
    hidden, coupled = layer.hidden, bool(ctx.attr("input_forget", 0))
    peep = [q.unsqueeze(1) for q in p.chunk(3, dim=-1)] if p is not None else None  # each (D, 1, H)

    def step(xw: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        h, c = states
        gates = xw + recurrent_matmul(h, layer.r)
        i, o, f, cell = gates.split(hidden, dim=-1)
        if peep is not None:
            i, f = i + peep[0] * c, f + peep[2] * c
        i = f_act(i)
        f = 1 - i if coupled else f_act(f)
        c_new = f * c + i * g_act(cell)
        if peep is not None:
            o = o + peep[1] * c_new
        return [f_act(o) * h_act(c_new), c_new]

    y, states = _run(layer, _input_projection(layer, 4 * hidden), step, _wants_y(ctx))
    return _outputs(ctx, layer, y, states)


def gru(
    ctx: RecurrentNode,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
) -> tuple:
    """GRU with gates z, r, h; ``linear_before_reset`` applies the reset gate after (1) or before (0) R_h."""
    layer = _parse_layer(ctx, 3, x, w, r, b, sequence_lens, [initial_h])
    f_act, g_act = _activations(ctx, ("Sigmoid", "Tanh"), len(layer.reverse))
    hidden = layer.hidden
    after = bool(ctx.attr("linear_before_reset", 0))
    r_zr, r_h = layer.r[:, : 2 * hidden], layer.r[:, 2 * hidden :]
    rb_h = layer.b[:, 5 * hidden :].unsqueeze(1) if (after and layer.b is not None) else None

    def step(xw: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        (h,) = states
        zr = f_act(xw[..., : 2 * hidden] + recurrent_matmul(h, r_zr))
        z, reset = zr[..., :hidden], zr[..., hidden:]
        if after:
            hr = recurrent_matmul(h, r_h)
            if rb_h is not None:
                hr = hr + rb_h
            cand = g_act(xw[..., 2 * hidden :] + reset * hr)
        else:
            cand = g_act(xw[..., 2 * hidden :] + recurrent_matmul(reset * h, r_h))
        return [(1 - z) * cand + z * h]

    # R_bh sits inside the reset product when linear_before_reset=1, so it cannot be added up front then.
    proj = _input_projection(layer, 2 * hidden if after else 3 * hidden)
    y, states = _run(layer, proj, step, _wants_y(ctx))
    return _outputs(ctx, layer, y, states)


def rnn(
    ctx: RecurrentNode,
    x: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None = None,
    sequence_lens: torch.Tensor | None = None,
    initial_h: torch.Tensor | None = None,
) -> tuple:
    """The simple (Elman) RNN: H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)."""
    layer = _parse_layer(ctx, 1, x, w, r, b, sequence_lens, [initial_h])
    (f_act,) = _activations(ctx, ("Tanh",), len(layer.reverse))

    def step(xw: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f_act(xw + recurrent_matmul(states[0], layer.r))]

    y, states = _run(layer, _input_projection(layer, layer.hidden), step, _wants_y(ctx))
    return _outputs(ctx, layer, y, states)
