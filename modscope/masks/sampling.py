"""Hard Gumbel-sigmoid mask samples with the straight-through estimator.

For a logit l and a uniform u, the logistic noise ``logit(u)`` (the difference of two Gumbel variables) gives the
soft sample s = sigmoid((l + logit(u)) / τ) and the hard sample m = [s > 0.5] = [l + logit(u) > 0], which is exactly
Bernoulli(sigmoid(l)). The forward pass uses the hard 0/1 value; the backward pass uses the soft sample's derivative
ds/dl = s(1 − s)/τ (the paper's ``stopgrad(hard − s) + s``).

What modscope does differently from the paper's code, for speed (same distribution, same gradients):

- one uniform per mask element instead of two (the paper draws two Gumbels and takes their difference);
- the forward pass only compares ``u > sigmoid(−l)``: one transcendental per *logit*, none per sample;
- the soft sample is recomputed in the backward pass from the saved uniforms instead of being kept in memory; for
  τ = 1 it needs no transcendental per sample either: with e = exp(−l), s = u / (u + (1 − u)·e), so
  s(1 − s) = u·(1 − u)·e / (u + (1 − u)·e)²;
- `sample_masked_weights` fuses the mask with the weights: it returns W ⊙ m directly, one tensor per weight laid out
  as ``(K, S, *shape)`` for `torch.func.vmap`, and its backward pass multiplies by W itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import native
from .elementwise import LOGIT_CLAMP as _LOGIT_CLAMP
from .elementwise import keep_weights as _keep_weights
from .elementwise import logit_grad as _logit_grad


def _soft_derivative(logits: torch.Tensor, uniforms: torch.Tensor, tau: float) -> torch.Tensor:
    """ds/dl of the soft samples: ``logits`` (..., 1, N) against ``uniforms`` (..., S, N)."""
    if tau == 1.0:
        e = torch.exp(-logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP))
        other = (1 - uniforms).mul_(e)
        denom = other + uniforms
        return other.mul_(uniforms).div_(denom.mul_(denom))
    soft = torch.sigmoid((logits + torch.logit(uniforms)) / tau)
    return soft.mul_(1 - soft).div_(tau)


class _HardConcrete(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, uniforms: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(logits, uniforms)
        ctx.tau = tau
        return (uniforms > torch.sigmoid(-logits).unsqueeze(-2)).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, uniforms = ctx.saved_tensors
        return (_soft_derivative(logits.unsqueeze(-2), uniforms, ctx.tau) * grad).sum(-2), None, None


def sample_masks(logits: torch.Tensor, uniforms: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard 0/1 mask samples with straight-through gradients to ``logits``.

    Args:
        logits: ``(..., N)`` mask logits.
        uniforms: ``(..., S, N)`` uniform noise in [0, 1), one per sample and element.
        tau: the temperature τ of the soft sample used for the gradient.

    Returns:
        ``(..., S, N)`` tensor of 0.0/1.0 in the dtype of ``logits``; P(1) = sigmoid(logit).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 5, requires_grad=True)
        >>> m = sample_masks(logits, torch.rand(1, 3, 5, generator=torch.Generator().manual_seed(0)))
        >>> m.shape, sorted(set(m.flatten().tolist())) <= [0.0, 1.0]
        (torch.Size([1, 3, 5]), True)
    """
    return _HardConcrete.apply(logits, uniforms, tau)


