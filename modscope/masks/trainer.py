"""`train_masks`: learn one binary weight mask per task on a frozen network.

Method (Csordás et al., ICLR 2021; docs/method.md sections 2-3): every masked weight W gets a logit l per task,
initialised to ``init``. At each step, S hard Gumbel-sigmoid samples of every task's mask are drawn
(`sampling.sample_masks`); the batch of B examples is split into S contiguous chunks, chunk s runs the network with
the effective weights W ⊙ m_s. The loss is the task loss plus (β/b)·Σ l; Adam updates the logits only; each task's
mask gradients are clipped to ``grad_clip`` by global norm. After training the mask is m = [l > 0].

modscope runs the user's unmodified module: `torch.func.functional_call` substitutes the effective weights and
`torch.func.vmap` batches the K tasks x S samples into one call. Where an operator has no batching rule, the step
falls back to a loop over (task, sample) and says so once. Tasks are trained jointly but independently: losses are
summed, clipping is per task and Adam is element-wise, so a task's mask does not depend on the others.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import threads
from ..devices import resolve_device
from ..errors import InvalidParameterError, ModscopeWarning, OutOfMemoryPlanError, ShapeError
from ..model import Model, WeightInfo
from ..tasks import Task
from . import native
from .checkpoint import TrainingState, load_checkpoint, save_checkpoint
from .config import MaskConfig
from .convergence import warn_if_unconverged
from .distributed import (
    DistributedError,
    DistributedStep,
    Ranks,
    lost_rank_message,
)
from .maskset import MaskSet
from .memory import (
    HEAP_HEADROOM,
    MemoryPlan,
    fused_adam_supported,
    plan_run,
    probe_activations,
    retained_heap,
    strict_heap,
)
from .progress import Progress
from .sampling import SamplerKernels, StepBuffers, draw_uniforms, draw_uniforms_many
from .selection import frozen_weights, select_weights

_NO_BATCHING_RULE = "not yet implemented the batching rule"
TUNE_MIN_STEPS = 100  # runs this long or longer time the candidate pass groupings over their first steps


@dataclass
class _Layout:
    """Where each masked weight lives in the flat (K, N) logit matrix."""

    weights: list[WeightInfo]
    offsets: list[int]
    total: int

    @classmethod
    def of(cls, weights: list[WeightInfo]) -> _Layout:
        offsets = [0]
        for w in weights:
            offsets.append(offsets[-1] + w.numel)
        return cls(weights, offsets[:-1], offsets[-1])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(..., N)`` -> ``{name: (..., *shape)}`` views."""
        lead = flat.shape[:-1]
        return {
            w.name: flat[..., a : a + w.numel].reshape(*lead, *w.shape) for w, a in zip(self.weights, self.offsets)
        }


