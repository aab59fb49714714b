"""The memory plan of a mask-training run: how much memory a step needs, and how to split it into passes that fit.

A step runs the frozen network K tasks x S samples times, each "replica" with its own effective weights W ⊙ m. Per
replica it holds, for the N masked elements: the uniform noise (4 bytes each, and 4 more for the next pass's noise
when a second thread draws it ahead), the effective weights (4) and their gradient (4): 12 (16) bytes per masked weight, plus the replica's activations kept for the backward
pass (measured once on a probe pass of one replica, see `probe_activations`). Per task the run holds the logits,
their gradient, Adam's two moments and a row of thresholds: 20 bytes per masked weight. On top come the process's
memory before training (weights, data, the framework) and the pass buffers of `sampling.StepBuffers` (a row of
exp(-logits) per task of a pass: 4 bytes per masked weight).

On a CPU the peak that counts is the process's resident memory, not the live tensors: glibc keeps freed blocks for
reuse. With room to spare the trainer keeps them on purpose (`retained_heap`: no page faults per step); when the
plan splits the step to fit ``max_memory`` it asks glibc to return every large block as soon as it is freed
(`strict_heap`), so that the resident peak is the live peak that the plan estimates, and steps Adam with torch's fused
kernel, which needs none of the default kernel's temporaries (8 bytes per masked weight and task).

When all K x S replicas do not fit in ``MaskConfig.max_memory``, the step runs them in passes: several whole tasks
per pass, or one task in chunks of samples. Every task draws its noise from its own generator in the same order
whatever the passes, so the masks are the same (a task split into sample chunks sums its gradient in another order:
the logits may differ in the last bits, not the masks).

Example:
    >>> plan = plan_passes(tasks=3, samples=4, per_replica=1000, per_task=100, base=0, limit=8_000 + 300)
    >>> plan.replicas, [(p.tasks, p.samples) for p in plan.passes]
    (8, [(range(0, 2), (0, 4)), (range(2, 3), (0, 4))])
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidParameterError, OutOfMemoryPlanError

if TYPE_CHECKING:
    from .config import MaskConfig

REPLICA_BYTES_PER_WEIGHT = 12
"""Noise, effective weight and its gradient (float32), per masked weight and replica; 4 more when the next pass's
noise is drawn ahead (`AHEAD_BYTES_PER_WEIGHT`)."""
AHEAD_BYTES_PER_WEIGHT = 4
TASK_BYTES_PER_WEIGHT = 20
"""Logits, their gradient, Adam's two moments and a row of thresholds (float32), per masked weight and task."""
ROW_BYTES_PER_WEIGHT = 4
"""exp(-logits) of each task of a pass, kept by the pass buffers for the gradient (float32), per masked weight."""
OPTIMIZER_TEMP_BYTES_PER_WEIGHT = 8
"""Adam's temporaries during its step (the square root of the second moment, then its quotient), per task."""
ACTIVATION_FACTOR = 2.0
"""Saved activations plus their gradients in flight during the backward pass, as a multiple of the saved ones."""
DEFAULT_SHARE = 0.9
"""The share of the free memory that ``max_memory=None`` lets a run use."""


@dataclass(frozen=True)
class Pass:
    """One forward/backward pass of a step: the tasks ``tasks`` with samples ``samples[0]:samples[1]`` each."""

    tasks: range
    samples: tuple[int, int]

    @property
    def replicas(self) -> int:
        return len(self.tasks) * (self.samples[1] - self.samples[0])


@dataclass
class MemoryPlan:
    """The estimate and the passes of one run (see the module docstring)."""

    passes: list[Pass]
    replicas: int
    """The most replicas of one pass."""
    estimate: int
    """Estimated peak bytes of the process with these passes."""
    unchunked: int
    """Estimated peak bytes with all replicas in one pass."""
    limit: int
    """The bytes the run may use (``MaskConfig.max_memory`` or most of the free memory)."""
    parts: dict[str, int] = field(default_factory=dict)
    """The estimate's terms: "base", "tasks", "replicas" (per replica) and "activations" (per replica)."""

    def summary(self) -> str:
        """One line: the estimate and how the step is split.

        Example:
            >>> MemoryPlan([Pass(range(0, 1), (0, 4))], 4, 3 << 30, 3 << 30, 20 << 30).summary()
            'memory plan: about 3.0 GiB peak (limit 20.0 GiB); all 4 task x sample passes at once'
        """
        split = (f"all {self.replicas * len(self.passes)} task x sample passes at once"
                 if len(self.passes) == 1 else f"{len(self.passes)} passes of up to {self.replicas} task x sample pairs "
                 f"(all at once would need about {gib(self.unchunked)})")
        return f"memory plan: about {gib(self.estimate)} peak (limit {gib(self.limit)}); {split}"


