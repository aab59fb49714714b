"""Native CPU kernels of the mask step, built on first use with the system's C compiler.

On a CPU most of a mask step is element-wise work over K x S x N values: drawing the noise, the effective weights,
the logit gradient and Adam's step. torch draws its Mersenne-Twister uniforms through a general per-element loop
(about 2.5 ns each on the benchmark machine) and runs the logit gradient as nine separate passes and Adam as seven.
``native.c`` does each in one or two passes, with the same floating-point operations in the same order, so the masks
and logits stay bit for bit those of the torch operations (the uniforms are those of ``torch.rand`` on the same
`torch.Generator`, whose state is advanced as ``torch.rand`` would). The loops run on torch's own OpenMP threads.

The library is compiled once per machine with ``$CC`` (else ``cc``; about 0.3 s) into ``$XDG_CACHE_HOME/modscope``
(else ``~/.cache/modscope``; a private folder in the temporary directory where neither can be made) and checked
against the torch operations on a small input each time it is loaded. Where that fails (no compiler, a non-POSIX
system, a torch whose generator state changed layout, a result that differs) the step runs the torch operations,
with the same results, more slowly; `status` says which and why. ``MODSCOPE_NATIVE=0`` turns the kernels off.

Example:
    >>> import torch
    >>> from modscope.masks import native
    >>> out = torch.empty(5)
    >>> if native.kernels() is not None:  # the compiler may be missing
    ...     native.kernels().uniforms(torch.Generator().manual_seed(0), out)
    ...     assert torch.equal(out, torch.rand(5, generator=torch.Generator().manual_seed(0)))
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from ..errors import ModscopeWarning
from .elementwise import LOGIT_CLAMP, keep_weights, logit_grad

_ABI = 1
_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
_TUNED = ["-march=native"]  # tried first; the library is then keyed by this machine's CPU features
_OPENMP = ["-fopenmp"]  # where torch runs on OpenMP: the kernels then share torch's threads (see native.c)
_STATE_BYTES = 5056  # torch's CPU generator state: seed, left, seeded, next, 624 words (uint64), normal-sample cache
_LEFT, _NEXT, _WORDS = 8, 16, 24

_FALLBACK = "the mask step runs torch operations (same results, slower)"

_lock = threading.Lock()
_loaded: tuple[Kernels | None, str] | None = None
_warned = False


def kernels() -> Kernels | None:
    """The native kernels, built and checked on the first call; None where they cannot be used (`status` says why)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded[0]


def warn_once_if_missing() -> None:
    """Warn (once per process) that the step runs the slower torch operations, unless the user turned the kernels off."""
    global _warned
    if kernels() is not None or _warned or _turned_off():
        return
    _warned = True
    warnings.warn(f"{status()}; the native kernels make the mask step about twice as fast", ModscopeWarning, stacklevel=3)