class _StepRunner:
    """Runs the network for one step: K tasks x S mask samples, vectorized with vmap or looped."""

    def __init__(self, model: Model, module: torch.nn.Module, tasks: Sequence[Task], layout: _Layout, config: MaskConfig, device: torch.device):
        self.model, self.module, self.tasks, self.layout, self.config, self.device = model, module, tasks, layout, config, device
        self.mode = "loop" if config.vectorize == "loop" else "vmap"
        self.settled = config.vectorize != "auto"
        params = model.parameters(device)
        self.masked = {w.name: params[w.name] for w in layout.weights}
        self.fixed = {n: p for n, p in params.items() if n not in self.masked}
        groups: dict[Any, list[int]] = {}
        for k, task in enumerate(tasks):
            groups.setdefault(task.signature(), []).append(k)
        self.groups = list(groups.values())
        self.kernels = SamplerKernels(compile=config.use_compile(device))

    def first_outputs(self, effective: dict[str, torch.Tensor], batches: list, tasks: range | None = None,
                      samples: tuple[int, int] | None = None) -> list[torch.Tensor] | None:
        """`outputs` on the first step in "auto" mode: try vmap, and settle on the loop if it cannot batch."""
        self.settled = True
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = self.outputs(effective, batches, tasks, samples)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0][:160]
        else:
            slow = [w for w in caught if _NO_BATCHING_RULE in str(w.message)]
            for w in caught:
                if w not in slow:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if not slow:
                return outputs
            reason = str(slow[0].message).split(";")[0][:160]
        self.mode = "loop"
        _announce_loop(reason)
        return None

    def _call(self, params: dict[str, torch.Tensor], *xs: torch.Tensor, names: tuple[str, ...] = ()) -> Any:
        return self.model.run(self.module, {**self.fixed, **params}, xs, names)

    def outputs(self, effective: dict[str, torch.Tensor], batches: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]],
                tasks: range | None = None, samples: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """The selected outputs of ``tasks`` (default all) on their batch rows of ``samples`` (default all S).

        ``effective[name]`` is (G, s, *shape) for the G tasks and s samples of the pass: sample s runs on chunk s of
        its task's batch (each of B/S examples). Returns one output per task of the pass, its rows in batch order.
        """
        S = self.config.n_samples
        tasks = tasks if tasks is not None else range(len(self.tasks))
        s0, s1 = samples or (0, S)
        n = s1 - s0
        results: list[torch.Tensor] = [torch.empty(0)] * len(tasks)
        for group in self.groups:
            members = [(g, k) for g, k in enumerate(tasks) if k in group]
            if not members:
                continue
            whole = len(members) == len(tasks)
            eff = {name: (t if whole else t[[g for g, _ in members]]) for name, t in effective.items()}  # (G, s, *shape)
            if self.mode == "vmap":
                n_inputs = len(batches[members[0][1]][0])
                stacked = (torch.stack([batches[k][0][i] for _, k in members]) for i in range(n_inputs))  # (G, B, ...)
                xs = tuple(_sample_rows(x, S, s0, s1).reshape(len(members) * n, x.shape[1] // S, *x.shape[2:]) for x in stacked)
                names = self.tasks[members[0][1]].input_names
                out = torch.func.vmap(self._call)({name: t.flatten(0, 1) for name, t in eff.items()}, *xs, names=names)
                for i, (g, k) in enumerate(members):
                    chunk = pytree.tree_map(lambda t, i=i: t[i * n : (i + 1) * n].flatten(0, 1), out)
                    results[g] = self.tasks[k].select_output(chunk)
            else:
                for i, (g, k) in enumerate(members):
                    parts = [x.chunk(S) for x in batches[k][0]]
                    outs = [self._call({name: t[i, j] for name, t in eff.items()}, *(p[s0 + j] for p in parts),
                                       names=self.tasks[k].input_names) for j in range(n)]
                    results[g] = torch.cat([self.tasks[k].select_output(o) for o in outs])
        return results


def _sample_rows(x: torch.Tensor, n_samples: int, s0: int, s1: int) -> torch.Tensor:
    """The batch rows of samples s0..s1 of a (G, B, ...) input."""
    if (s0, s1) == (0, n_samples):
        return x
    chunk = x.shape[1] // n_samples
    return x[:, s0 * chunk : s1 * chunk]


class _TaskGenerators:
    """One noise and one data generator per task, seeded from the config seed and the task's name.

    A task's random streams therefore do not depend on which other tasks are trained with it: training "a" alone or
    together with "b" gives "a" the same mask.
    """

    def __init__(self, tasks: Sequence[Task], seed: int):
        keys = [zlib.crc32(t.name.encode()) for t in tasks]
        self.noise = [torch.Generator().manual_seed(seed * 0x100000001 + k) for k in keys]
        self.data = [torch.Generator().manual_seed(seed * 0x100000001 + k + 0x5EED) for k in keys]

    def all(self) -> list[torch.Generator]:
        return self.noise + self.data


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a checkpoint always holds a whole step.

    Handlers are installed only in the main thread and restored on exit; a second signal interrupts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = {"set": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: flag["set"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _announce_loop(reason: str) -> None:
    warnings.warn(
        f"torch.func.vmap cannot batch an operation of this model ({reason}) and modscope has no batchable stand-in "
        "for it; training masks with a loop over samples instead (same masks, slower). Pass "
        "MaskConfig(vectorize='loop') to skip the attempt.",
        ModscopeWarning,
        stacklevel=3,
    )


def _clip_per_task(grad: torch.Tensor, max_norm: float, norms: torch.Tensor | None = None) -> None:
    """Scale each task's row of ``grad`` to at most ``max_norm`` (``norms``: the rows' norms, when ``grad`` holds a
    part of each row)."""
    norms = grad.norm(dim=1, keepdim=True) if norms is None else norms
    grad.mul_(torch.clamp(max_norm / (norms + 1e-6), max=1.0))


def train_masks(
    model: Model | torch.nn.Module,
    tasks: Sequence[Task] | Task,
    config: MaskConfig | None = None,
    *,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    initial_logits: dict[str, torch.Tensor] | None = None,
    notes: Callable[[str], None] | None = None,
) -> MaskSet:
    """Train one mask per task on the frozen ``model``.

    Args:
        model: a `Model` (from `modscope.load`) or a torch module.
        tasks: the tasks, or one task; names must be unique.
        config: a `MaskConfig`; the paper's defaults when omitted.
        progress: False for silence; by default a live bar on a terminal, a plain line every 10 s elsewhere
            (``$MODSCOPE_PROGRESS_INTERVAL`` sets the seconds).
        checkpoint: a file to save the training state to every ``checkpoint_every`` steps and on Ctrl-C.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` if it exists (same tasks, config and model required); the result is
            the same as that of an uninterrupted run.
        initial_logits: ``{weight name: logits}`` to start from instead of ``config.init`` (for every task), e.g. the
            control mask's logits of layers listed in ``config.freeze``.
        notes: called with one-line notes: before training the memory plan's estimate (`memory.MemoryPlan`) and, on a
            CPU, whether the `native` kernels run the step's element-wise work; after it the sampler's compilation
            time when it was compiled.

    Returns:
        A `MaskSet` with one mask per task, the logits, the config and the training curves.

    Raises:
        InvalidParameterError: no tasks, duplicate names, or a bad config/device.
        DataError: a task's data does not fit the model.

    Example:
        >>> import torch, modscope
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        >>> config = modscope.MaskConfig(n_steps=20, batch_size=32)
        >>> masks = modscope.train_masks(net, [modscope.Task("sign", x, y)], config, progress=False)
        >>> masks.tasks
        ('sign',)
    """
    model = Model.of(model)
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    config = config or MaskConfig()
    _check_tasks(tasks)
    device = resolve_device(config.device)
    ranks = Ranks.current()  # a torch.distributed run: rank 0 alone shows progress and writes (masks.distributed)
    if ranks is not None and not ranks.leader:
        progress, notes = False, None
    bar = Progress(config.n_steps, enabled=progress)
    ckpt_path = Path(checkpoint) if checkpoint else None
    with threads.limited(config.threads, announce=progress is not False), model.frozen(device, train=config.train_mode) as module:
        trainer = MaskTrainer(model, module, tasks, config, device, initial_logits=initial_logits)
        state = TrainingState(0, {t.name: {"step": [], "loss": [], "density": []} for t in tasks}, [0.0] * len(tasks))
        resuming = bool(resume and ckpt_path and ckpt_path.exists())
        if ranks is not None:  # rank 0's view of the run folder decides (a rank that cannot read it stops the run)
            resuming = ranks.share(resuming)
        if resuming and ckpt_path:
            state = trainer.load(ckpt_path)
        if notes:
            notes(trainer.distributed.summary() if trainer.distributed else trainer.plan.summary())
            if device.type == "cpu":
                notes(f"mask step: {native.status()}")
        bar.start(state.step)
        saved = state.step if resuming else None
        stop = (lambda flag: ranks.any(flag)) if ranks is not None else (lambda flag: flag)
        try:
            with _deferred_interrupts() as interrupted:
                while state.step < config.n_steps and not stop(interrupted()):
                    losses = trainer.step().tolist()
                    state.window = [a + b for a, b in zip(state.window, losses)]
                    state.window_steps += 1
                    state.step += 1
                    if state.step % config.log_every == 0 or state.step == config.n_steps:
                        _record(state, tasks, trainer.density())
                        bar.update(state.step, *_last_point(state))
                    if ckpt_path and state.step % checkpoint_every == 0 and state.step < config.n_steps:
                        trainer.save(ckpt_path, state)
                        saved = state.step
            if state.step < config.n_steps:  # stopped by Ctrl-C or SIGTERM at a step boundary
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            if ckpt_path:
                trainer.save(ckpt_path, state)
            raise
        except DistributedError as exc:  # a rank stopped: the last checkpoint stays as it is
            raise DistributedError(lost_rank_message(exc, ckpt_path, saved)) from exc
        finally:
            bar.close()
            trainer.close()
    if notes and trainer.runner.kernels.compiled:
        notes(f"compiling the mask sampler took {trainer.runner.kernels.compile_seconds:.1f} s")
    if notes and trainer.tuned:
        notes(trainer.tuned)
    if ranks is None or ranks.leader:  # one warning per run, not per rank
        warn_if_unconverged(state.curves)
    return trainer.result(state.curves)


class MaskTrainer:
    """The state of one mask-training run and its step; `train_masks` drives it (benchmarks time `step`).

    Logits of all K tasks live in one (K, N) matrix over the N masked elements, so one noise draw, one sampler call
    and one Adam update serve every task and weight. In a distributed run (`masks.distributed`) ``logits`` is that
    matrix, flattened, as a DTensor sharded over the ranks, with its gradient and Adam's moments.
    """

    def __init__(
        self,
        model: Model,
        module: torch.nn.Module,
        tasks: Sequence[Task],
        config: MaskConfig,
        device: torch.device,
        *,
        initial_logits: dict[str, torch.Tensor] | None = None,
    ):
        self.model, self.tasks, self.config, self.device = model, list(tasks), config, device
        self.weights = select_weights(model, config)
        self.layout = _Layout.of(self.weights)
        K, N = len(self.tasks), self.layout.total
        logits = torch.full((K, N), config.init, device=device)
        if initial_logits:
            _set_initial(logits, self.layout, initial_logits)
        self.logits = torch.nn.Parameter(logits)
        self.trainable = torch.ones(N, dtype=torch.bool, device=device)
        frozen = frozen_weights(self.weights, config)
        for w, offset in zip(self.weights, self.layout.offsets):
            if w.name in frozen:
                self.trainable[offset : offset + w.numel] = False
        self._frozen_any = bool(frozen)
        self.optimizer = torch.optim.Adam([self.logits], lr=config.lr)
        self.gens = _TaskGenerators(self.tasks, config.seed)
        self.runner = _StepRunner(model, module, self.tasks, self.layout, config, device)
        self._masked = [self.runner.masked[w.name] for w in self.weights]
        self._plan: MemoryPlan | None = None
        self._heap: contextlib.AbstractContextManager | None = None  # glibc keeps freed memory while this is open
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        self._draw_pool = ThreadPoolExecutor(min(threads, len(self.tasks) + 1)) if threads > 1 else None
        self._ahead = False
        self._fast_noise = False  # the native kernel draws the noise (set with the plan)
        self._adam_root: torch.Tensor | None = None
        self._tuner: _PassTuner | None = None
        self.tuned = ""
        """After the pass groupings were timed: one line on what was measured and chosen."""
        self._next: tuple[Future, dict[int, torch.Tensor]] | None = None  # the pass drawn ahead, the states before it
        self._drawn = 0  # passes drawn so far (their slot alternates)
        self.identity = {"tasks": [t.name for t in self.tasks], "config": _identity_config(config), "model": model.checksum, "n_masked": N}
        ranks = Ranks.current()  # several ranks: the logits, their gradient and Adam's state become sharded DTensors
        self.distributed = DistributedStep(self, ranks) if ranks is not None else None
        if self.distributed is None:
            self.logits.grad = torch.zeros_like(self.logits)

    @property
    def plan(self) -> MemoryPlan:
        """The memory plan: the estimate and the passes of a step (made on the first step, or when first asked for)."""
        if self._plan is None:
            self._make_plan(self.tasks[0].batch(torch.arange(min(len(self.tasks[0]), self.config.batch_size)), self.device)[0])
        assert self._plan is not None
        return self._plan

    def _make_plan(self, xs: tuple[torch.Tensor, ...]) -> None:
        """Plan the passes from one probe pass on the first task's examples ``xs`` and allocate the step buffers."""
        xs = tuple(x[: self.config.batch_size // self.config.n_samples] for x in xs)
        activations = self._probe_activations(xs)
        # draw the next pass's noise while this one computes, unless the native kernel draws it: that takes about
        # 1 ms per task, and in a thread of its own it would stall the step's parallel work on the core it takes
        float32 = not self._masked or self._masked[0].dtype == torch.float32  # the noise buffers' dtype
        self._fast_noise = self.device.type == "cpu" and float32 and native.kernels() is not None
        if self.device.type == "cpu" and float32:
            native.warn_once_if_missing()
        ahead = self._draw_pool is not None and not self._fast_noise

        def plan(fused: bool, prefer: int | None = self._preferred_replicas()) -> MemoryPlan:
            return plan_run(len(self.tasks), self.config, self.layout.total, activations, self.device,
                            prefer=prefer, ahead=ahead, fused_optimizer=fused)

        # bound by memory: Adam's fused kernel needs no temporaries (float-noise differences in the logits only)
        fusable = self.distributed is None and fused_adam_supported(self.device)  # sharded Adam: its own kernel
        try:
            self._plan = plan(False)
            fused = fusable and self._plan.unchunked > self._plan.limit
        except OutOfMemoryPlanError:
            if not fusable:
                raise
            fused = True
        if fused:
            self._plan = plan(True)
        if self.distributed is None:
            for group in self.optimizer.param_groups:  # also overrides what a resumed checkpoint's state says
                group["fused"] = True if fused else None
        if self.device.type == "cpu":  # keep freed memory when there is room, else return it at once (see memory)
            self._heap = retained_heap() if self._plan.estimate * HEAP_HEADROOM <= self._plan.limit else strict_heap()
            self._heap.__enter__()
        self._use_plan(self._plan, ahead)
        if not fused and self._tunable():
            plans = [self._plan]
            S = self.config.n_samples
            for prefer in (S, S * len(self.tasks)):  # one task per pass, all tasks at once
                candidate = plan(False, prefer)
                fits = candidate.estimate * HEAP_HEADROOM <= candidate.limit and _whole(candidate, self.config.n_samples)
                if fits and candidate.replicas not in [p.replicas for p in plans]:
                    plans.append(candidate)
            if len(plans) > 1:
                self._tuner = _PassTuner(plans, ahead)

    def _use_plan(self, plan: MemoryPlan, ahead: bool) -> None:
        """Run the steps from now on in the passes of ``plan``, with step buffers sized for it."""
        self._drop_ahead()  # drawn for the old plan's next pass
        self._plan = plan
        most_tasks = max(len(p.tasks) for p in plan.passes)
        self._ahead = ahead and _whole(plan, self.config.n_samples)
        self.buffers = StepBuffers(self._masked, self.layout.offsets, plan.replicas, most_tasks, slots=2 if self._ahead else 1)

    def _drop_ahead(self) -> None:
        """Discard the noise drawn ahead (if any) and put its streams back where they were before it: the next pass
        draws it again, the same values."""
        if self._next is not None:
            self._next[0].result()
            for k, state in self._next[1].items():
                self.gens.noise[k].set_state(state)
            self._next, self._drawn = None, 0

    def _tunable(self) -> bool:
        """Whether to time the pass groupings: several tasks, whole-task passes (any grouping then gives the same
        bits), no pass size set by the user, one process, and a run long enough to repay the timing steps."""
        assert self._plan is not None
        return (len(self.tasks) > 1 and self.config.pass_size is None and self.distributed is None
                and self.config.n_steps >= TUNE_MIN_STEPS and _whole(self._plan, self.config.n_samples))

    def _preferred_replicas(self) -> int | None:
        """The pass size the step's speed favours when memory allows any: on a GPU all tasks at once; on a CPU as many
        whole tasks as threads (their noise is drawn in parallel; larger passes only leave the caches: measured on
        the paper's FNN, 10 tasks in passes of one task took 0.84x the time of one pass of all ten, at one thread)."""
        if self.device.type != "cpu":
            return None
        return self.config.n_samples * max(1, min(len(self.tasks), torch.get_num_threads()))

    def _probe_activations(self, xs: tuple[torch.Tensor, ...]) -> int:
        """Bytes one (task, sample) pass keeps for its backward pass, measured on one plain pass (0 if it fails:
        the first step then explains the failure). Buffers and the global random state are restored after it."""
        task, names = self.tasks[0], [w.name for w in self.weights]
        leaves = [w.detach().requires_grad_() for w in self._masked]
        fixed = self.runner.fixed
        saved = {n: t.clone() for n, t in fixed.items()} if self.config.train_mode else {}
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return probe_activations(lambda: task.select_output(self.runner._call(dict(zip(names, leaves)), *xs, names=task.input_names)),
                                         exclude=[*self._masked, *fixed.values(), *xs])
        except Exception:  # noqa: BLE001 - the first step reports it
            return 0
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    fixed[n].copy_(t)

    def step(self) -> torch.Tensor:
        """One optimisation step of every task's mask; returns the task losses (K,).

        The K tasks x S samples run in the passes of the memory plan (`plan`); their logit gradients are written
        straight into ``logits.grad`` by `sampling.StepBuffers` (no autograd graph through the sampler).
        """
        if self.distributed is not None:
            return self.distributed.step()
        config, S = self.config, self.config.n_samples
        start = time.perf_counter()
        batches = [t.batch(torch.randint(len(t), (config.batch_size,), generator=g), self.device) for t, g in zip(self.tasks, self.gens.data)]
        if self._plan is None:
            self._make_plan(batches[0][0])
        grad = self.logits.grad
        assert grad is not None
        losses = torch.empty(len(self.tasks))
        passes, i = self.plan.passes, 0
        while i < len(passes):
            tasks = passes[i].tasks
            if passes[i].samples == (0, S):
                losses[tasks.start : tasks.stop] = self._whole_tasks(tasks, batches, grad)
                i += 1
            else:  # one task in chunks of samples: the consecutive passes of that task
                ranges = [p.samples for p in passes[i:] if p.tasks == tasks]
                losses[tasks.start] = self._split_task(tasks, ranges, batches, grad)
                i += len(ranges)
        self._update(grad)
        if self._tuner is not None:
            self._next_plan(time.perf_counter() - start)
        return losses

    def _next_plan(self, seconds: float) -> None:
        """Give the tuner this step's time; switch to the plan it names (the next candidate, then the fastest)."""
        assert self._tuner is not None
        switch = self._tuner.record(seconds)
        if switch is not None and switch is not self._plan:
            self._use_plan(switch, self._tuner.ahead)
        if self._tuner.done:
            self.tuned = self._tuner.summary(len(self.tasks))
            self._tuner = None

    def _update(self, grad: torch.Tensor) -> None:
        """The penalty's gradient, the frozen weights, the per-task clipping and the Adam step, on the summed loss
        gradient ``grad`` (K, N)."""
        config = self.config
        grad.add_(config.alpha)  # the gradient of the penalty (β/b)·Σ l
        if self._frozen_any:  # (times 1 changes nothing: skipped when every weight trains)
            grad.mul_(self.trainable)
        if config.grad_clip is not None:
            _clip_per_task(grad, config.grad_clip, self.distributed.sharded.norms(grad) if self.distributed else None)
        if not self._native_adam():
            self.optimizer.step()

    def _native_adam(self) -> bool:
        """Adam's step in the native kernels (torch's arithmetic in 3 passes instead of 7), where they give torch's
        bits here and the optimizer is the plain single-tensor Adam; False where it is left to torch."""
        fast = native.kernels() if self.distributed is None and self.device.type == "cpu" else None
        if fast is None or not fast.adam_exact or self.optimizer.param_groups[0].get("fused"):
            return False
        if self._adam_root is None:  # the square root of the second moment, kept between steps
            self._adam_root = torch.empty_like(self.logits.detach())
        return fast.adam_step(self.optimizer, self._adam_root)

    def _sample(self, tasks: range, samples: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Draw the pass's noise (each task from its own stream, in sample order) and its effective weights."""
        if self._ahead:
            uniforms = self._take_ahead(tasks)
        else:
            uniforms = self.buffers.uniforms(len(tasks), samples[1] - samples[0])
            self._draw(tasks, samples, uniforms, parallel=True)
        rows = self.logits.detach()[tasks.start : tasks.stop]
        effective = self.buffers.effective(rows, uniforms, self._masked, self.runner.kernels)
        return rows, uniforms, [e.detach().requires_grad_() for e in effective]

    def _draw(self, tasks: range, samples: tuple[int, int], uniforms: torch.Tensor, parallel: bool) -> None:
        n, N = samples[1] - samples[0], self.layout.total

        def draw(g: int) -> None:
            draw_uniforms((n, N), self.gens.noise[tasks[g]], self.device, out=uniforms[g])

        if self._fast_noise:  # all tasks in one call, on torch's threads
            draw_uniforms_many([self.gens.noise[k] for k in tasks], list(uniforms[: len(tasks)]))
        elif parallel and len(tasks) > 1 and self._draw_pool is not None:  # each stream is serial, different tasks' not
            list(self._draw_pool.map(draw, range(len(tasks))))
        else:
            for g in range(len(tasks)):
                draw(g)

    def _take_ahead(self, tasks: range) -> torch.Tensor:
        """The noise of this pass (drawn ahead, or now on the first pass), after starting the next pass's draw.

        Passes run in the plan's order step after step, so the next pass is known; its slot is the one the previous
        pass used, which is finished. The streams are drawn in the same order as without drawing ahead."""
        passes, S = self.plan.passes, self.config.n_samples
        slot = self._drawn % 2
        uniforms = self.buffers.uniforms(len(tasks), S, slot)
        if self._next is None:
            self._draw(tasks, (0, S), uniforms, parallel=False)
        else:
            self._next[0].result()
        index = next(i for i, p in enumerate(passes) if p.tasks == tasks)
        following = passes[(index + 1) % len(passes)].tasks
        ahead = self.buffers.uniforms(len(following), S, 1 - slot)
        states = {k: self.gens.noise[k].get_state() for k in following}
        assert self._draw_pool is not None
        self._next = (self._draw_pool.submit(self._draw, following, (0, S), ahead, False), states)
        self._drawn += 1
        return uniforms

    def _outputs(self, leaves: list[torch.Tensor], batches: list, tasks: range, samples: tuple[int, int]) -> list[torch.Tensor]:
        runner = self.runner
        effective = {w.name: t for w, t in zip(self.weights, leaves)}
        if runner.settled:
            return runner.outputs(effective, batches, tasks, samples)
        try:
            outputs = runner.first_outputs(effective, batches, tasks, samples)
            return outputs if outputs is not None else runner.outputs(effective, batches, tasks, samples)
        except Exception as exc:  # noqa: BLE001 - the first step is where data and model meet: explain, keep the cause
            chunk = self.config.batch_size // self.config.n_samples
            raise ShapeError(
                f"the model fails on the tasks' data in chunks of {chunk} examples ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'}); check the input shapes, and for "
                "torch.export programs export with a dynamic batch dimension"
            ) from exc

    def _backward(self, rows: torch.Tensor, uniforms: torch.Tensor, leaves: list[torch.Tensor], grads: Sequence[torch.Tensor | None],
                  grad: torch.Tensor, accumulate: bool) -> None:
        self.buffers.logit_grad(rows, uniforms, grads, grad, self.config.tau, accumulate, self.runner.kernels)

    def _whole_tasks(self, tasks: range, batches: list, grad: torch.Tensor) -> torch.Tensor:
        """One pass over whole tasks: their losses, and their logit gradients written into ``grad``."""
        S = self.config.n_samples
        rows, uniforms, leaves = self._sample(tasks, (0, S))
        outputs = self._outputs(leaves, batches, tasks, (0, S))
        losses = torch.stack([self.tasks[k].loss_fn()(out, batches[k][1]) for k, out in zip(tasks, outputs)])
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        self._backward(rows, uniforms, leaves, grads, grad[tasks.start : tasks.stop], accumulate=False)
        return losses.detach()

    def _split_task(self, tasks: range, ranges: list[tuple[int, int]], batches: list, grad: torch.Tensor) -> torch.Tensor:
        """One task in passes of a few samples: outputs first (no graph), the loss on the whole batch, then each pass
        again with its share of the loss gradient (its noise redrawn from the same generator state)."""
        k = tasks.start
        generator = self.gens.noise[k]
        state = generator.get_state()
        with torch.no_grad():
            pieces = [self._outputs(self._sample(tasks, r)[2], batches, tasks, r)[0] for r in ranges]
        whole = torch.cat(pieces).requires_grad_()
        loss = self.tasks[k].loss_fn()(whole, batches[k][1])
        (d_whole,) = torch.autograd.grad(loss, whole)
        generator.set_state(state)
        for r, d_out in zip(ranges, d_whole.split([len(p) for p in pieces])):
            rows, uniforms, leaves = self._sample(tasks, r)
            (out,) = self._outputs(leaves, batches, tasks, r)
            grads = torch.autograd.grad(out, leaves, grad_outputs=d_out, allow_unused=True)
            self._backward(rows, uniforms, leaves, grads, grad[k : k + 1], accumulate=r[0] > 0)
        return loss.detach()

    def close(self) -> None:
        """Stop the noise-drawing threads (if any) and let glibc return the memory kept for reuse."""
        if self._next is not None:
            self._next[0].result()
        if self._draw_pool is not None:
            self._draw_pool.shutdown()
            self._draw_pool = None
        if self._heap is not None:
            self._heap.__exit__(None, None, None)
            self._heap = None

    def save(self, path: Path, state: TrainingState) -> None:
        """Save the run at its step boundary: noise drawn ahead for the next step is dropped first (and drawn again).
        In a distributed run every rank calls it and rank 0 writes."""
        if self.distributed is not None:
            self.distributed.save(path, state)
            return
        self._drop_ahead()
        save_checkpoint(path, self.identity, state, self.logits, self.optimizer, self.gens.all())

    def load(self, path: Path) -> TrainingState:
        """Restore the state saved in ``path`` (in a distributed run: on every rank, each keeping its shards)."""
        if self.distributed is not None:
            return self.distributed.load(path)
        return load_checkpoint(path, self.identity, self.logits, self.optimizer, self.gens.all())

    def density(self) -> torch.Tensor:
        """Each task's fraction of kept weights now (K,); in a distributed run a collective."""
        if self.distributed is not None:
            return self.distributed.sharded.density()
        return (self.logits.detach() > 0).float().mean(dim=1).cpu()

    def result(self, curves: dict[str, dict[str, list[float]]]) -> MaskSet:
        whole = self.distributed.sharded.full() if self.distributed is not None else self.logits.detach()
        per_weight = self.layout.split(whole.cpu())
        logits = {t.name: {w.name: per_weight[w.name][k] for w in self.weights} for k, t in enumerate(self.tasks)}
        return MaskSet(logits, self.weights, config=self.config, curves=curves, model_checksum=self.model.checksum,
                       extra={"vectorize": self.runner.mode})


def _whole(plan: MemoryPlan, n_samples: int) -> bool:
    return all(p.samples == (0, n_samples) for p in plan.passes)


class _PassTuner:
    """Times each candidate grouping of the tasks into passes over a few steps and settles on the fastest.

    In whole-task passes each task's arithmetic is its own, so every grouping gives the same bits and the steps spent
    timing are ordinary training steps. Each candidate gets one step to settle (its buffers are new) and two timed
    steps; the fastest median wins.

    Example:
        >>> from modscope.masks.memory import MemoryPlan, Pass
        >>> plans = [MemoryPlan([Pass(range(k, k + n), (0, 4)) for k in range(0, 4, n)], 4 * n, 0, 0, 1) for n in (1, 2)]
        >>> tuner = _PassTuner(plans, ahead=False)
        >>> [tuner.record(t) is not None for t in (1.0, 0.5, 0.5, 1.0, 0.3, 0.3)]
        [False, False, True, False, False, True]
        >>> tuner.done, tuner.choice is plans[1]
        (True, True)
    """

    SETTLE, TIMED = 1, 2

    def __init__(self, plans: list[MemoryPlan], ahead: bool):
        self.plans, self.ahead = plans, ahead
        self.times: list[list[float]] = [[] for _ in plans]
        self.index, self.seen = 0, 0
        self.choice: MemoryPlan | None = None

    @property
    def done(self) -> bool:
        return self.choice is not None

    def record(self, seconds: float) -> MemoryPlan | None:
        """Note one step's time; returns the plan for the next steps when it changes (None: keep the current one)."""
        self.seen += 1
        if self.seen > self.SETTLE:
            self.times[self.index].append(seconds)
        if len(self.times[self.index]) < self.TIMED:
            return None
        self.index, self.seen = self.index + 1, 0
        if self.index < len(self.plans):
            return self.plans[self.index]
        self.choice = self.plans[min(range(len(self.plans)), key=lambda i: statistics.median(self.times[i]))]
        return self.choice

    def summary(self, tasks: int) -> str:
        """One line: the step time of each grouping and the one kept."""
        assert self.choice is not None
        timed = ", ".join(f"{len(p.passes)} pass{'es' if len(p.passes) > 1 else ''} of up to {p.replicas} (task, sample) "
                          f"pairs {statistics.median(t) * 1e3:.1f} ms" for p, t in zip(self.plans, self.times))
        return f"pass grouping of the {tasks} tasks timed over the first steps: {timed}; kept {len(self.choice.passes)} " \
               f"pass{'es' if len(self.choice.passes) > 1 else ''} of up to {self.choice.replicas}"


def _last_point(state: TrainingState) -> tuple[dict[str, float], dict[str, float]]:
    return ({t: c["loss"][-1] for t, c in state.curves.items()}, {t: c["density"][-1] for t, c in state.curves.items()})


def _record(state: TrainingState, tasks: list[Task], density: torch.Tensor) -> None:
    """Append a curve point (mean loss since the last point, ``density`` now) and reset the loss window."""
    for k, t in enumerate(tasks):
        curve = state.curves[t.name]
        curve["step"].append(state.step)
        curve["loss"].append(state.window[k] / max(state.window_steps, 1))
        curve["density"].append(float(density[k]))
    state.window = [0.0] * len(tasks)
    state.window_steps = 0


def _identity_config(config: MaskConfig) -> dict[str, Any]:
    """The config as a checkpoint's identity: settings that cannot change the masks (memory, passes, threads) left
    out."""
    return {k: v for k, v in config.to_dict().items() if k not in ("max_memory", "pass_size", "threads")}


def _check_tasks(tasks: list[Task]) -> None:
    if not tasks:
        raise InvalidParameterError("train_masks needs at least one Task")
    for t in tasks:
        if not isinstance(t, Task):
            raise InvalidParameterError(f"tasks must be modscope.Task objects, got {type(t).__name__}")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidParameterError(f"task names must be unique; {dupes} appear more than once")


def _set_initial(logits: torch.Tensor, layout: _Layout, initial: dict[str, torch.Tensor]) -> None:
    views = layout.split(logits)
    for name, value in initial.items():
        if name not in views:
            raise InvalidParameterError(f"initial_logits names {name!r}, which is not a masked weight")
        target = views[name]
        if tuple(value.shape) != tuple(target.shape[1:]):
            raise InvalidParameterError(f"initial_logits[{name!r}] has shape {tuple(value.shape)}, expected {tuple(target.shape[1:])}")
        target.copy_(value.to(target)[None].expand_as(target))