class SamplerKernels:
    """The two element-wise kernels of `sample_masked_weights`, eager or fused with `torch.compile`.

    Fusing pays on long GPU runs: each kernel becomes one pass over the (K, S, n) elements instead of about ten, at
    the price of a one-off compilation (tens of seconds; cached on disk afterwards; `compile_seconds` says how long).
    On a CPU `StepBuffers` runs the same arithmetic eagerly in cache-sized blocks, about as fast as compiled. If compilation fails
    (no C++ compiler, unsupported platform) the kernels fall back to eager mode and say so once.
    """

    def __init__(self, compile: bool = False):
        self.compiled = compile
        self.keep: Any = torch.compile(_keep_weights, dynamic=True) if compile else _keep_weights
        self.grad: Any = torch.compile(_logit_grad, dynamic=True) if compile else _logit_grad
        self.compile_seconds = 0.0
        """Time of the kernels' first calls (their compilation, when compiled)."""
        self._called: set[str] = set()

    def call(self, name: str, *args: Any) -> torch.Tensor:
        if self.compiled and name not in self._called:
            import time

            start = time.perf_counter()
            out = self._call(name, *args)
            self.compile_seconds += time.perf_counter() - start
            self._called.add(name)
            return out
        return self._call(name, *args)

    def _call(self, name: str, *args: Any) -> torch.Tensor:
        try:
            return getattr(self, name)(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            if not self.compiled:
                raise
            import warnings

            from ..errors import ModscopeWarning

            warnings.warn(f"torch.compile of the mask sampler failed ({type(exc).__name__}); running it eagerly "
                          "(same results, slower). Pass MaskConfig(compile=False) to skip the attempt.", ModscopeWarning, stacklevel=2)
            self.compiled, self.keep, self.grad = False, _keep_weights, _logit_grad
            return getattr(self, name)(*args)


_EAGER = SamplerKernels(compile=False)


class _MaskedWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, uniforms: torch.Tensor, tau: float, offsets: Sequence[int],
                kernels: SamplerKernels, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(logits, uniforms, *weights)
        ctx.tau, ctx.offsets, ctx.kernels = tau, offsets, kernels
        K, S = uniforms.shape[:2]
        out = []
        for w, a in zip(weights, offsets):
            n = w.numel()
            eff = kernels.call("keep", logits[:, None, a : a + n], uniforms[..., a : a + n], w.reshape(-1))
            out.append(eff.view(K, S, *w.shape))
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        logits, uniforms, *weights = ctx.saved_tensors
        K, S = uniforms.shape[:2]
        grad_logits = torch.zeros_like(logits)
        for w, a, g in zip(weights, ctx.offsets, grads):
            if g is None:
                continue
            n = w.numel()
            grad_logits[:, a : a + n] = ctx.kernels.call(
                "grad", logits[:, None, a : a + n], uniforms[..., a : a + n], g.reshape(K, S, n), w.reshape(-1), ctx.tau
            )
        return (grad_logits, None, None, None, None, *([None] * len(weights)))


def sample_masked_weights(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    weights: Sequence[torch.Tensor],
    offsets: Sequence[int],
    tau: float = 1.0,
    kernels: SamplerKernels | None = None,
) -> tuple[torch.Tensor, ...]:
    """W ⊙ m for every weight, with m hard Gumbel-sigmoid samples and straight-through gradients to ``logits``.

    Args:
        logits: ``(K, N)``: K masks over the N masked elements (the weights flattened and concatenated).
        uniforms: ``(K, S, N)`` uniform noise, one per mask, sample and element.
        weights: the masked weights (frozen), in the order of ``offsets``.
        offsets: where each weight's elements start in the N axis.
        tau: the temperature τ.
        kernels: eager (default) or compiled `SamplerKernels`.

    Returns:
        One ``(K, S, *weight.shape)`` tensor per weight.

    Example:
        >>> import torch
        >>> w = [torch.ones(2, 2), torch.full((3,), 2.0)]
        >>> eff = sample_masked_weights(torch.zeros(1, 7), torch.rand(1, 4, 7), w, [0, 4])
        >>> [tuple(e.shape) for e in eff]
        [(1, 4, 2, 2), (1, 4, 3)]
    """
    return _MaskedWeights.apply(logits, uniforms, tau, tuple(offsets), kernels or _EAGER, *weights)


def draw_uniforms(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str = "cpu",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms from ``generator`` (a CPU generator gives the same stream whatever ``device`` is), into ``out`` if
    given. The stream is drawn row by row: two draws of (2, n) give the values of one draw of (4, n)."""
    u = out if out is not None and out.device == generator.device else torch.empty(shape, device=generator.device)
    fast = native.kernels() if generator.device.type == "cpu" and _native_fits(u) and u.is_contiguous() else None
    if fast is not None:  # the same values and generator state as torch.rand, about ten times faster
        fast.uniforms(generator, u)
    else:
        torch.rand(shape, generator=generator, out=u)
    if out is not None:
        return out if u is out else out.copy_(u, non_blocking=True)
    return u.to(device, non_blocking=True) if u.device != torch.device(device) else u


def draw_uniforms_many(generators: Sequence[torch.Generator], outs: Sequence[torch.Tensor]) -> None:
    """`draw_uniforms` into each ``out`` from its generator: in parallel where the native kernels can, else one by
    one. The values are those of one `draw_uniforms` per generator."""
    fast = native.kernels() if _native_fits(*outs) and all(g.device.type == "cpu" for g in generators) else None
    distinct = len({id(g) for g in generators}) == len(generators)  # else one stream, drawn in order
    if fast is not None and distinct and all(o.is_contiguous() and o.numel() == outs[0].numel() for o in outs):
        fast.uniforms_many(generators, outs)
        return
    for g, out in zip(generators, outs):
        draw_uniforms(tuple(out.shape), g, out.device, out=out)


def _native_fits(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take these tensors: float32 on the CPU, the last dimension dense."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and (t.dim() == 0 or t.stride(-1) == 1) for t in tensors)


_CPU_BLOCK = 1 << 17  # elements per block of the backward's temporaries on CPU: two 512 KiB floats stay in L2


def _as_matrix(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``g`` (G, s, *shape) as a (G, s, rows, cols) view for the native logit gradient (a vector is one row), or None
    where ``w`` is not a contiguous float32 weight or ``g`` not a float32 CPU tensor with such a view."""
    if not (_native_fits(w) and w.is_contiguous() and w.numel() and g.dtype == torch.float32 and g.device.type == "cpu"):
        return None
    rows = w.shape[0] if w.dim() > 1 else 1
    try:
        return g.view(*g.shape[:2], rows, w.numel() // rows)
    except RuntimeError:  # dimensions that cannot be merged without a copy
        return None


class StepBuffers:
    """Reusable buffers of the mask step: noise, effective weights and the backward's temporaries.

    The step writes into these with ``out=`` and in-place operations, so after the first step no (K, S, N)-sized
    array is allocated or freed (no page faults, no system time). On a CPU the element-wise work runs in the
    `native` kernels where they could be built (one pass each, on torch's threads), else as torch operations
    over column blocks whose temporaries stay in cache. Either way the arithmetic is that of `sample_masked_weights`
    operation by operation, so the results are bit-identical to it.

    Args:
        weights: the masked weights (frozen), in layout order.
        offsets: where each weight starts in the flat N axis.
        replicas: the most (task, sample) pairs of one forward pass.
        tasks: the most tasks of one forward pass.
        slots: noise buffers (2 to draw one pass ahead).

    Example:
        >>> import torch
        >>> w = [torch.ones(2, 2), torch.full((3,), 2.0)]
        >>> buf = StepBuffers(w, [0, 4], replicas=4, tasks=1)
        >>> u = buf.uniforms(1, 4); u.uniform_(generator=torch.Generator().manual_seed(0)) is not None
        True
        >>> eff = buf.effective(torch.zeros(1, 7), u, w)
        >>> [tuple(e.shape) for e in eff]
        [(1, 4, 2, 2), (1, 4, 3)]
    """

    def __init__(self, weights: Sequence[torch.Tensor], offsets: Sequence[int], replicas: int, tasks: int, slots: int = 1):
        self.weights, self.offsets = list(weights), list(offsets)
        self.total = sum(w.numel() for w in weights)
        device, dtype = (weights[0].device, weights[0].dtype) if weights else (torch.device("cpu"), torch.float32)
        largest = max((w.numel() for w in weights), default=1)
        widest = max((w[0].numel() if w.dim() else 1 for w in weights), default=1)  # the largest row of a weight
        self.block = _CPU_BLOCK if device.type == "cpu" else replicas * largest
        scratch = min(max(self.block, replicas * widest), replicas * largest)
        self._uniforms = [torch.empty(replicas * self.total, device=device, dtype=dtype) for _ in range(slots)]
        self._effective = [torch.empty(replicas * w.numel(), device=device, dtype=dtype) for w in weights]
        self._rows = torch.empty(tasks * self.total, device=device, dtype=dtype)
        self._a = torch.empty(scratch, device=device, dtype=dtype)
        self._b = torch.empty(scratch, device=device, dtype=dtype)
        self._sum = torch.empty(scratch, device=device, dtype=dtype)
        self._zero = torch.zeros((), device=device, dtype=dtype)
        self._one = torch.ones((), device=device, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        held = [*self._uniforms, *self._effective, self._rows, self._a, self._b, self._sum]
        return sum(t.numel() * t.element_size() for t in held)

    def uniforms(self, tasks: int, samples: int, slot: int = 0) -> torch.Tensor:
        """A ``(tasks, samples, N)`` view to draw a pass's noise into (row by row, each task from its stream); with
        two ``slots`` the next pass's noise can be drawn into one while the other is in use."""
        return self._uniforms[slot][: tasks * samples * self.total].view(tasks, samples, self.total)

    def effective(self, logits: torch.Tensor, uniforms: torch.Tensor, weights: Sequence[torch.Tensor],
                  kernels: SamplerKernels | None = None) -> list[torch.Tensor]:
        """W where u > sigmoid(−l), else 0, for ``logits`` (G, N) and ``uniforms`` (G, s, N): one (G, s, *shape) each."""
        G, s = uniforms.shape[:2]
        rows = self._rows[: G * self.total].view(G, 1, self.total)
        compiled = kernels is not None and kernels.compiled
        if not compiled:
            torch.sigmoid(torch.neg(logits[:, None], out=rows), out=rows)
        fast = None if compiled else self._native(uniforms, rows)
        out = []
        for w, a, buf in zip(weights, self.offsets, self._effective):
            n = w.numel()
            eff = buf[: G * s * n].view(G, s, n)
            if fast is not None and _native_fits(w) and w.is_contiguous():
                fast.keep(uniforms[..., a : a + n], rows[..., a : a + n], w.reshape(-1), eff)
            elif compiled:
                eff.copy_(kernels.call("keep", logits[:, None, a : a + n], uniforms[..., a : a + n], w.reshape(-1)))  # type: ignore[union-attr]
            else:  # 0/1 into the buffer, then 0 + keep·W: W or +0.0 exactly as torch.where, three times faster
                torch.gt(uniforms[..., a : a + n], rows[..., a : a + n], out=eff)
                torch.addcmul(self._zero, eff, w.reshape(-1), out=eff)
            out.append(eff.view(G, s, *w.shape))
        return out

    def _native(self, *tensors: torch.Tensor) -> native.Kernels | None:
        """The native kernels, when they are built and take these tensors."""
        return native.kernels() if _native_fits(*tensors) else None

    def logit_grad(self, logits: torch.Tensor, uniforms: torch.Tensor, grads: Sequence[torch.Tensor | None],
                   out: torch.Tensor, tau: float, accumulate: bool, kernels: SamplerKernels | None = None) -> None:
        """Write (or add) Σ_s grad · W · ds/dl into ``out`` (G, N): the straight-through gradient of ``logits`` (G, N).

        ``grads`` holds the loss gradient of each effective weight (G, s, *shape), or None where it has none.
        """
        G, s = uniforms.shape[:2]
        compiled = kernels is not None and kernels.compiled
        rows = self._rows[: G * self.total].view(G, 1, self.total)
        if tau == 1.0 and not compiled:  # e = exp(−l), reused by every block
            torch.exp(torch.neg(torch.clamp(logits[:, None], -_LOGIT_CLAMP, _LOGIT_CLAMP, out=rows), out=rows), out=rows)
        fast = self._native(uniforms, rows, out) if tau == 1.0 and not compiled else None
        for w, a, g in zip(self.weights, self.offsets, grads):
            n = w.numel()
            target = out[:, a : a + n]
            if g is None:
                if not accumulate:
                    target.zero_()
                continue
            matrix = _as_matrix(g, w) if fast is not None else None
            if fast is not None and matrix is not None:
                fast.logit_grad(uniforms[..., a : a + n], matrix, w.reshape(-1), rows[..., a : a + n], target, accumulate)
                continue
            if compiled:
                part = kernels.call("grad", logits[:, None, a : a + n], uniforms[..., a : a + n], g.reshape(G, s, n), w.reshape(-1), tau)  # type: ignore[union-attr]
                target.add_(part) if accumulate else target.copy_(part)
                continue
            # blocks of whole rows of the weight, read in g's own layout (a linear layer's g is transposed: no copy)
            shape = tuple(w.shape) if w.dim() else (1,)
            u = uniforms[..., a : a + n].view(G, s, *shape)
            lw, ew = logits[:, None, a : a + n].view(G, 1, *shape), rows[..., a : a + n].view(G, 1, *shape)
            g, wv, tv = g.view(G, s, *shape), w.view(shape), target.view(G, *shape)
            step = max(1, self.block // (G * s * (n // shape[0])))
            for j in range(0, shape[0], step):
                r = slice(j, j + step)
                self._grad_block(lw[:, :, r], ew[:, :, r], u[:, :, r], g[:, :, r], wv[r], tv[:, r], tau, accumulate)

    def _grad_block(self, logits: torch.Tensor, e: torch.Tensor, u: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                    target: torch.Tensor, tau: float, accumulate: bool) -> None:
        """One column block of `logit_grad`, operation for operation the arithmetic of `_logit_grad`."""
        shape = u.shape
        size = u.numel()
        a, b = self._a[:size].view(shape), self._b[:size].view(shape)
        if tau == 1.0:
            torch.sub(self._one, u, out=a).mul_(e)  # other = (1 − u) · e
            torch.add(a, u, out=b)  # denom = other + u
            b.mul_(b)
            a.mul_(u).div_(b)  # local = other · u / denom²
        else:
            torch.logit(u, out=a).add_(logits).div_(tau).sigmoid_()  # soft
            torch.neg(a, out=b).add_(1)
            a.mul_(b).div_(tau)  # local = soft (1 − soft) / τ
        a.mul_(g).mul_(w)
        if not accumulate:  # straight into the gradient
            torch.sum(a, dim=1, out=target)
            return
        total = self._sum[: size // shape[1]].view(shape[0], *shape[2:])
        torch.sum(a, dim=1, out=total)
        target.add_(total)