def _turned_off() -> bool:
    return os.environ.get("MODSCOPE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def status() -> str:
    """One line: the kernels in use and where they came from, or why the torch operations run instead."""
    kernels()
    assert _loaded is not None
    return _loaded[1]


class Kernels:
    """The loaded library's kernels over torch tensors (float32, CPU)."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.modscope_uniforms.argtypes = [ptr, ptr, ptr, i64]
        lib.modscope_uniforms_many.argtypes = [ptr, ptr, ptr, i64, i64]
        lib.modscope_keep.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64, i64]
        lib.modscope_logit_grad.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64,
                                            i64, i64, ctypes.c_int]
        f32 = ctypes.c_float
        lib.modscope_adam_moments.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32]
        lib.modscope_adam_apply.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32]
        for f in (lib.modscope_uniforms, lib.modscope_uniforms_many, lib.modscope_keep, lib.modscope_logit_grad,
                  lib.modscope_adam_moments, lib.modscope_adam_apply):
            f.restype = None
        self._lib = lib
        self.adam_exact = False
        """Whether `adam_step` gave torch's Adam bit for bit in the check (else the trainer keeps torch's)."""
        self.build_seconds = 0.0
        """Time it took to compile the library in this process (0 when it came from the cache)."""

    def uniforms(self, generator: torch.Generator, out: torch.Tensor) -> None:
        """Fill the contiguous float32 ``out`` as ``torch.rand(out.shape, generator=generator, out=out)`` would, and
        advance ``generator`` the same way."""
        self.uniforms_many([generator], [out])

    def uniforms_many(self, generators: Sequence[torch.Generator], outs: Sequence[torch.Tensor]) -> None:
        """`uniforms` for each generator and its ``out`` (all of one size), on torch's threads in parallel."""
        if not generators:
            return
        count, n = len(generators), outs[0].numel()
        if len(outs) != count or any(out.numel() != n for out in outs):
            raise ValueError("uniforms_many draws the same number of values from each generator, one out each")
        if len({id(g) for g in generators}) != count:  # one stream drawn from two threads at once
            raise ValueError("uniforms_many needs distinct generators")
        states = [g.get_state() for g in generators]
        raw = [s.numpy() for s in states]
        positions = (ctypes.c_int64 * count)(*(625 - int(r[_LEFT : _LEFT + 4].view("int32")[0]) for r in raw))
        words = (ctypes.c_void_p * count)(*(r[_WORDS:].ctypes.data for r in raw))
        pointers = (ctypes.c_void_p * count)(*(out.data_ptr() for out in outs))
        self._lib.modscope_uniforms_many(words, positions, pointers, n, count)
        for g, state, r, pos in zip(generators, states, raw, positions):
            r[_LEFT : _LEFT + 4].view("int32")[0] = 625 - pos  # torch counts the words left (+1); 624: twist first
            r[_NEXT : _NEXT + 8].view("uint64")[0] = pos
            g.set_state(state)

    def keep(self, u: torch.Tensor, p: torch.Tensor, w: torch.Tensor, eff: torch.Tensor) -> None:
        """``eff`` (G, S, n) = 0 + [u > p] · w: ``u`` (G, S, n) with unit element stride, ``p`` (G, 1, n), ``w``
        (n,) and ``eff`` contiguous."""
        G, S, n = u.shape
        self._lib.modscope_keep(u.data_ptr(), u.stride(0), u.stride(1), p.data_ptr(), p.stride(0), w.data_ptr(),
                                eff.data_ptr(), G, S, n)

    def logit_grad(self, u: torch.Tensor, g: torch.Tensor, w: torch.Tensor, e: torch.Tensor, out: torch.Tensor,
                   accumulate: bool) -> None:
        """``out`` (G, rows·cols) (+)= Σ_s (1 − u)·e·u / ((1 − u)·e + u)² · g · w for a (rows, cols) weight: ``u``
        (G, S, rows·cols), ``e`` (G, 1, rows·cols), ``w`` and ``out`` with unit element stride, ``g`` (G, S, rows, cols)
        of any strides."""
        G, S, rows, cols = g.shape
        self._lib.modscope_logit_grad(u.data_ptr(), u.stride(0), u.stride(1), g.data_ptr(), *g.stride(), w.data_ptr(),
                                      e.data_ptr(), e.stride(0), out.data_ptr(), out.stride(0), G, S, rows, cols,
                                      int(accumulate))

    def adam_step(self, optimizer: torch.optim.Optimizer, root: torch.Tensor) -> bool:
        """One step of ``optimizer``, a `torch.optim.Adam` over one float32 CPU tensor whose state exists, with the
        arithmetic of torch's single-tensor step; ``root`` is a scratch tensor of the parameter's size. Returns False
        (doing nothing) where the optimizer is not such an Adam: then step it as usual."""
        (group,) = optimizer.param_groups
        (param,) = group["params"]
        state = optimizer.state.get(param)
        options = (group["amsgrad"], group["maximize"], group.get("fused"), group.get("foreach"), group["capturable"],
                   group["differentiable"], group["weight_decay"])
        if not state or options != (False, False, None, None, False, False, 0) or not isinstance(group["lr"], float):
            return False
        grad, m, v = param.grad, state["exp_avg"], state["exp_avg_sq"]
        tensors = (param, grad, m, v, root)
        if any(t is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != param.shape
               for t in tensors):
            return False
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"].item())
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        n = param.numel()
        with torch.no_grad():
            self._lib.modscope_adam_moments(grad.data_ptr(), m.data_ptr(), v.data_ptr(), n, 1 - beta1, beta2, 1 - beta2)
            torch.sqrt(v, out=root)
            self._lib.modscope_adam_apply(param.data_ptr(), m.data_ptr(), root.data_ptr(), n, bias_correction2**0.5,
                                          group["eps"], -(group["lr"] / bias_correction1))
        return True