def gib(n: float) -> str:
    """Bytes in GiB, MiB or KiB: ``gib(3 << 30) == '3.0 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def parse_bytes(value: int | str | None) -> int | None:
    """``None``, a number of bytes, or a string such as ``"12GB"``, ``"512 MiB"``, ``"2e9"``.

    Example:
        >>> parse_bytes("1.5 GiB"), parse_bytes("12GB"), parse_bytes(1000)
        (1610612736, 12000000000, 1000)
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # type: ignore[return-value]
    if isinstance(value, float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not match:
        raise InvalidParameterError(f"MaskConfig.max_memory must be bytes or a size like '12GB', got {value!r}")
    number, unit, binary = match.groups()
    try:
        scale = (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " ")
        return int(float(number) * scale)
    except ValueError:
        raise InvalidParameterError(f"MaskConfig.max_memory must be bytes or a size like '12GB', got {value!r}") from None


def process_memory(device: torch.device) -> tuple[int, int]:
    """(bytes this process holds now, bytes still free) on ``device``: RSS and available RAM, or CUDA's counters."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.cuda.memory_allocated(device), free
    return _rss(), _available_ram()


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_ram() -> int:
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 1 << 62  # unknown: do not limit


def probe_activations(run: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors that one forward pass (``run``, returning its output) saves for its backward pass.

    Storages of ``exclude`` (weights, inputs) are not counted; each storage counts once; the output counts too.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a functional wrapper): its size
            seen[id(t)] = t.numel() * t.element_size()
            return t
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    outputs = [out] if isinstance(out, torch.Tensor) else [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    for t in outputs:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def plan_passes(tasks: int, samples: int, per_replica: int, per_task: int, base: int, limit: int,
                replicas: int | None = None, prefer: int | None = None, kept_per_replica: int = 0,
                optimizer: int = 0, per_pass_task: int = 0) -> MemoryPlan:
    """Choose the passes of a step.

    The peak is the larger of a pass's (everything of its replicas alive) and the optimizer step's (the replicas'
    reused buffers, ``kept_per_replica`` each, and the optimizer's temporaries, ``optimizer`` bytes), plus the
    buffers kept for each task of the largest pass (``per_pass_task`` each).

    Args:
        tasks, samples: K and S.
        per_replica: bytes one (task, sample) replica needs (its buffers and activations).
        per_task: bytes one task needs whatever the passes (logits and optimizer state).
        base: bytes held before training.
        limit: the bytes the run may use.
        replicas: force this many replicas per pass (``MaskConfig.pass_size``).
        prefer: the most replicas per pass that the step's speed favours (when memory allows more).
        kept_per_replica: bytes of a replica still held during the optimizer step.
        optimizer: bytes of the optimizer step's temporaries.
        per_pass_task: bytes kept for each task of a pass (its row of the pass buffers).

    Raises:
        OutOfMemoryPlanError: not even one replica fits.
    """
    total = tasks * samples
    fixed = base + tasks * per_task

    def peak(c: int) -> int:
        return fixed + max(1, c // samples) * per_pass_task + max(c * per_replica, c * kept_per_replica + optimizer)

    unchunked = peak(total)
    if replicas is None:
        if peak(1) > limit:
            raise OutOfMemoryPlanError(
                f"one mask sample needs about {gib(peak(1))} ({gib(fixed)} for what the process holds (model, data, "
                f"framework) and {tasks} task(s) of logits and optimizer state, {gib(per_replica)} per sample), more "
                f"than the {gib(limit)} allowed (max_memory); mask fewer layers (include=...), use fewer samples or a "
                "smaller batch")
        fit = max(c for c in range(1, total + 1) if c == 1 or peak(c) <= limit)
        replicas = int(min(total, fit, prefer or total))
    replicas = max(1, min(int(replicas), total))
    if replicas >= samples:
        per_pass = replicas // samples
        passes = [Pass(range(k, min(k + per_pass, tasks)), (0, samples)) for k in range(0, tasks, per_pass)]
        replicas = per_pass * samples if tasks > per_pass else total
    else:
        passes = [Pass(range(k, k + 1), (s, min(s + replicas, samples))) for k in range(tasks) for s in range(0, samples, replicas)]
    return MemoryPlan(passes, replicas, peak(replicas), unchunked, limit,
                      {"base": base, "tasks": tasks * per_task, "replica": per_replica, "optimizer": optimizer})


def plan_run(tasks: int, config: MaskConfig, n_masked: int, activations: int, device: torch.device,
             prefer: int | None = None, ahead: bool = False, fused_optimizer: bool = False) -> MemoryPlan:
    """The plan of a run of ``config`` over ``tasks`` tasks: ``n_masked`` masked weights, ``activations`` bytes saved
    by one (task, sample) pass (`probe_activations`), the memory now held and free on ``device``; with
    ``fused_optimizer`` Adam's step needs no temporaries (torch's fused kernel, which the trainer switches to when
    the plan is bound by memory: same masks, logits equal to float noise)."""
    held, free = process_memory(device)
    limit = parse_bytes(config.max_memory) or held + int(DEFAULT_SHARE * free)
    per_weight = REPLICA_BYTES_PER_WEIGHT + (AHEAD_BYTES_PER_WEIGHT if ahead else 0)
    per_replica = per_weight * n_masked + int(ACTIVATION_FACTOR * activations)
    # the logits and their gradient (8 of the 20 bytes per task) exist already: they are part of ``held``
    plan = plan_passes(tasks, config.n_samples, per_replica, (TASK_BYTES_PER_WEIGHT - 8) * n_masked, held, limit,
                       config.pass_size, prefer, kept_per_replica=(per_weight - 4) * n_masked,
                       optimizer=0 if fused_optimizer else OPTIMIZER_TEMP_BYTES_PER_WEIGHT * tasks * n_masked,
                       per_pass_task=ROW_BYTES_PER_WEIGHT * n_masked)
    plan.parts["activations"] = activations
    return plan


def fused_adam_supported(device: torch.device) -> bool:
    """Whether torch has a fused Adam kernel for ``device`` (CPU and CUDA since torch 2.4)."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT = 128 * 1024  # glibc's initial trim and mmap thresholds
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # 1 GiB where glibc accepts it, else its usual maximum on 64-bit systems
_TRIM_RETAINED = 2**31 - 1  # the largest value mallopt takes (an int)


_HEAP_BLOCKS = [0]  # open heap blocks (nested trainers share the outermost's setting)


@contextlib.contextmanager
def _heap_thresholds(mmap: Sequence[int], trim: int) -> Iterator[None]:
    """Set glibc's mmap and trim thresholds while the outermost such block is open; then back to glibc's defaults."""
    libc = _glibc()
    if libc is None:
        yield
        return
    if _HEAP_BLOCKS[0] == 0:
        any(libc.mallopt(_M_MMAP_THRESHOLD, size) for size in mmap)
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
    _HEAP_BLOCKS[0] += 1
    try:
        yield
    finally:
        _HEAP_BLOCKS[0] -= 1
        if _HEAP_BLOCKS[0] == 0:
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            libc.malloc_trim(0)


def retained_heap(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Keep freed memory in the process (glibc) while training, so the step's arrays are reused, not re-faulted.

    By default glibc returns freed blocks of the heap top to the system and serves blocks over its mmap threshold
    with fresh mappings: a step that frees and re-allocates its activations and gradients (autograd allocates them)
    then pays page faults, system time, on every step. Inside this block allocations up to 1 GiB (32 MiB on older
    glibc) come from the heap and freed memory is kept; when the last such block exits the thresholds go back to
    glibc's defaults and the kept memory is returned. The price is fragmentation: the process may hold more than its
    live peak, so the trainer uses this only when its memory plan leaves room (`HEAP_HEADROOM`). Elsewhere than
    glibc this does nothing.

    Example:
        >>> with retained_heap():
        ...     x = sum(torch.ones(1000) for _ in range(3))
    """
    return _heap_thresholds(_MMAP_THRESHOLDS, _TRIM_RETAINED) if enabled else contextlib.nullcontext()


def strict_heap() -> contextlib.AbstractContextManager[None]:
    """Return every freed block over 128 KiB to the system at once (glibc), so that resident memory follows the live
    tensors: without it glibc raises its mmap threshold as large blocks are freed and keeps later ones on the heap,
    and a run split into passes to fit ``max_memory`` held up to 10% more than its live peak (measured on a
    ResNet-50 layout). The price is page faults on every step; the trainer uses it only when the plan is tight.

    Example:
        >>> with strict_heap():
        ...     x = sum(torch.ones(100_000) for _ in range(3))
    """
    return _heap_thresholds((_GLIBC_DEFAULT,), _GLIBC_DEFAULT)  # fixed: glibc stops raising it


HEAP_HEADROOM = 1.5
"""Keep freed memory only when the plan's estimate times this is within the limit (measured: BERT-base in passes of
one sample held 21% more than its live peak with freed memory kept)."""


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None