# -- building, caching and checking the library ------------------------------------------------------------------
def _load() -> tuple[Kernels | None, str]:
    if _turned_off():
        return None, f"native kernels off (MODSCOPE_NATIVE=0): {_FALLBACK}"
    if os.name != "posix":
        return None, f"no native kernels on {platform.system()}: {_FALLBACK}"
    try:
        lib, built = _library()
        found = Kernels(ctypes.CDLL(str(lib)))
        found.build_seconds = built
        problem = _check(found)
    except _NotBuilt as exc:
        return None, f"native kernels not built ({exc}): {_FALLBACK}"
    except OSError as exc:
        return None, f"native kernels not loaded ({exc}): {_FALLBACK}"
    if problem:
        return None, f"native kernels not used ({problem}): {_FALLBACK}"
    found.adam_exact = _check_adam(found)
    how = f"built in {built:.1f} s" if built else "from the cache"
    adam = "" if found.adam_exact else "; Adam stays torch's (its bits differ here)"
    return found, f"native CPU kernels ({how}: {lib}{adam})"


class _NotBuilt(Exception):
    """Why the library could not be built or used here (one clause, for `status`)."""


def _library() -> tuple[Path, float]:
    """The cached library for this source, compiler and CPU (compiled now if missing), and the seconds compiling took."""
    source = resources.files("modscope.masks").joinpath("native.c").read_bytes()
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise _NotBuilt(f"no C compiler {compiler!r} on the PATH; set CC to one")
    folder = _cache_folder()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), _compiler_version(compiler), _cpu_signature(),
                                     str(_torch_uses_openmp()).encode()]))
    lib = folder / f"native-{_ABI}-{key.hexdigest()[:20]}.so"
    if lib.exists():
        _require_own(lib)
        return lib, 0.0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        src = Path(scratch) / "native.c"
        src.write_bytes(source)
        out = Path(scratch) / "native.so"
        openmp = _OPENMP if _torch_uses_openmp() else []
        for extra in ([*openmp, *_TUNED], openmp, _TUNED, []):
            try:
                done = subprocess.run([compiler, *_FLAGS, *extra, str(src), "-o", str(out)], capture_output=True,
                                      timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise _NotBuilt(f"{compiler} failed to run: {exc}") from exc
            if done.returncode == 0:
                break
        else:
            first = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[0][:200]
            raise _NotBuilt(f"{compiler} failed: {first}")
        os.chmod(out, 0o700)
        os.replace(out, lib)  # atomic: another process building at once finds a whole file or none
    return lib, time.perf_counter() - start


def _cache_folder() -> Path:
    """``$XDG_CACHE_HOME/modscope`` (else ``~/.cache/modscope``), made ``0700``, or where that cannot be made (a
    read-only home) ``modscope-native-UID`` in the temporary directory. A folder another user owns or others can
    write to is not used: a library in it could have been put there by someone else."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modscope"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        base = Path(tempfile.gettempdir()) / f"modscope-native-{os.getuid()}"
        try:
            base.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            raise _NotBuilt(f"cannot create a cache folder ({exc.filename}: {exc.strerror})") from exc
    _require_own(base)
    return base


def _require_own(path: Path) -> None:
    info = os.lstat(path)
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(info.st_mode):
        raise _NotBuilt(f"{path} is not private to this user (another owner, a link, or writable by others)")


def _torch_uses_openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _compiler_version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return b""


def _cpu_signature() -> bytes:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = b""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", "rb") as f:
        flags = next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    return platform.machine().encode() + b"\0" + flags


def _check(found: Kernels) -> str | None:
    """Compare every kernel with the torch operations it replaces on a small input; the first difference, if any."""
    if torch.Generator().get_state().numel() != _STATE_BYTES:
        return "this torch's generator state has an unknown layout"
    g, ref = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for n in (1001, 3000, 1):  # starts mid-block, crosses several twists, then one value
        out = torch.empty(n)
        found.uniforms(g, out)
        if not torch.equal(out, torch.rand(n, generator=ref)):
            return "its uniforms differ from torch.rand's"
    if not torch.equal(g.get_state(), ref.get_state()):
        return "it leaves the generator in another state than torch.rand"
    many = [torch.Generator().manual_seed(s) for s in range(3)]
    outs = torch.empty(3, 700)
    found.uniforms_many(many, list(outs))
    if not all(torch.equal(o, torch.rand(700, generator=torch.Generator().manual_seed(s))) for s, o in enumerate(outs)):
        return "its uniforms of several generators differ from torch.rand's"
    G, S, rows, cols = 2, 3, 70, 170  # over the size at which the kernels go parallel
    u = torch.rand(G, S, rows * cols, generator=ref)
    logits = torch.randn(G, 1, rows * cols, generator=ref) * 4
    w = torch.randn(rows * cols, generator=ref)
    eff = torch.empty(G, S, rows * cols)
    found.keep(u, torch.sigmoid(-logits), w, eff)
    if not _same_bits(eff, keep_weights(logits, u, w)):
        return "its effective weights differ from torch's"
    e = torch.exp(-logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP))
    for g_layout in (torch.randn(G, S, rows, cols, generator=ref), torch.randn(G, S, cols, rows, generator=ref).transpose(2, 3)):
        expected = logit_grad(logits, u, g_layout.reshape(G, S, -1), w, 1.0)
        out = torch.full((G, rows * cols), 0.25)
        found.logit_grad(u, g_layout, w, e, out, accumulate=False)
        if not _same_bits(out, expected):
            return "its logit gradient differs from torch's"
        found.logit_grad(u, g_layout, w, e, out, accumulate=True)
        if not _same_bits(out, expected + expected):
            return "its accumulated logit gradient differs from torch's"
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (a NaN equals the same NaN, unlike torch.equal)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _check_adam(found: Kernels) -> bool:
    """Whether `Kernels.adam_step` gives torch's Adam bit for bit over a few steps (sizes with vector tails)."""
    ref = torch.Generator().manual_seed(4321)
    for shape in ((2, 20011), (1, 37)):
        start = torch.randn(shape, generator=ref)
        torch_param, native_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        optimizers = [torch.optim.Adam([p], lr=0.05) for p in (torch_param, native_param)]
        root = torch.empty(shape)
        for step in range(4):
            grad = torch.randn(shape, generator=ref) * 10.0 ** (step - 2)
            torch_param.grad, native_param.grad = grad.clone(), grad.clone()
            optimizers[0].step()
            if step == 0:  # the first step makes the state
                optimizers[1].step()
            elif not found.adam_step(optimizers[1], root):
                return False
        states = [opt.state[p] for opt, p in zip(optimizers, (torch_param, native_param))]
        if not (torch.equal(torch_param, native_param) and all(torch.equal(states[0][k], states[1][k]) for k in states[0])):
            return False
    return True
