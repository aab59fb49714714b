"""Mask training on several processes with `torch.distributed` (data parallel, sharded per-weight state).

Inside an initialised process group of more than one rank (``torchrun --nproc-per-node N -m modscope fit ...``, or
``torch.distributed.init_process_group`` before `modscope.train_masks`), each step's K tasks x S mask samples are
shared out over the ranks (`share_work`). The (K, N) logits, their gradient and Adam's two moments (the 16 bytes per
masked weight per task) are sharded over the ranks by FSDP2's `fully_shard` (`ShardedLogits`), so each rank holds
1/N of them between steps. When the ranks divide the K tasks, the shards are whole tasks and each rank runs exactly
the tasks it holds: it reads and updates its shards in place. Otherwise the shards are runs of masked weights of every
task; each step all-gathers the logits, every rank runs its (task, sample) pairs, and the backward pass
reduce-scatters (sums) the gradients into the shards. Every rank then applies the penalty, the per-task clipping (its
norms summed over the ranks) and plain Adam to its shards. Rank 0 alone writes the checkpoint, which holds the full,
unsharded state in the single-process format, so a run can be resumed on any number of ranks.

The result does not depend on the number of ranks: a task's noise and data come from its own generators (keyed by the
seed and the task's name, see `trainer._TaskGenerators`), and a rank that runs some of a task's samples draws the
task's whole noise of the step and uses its rows, so the streams advance as in one process. A task whose samples are
split over ranks gets the gradient of its whole-batch loss: the ranks exchange that task's outputs (a few numbers per
example) and each back-propagates through its own rows.

Example (two processes on one machine)::

    torchrun --nproc-per-node 2 -m modscope fit model.onnx --task a=a.npz --task b=b.npz --out runs/ab
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import InvalidParameterError, ModscopeError
from .sampling import StepBuffers, draw_uniforms

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from .checkpoint import TrainingState
    from .trainer import MaskTrainer

T = TypeVar("T")
R = TypeVar("R")

#: seconds a collective waits for the other ranks before the run stops (``$MODSCOPE_DIST_TIMEOUT``), when modscope
#: starts the process group itself (under torchrun).
DEFAULT_TIMEOUT = 300.0


class DistributedError(ModscopeError, RuntimeError):
    """A distributed run cannot go on (a rank stopped or stopped answering) or cannot start as launched."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Unit:
    """Samples ``s0..s1`` of task ``task``: one rank's share of one task in a step."""

    task: int
    s0: int
    s1: int


def share_work(n_tasks: int, n_samples: int, world: int) -> list[list[Unit]]:
    """Share the K x S (task, sample) pairs of a step out over ``world`` ranks, in contiguous runs of equal size.

    Example:
        >>> [[(u.task, u.s0, u.s1) for u in units] for units in share_work(3, 4, 2)]
        [[(0, 0, 4), (1, 0, 2)], [(1, 2, 4), (2, 0, 4)]]
    """
    pairs = n_tasks * n_samples
    if world > pairs:
        raise InvalidParameterError(
            f"{world} ranks but only {n_tasks} task(s) x {n_samples} sample(s) = {pairs} (task, sample) pairs to share "
            f"out; launch at most {pairs} ranks, or train more samples (n_samples)")
    shares = []
    for r in range(world):
        lo, hi = r * pairs // world, (r + 1) * pairs // world
        units = []
        for k in range(lo // n_samples, (hi - 1) // n_samples + 1):
            s0, s1 = max(lo - k * n_samples, 0), min(hi - k * n_samples, n_samples)
            units.append(Unit(k, s0, s1))
        shares.append(units)
    return shares


def _timeout() -> datetime.timedelta:
    text = os.environ.get("MODSCOPE_DIST_TIMEOUT", "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise InvalidParameterError(f"$MODSCOPE_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    return datetime.timedelta(seconds=seconds)


def launched_world() -> int:
    """The number of processes torchrun started (``$WORLD_SIZE``), 1 when not launched by it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def launched() -> Iterator[Ranks | None]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl when CUDA is present), and
    leave it at the end; nothing when not launched by torchrun with more than one process or when a group exists.

    The collectives of the group time out after ``$MODSCOPE_DIST_TIMEOUT`` seconds (default 300), so a rank that
    stops answering ends the run instead of hanging it.
    """
    dist = _dist()
    if launched_world() <= 1 or not dist.is_available() or dist.is_initialized():
        yield Ranks.current()
        return
    cuda = torch.cuda.is_available()
    backend = os.environ.get("MODSCOPE_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not cuda:
            raise DistributedError("the nccl backend needs CUDA, which this machine does not have; use gloo "
                                   "($MODSCOPE_DIST_BACKEND=gloo)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the torch.distributed process group ({_first_line(exc)}); check "
                               "torchrun's --rdzv-endpoint / --master-addr and that every machine can reach it") from exc
    try:
        yield Ranks.current()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's error: its last line, without the source location and the advice after it."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", lines[-1] if lines else "") or type(exc).__name__
    return text.split(". ")[0].rstrip(".")[:160]


_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("modscope_alone", default=False)

#: how long `spread`'s ranks wait for each other's share of independent runs (runs are long; a dead rank still ends
#: the wait at once).
SPREAD_TIMEOUT = datetime.timedelta(hours=24)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process trains on its own (`Ranks.current` is None), even in a process group."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def spread(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, the items shared out over the ranks of a process group as independent runs.

    Item i runs on rank i mod N alone (its mask training is not shared with the other ranks); every rank gets every
    result, in order. The results must pickle. Without a process group, or with one item, it is the plain loop (and
    one item's mask training is then shared over the ranks as usual).

    Example:
        >>> spread(lambda seed: seed * 10, [0, 1, 2])
        [0, 10, 20]
    """
    ranks = Ranks.current()
    if ranks is None or len(items) < 2:
        return [fn(item) for item in items]
    dist = _dist()
    group = ranks.collective("making the group for independent runs", dist.new_group, timeout=SPREAD_TIMEOUT)
    with alone():
        mine = {i: fn(item) for i, item in enumerate(items) if i % ranks.size == ranks.rank}
    gathered: list[Any] = [None] * ranks.size
    ranks.collective("the gathering of independent runs' results", dist.all_gather_object, gathered, mine, group=group)
    results = {i: r for part in gathered for i, r in part.items()}
    return [results[i] for i in range(len(items))]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group: its rank and the number of ranks."""

    rank: int
    size: int

    @classmethod
    def current(cls) -> Ranks | None:
        """The group's ranks when a process group of more than one rank is initialised, else None."""
        dist = _dist()
        if _ALONE.get() or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def collective(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a collective; a rank that stopped or timed out becomes one `DistributedError`."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise DistributedError(f"rank {self.rank} of {self.size} lost the other ranks during {what} "
                                   f"({_first_line(exc)})") from exc

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set (an interrupt seen by one rank stops all at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist = _dist()
        self.collective("the step agreement", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def share(self, value: T, error: BaseException | None = None) -> T:
        """Rank 0's ``value`` on every rank, or rank 0's ``error``: raised there as it is, on the other ranks as a
        `MirroredError` with its message (so every rank stops, and the command line prints it once)."""
        box = [None if error is None else (str(error) or type(error).__name__), value]
        self.collective("rank 0's checks", _dist().broadcast_object_list, box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise MirroredError(box[0])
        return box[1]  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        dist = _dist()
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class MirroredError(DistributedError):
    """The error rank 0 met, raised on the other ranks so that they stop too (the command line prints it once)."""

    quiet = True


def check_launch(ranks: Ranks, device: torch.device, config: Any) -> None:
    """Refuse the combinations a distributed run does not support, with one sentence."""
    backend = _dist().get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(f"the process group uses nccl, which needs device 'cuda', but the masks train on {device}; "
                               "pass --device cuda, or use the gloo backend for CPU training ($MODSCOPE_DIST_BACKEND=gloo "
                               "under torchrun)")
    if backend != "nccl" and device.type == "cuda":
        raise DistributedError(f"the masks train on {device} but the process group uses {backend}; use the nccl backend "
                               "for GPUs (torchrun picks it when CUDA is present and $MODSCOPE_DIST_BACKEND is unset)")
    for field in ("pass_size", "max_memory"):
        if getattr(config, field) is not None:
            raise DistributedError(f"{field} cannot be combined with torch.distributed: each rank runs its share of a "
                                   f"step in one pass per task, without the memory plan; leave {field} unset or run on "
                                   "one process")


class _Holder(torch.nn.Module):
    """The K x N logits, flattened, as the one parameter of a module for `fully_shard`; calling it gives the gathered
    logits as a (K, N) matrix."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.shape = tuple(logits.shape)
        self.logits = torch.nn.Parameter(logits.reshape(-1))

    def forward(self) -> torch.Tensor:
        return self.logits.view(self.shape)  # a view, no copy: FSDP frees its storage after the backward pass


class ShardedLogits:
    """The (K, N) logits, their gradient and Adam's moments sharded over the ranks by FSDP2 (`fully_shard`).

    The logits are flattened task after task and cut into one contiguous run per rank (FSDP's dim-0 sharding, the last
    runs shorter when the ranks do not divide K x N): each rank keeps its run of the logits as the local shard of a
    DTensor, and gets the same run of their gradient and of Adam's moments (plain `torch.optim.Adam` over the DTensor).
    When the ranks divide the K tasks, the runs are whole tasks. `gather` all-gathers the whole logits for a step
    (freed by `backward`), `backward` reduce-scatters (sums) the gradient into the shards.

    Example (inside a process group of 2 ranks, K = 2 tasks: one task's row per rank)::

        sharded = ShardedLogits(torch.zeros(2, 10), lr=0.1, ranks=Ranks.current())
        sharded.local.shape   # torch.Size([10])
    """

    def __init__(self, logits: torch.Tensor, lr: float, ranks: Ranks):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, init_device_mesh

        self.ranks, self.shape = ranks, tuple(logits.shape)
        K, N = self.shape
        self.holder = _Holder(logits)
        mesh = init_device_mesh(logits.device.type, (ranks.size,))
        # reshard_after_forward=False: the gathered logits stay until the backward pass, which frees them
        fully_shard(self.holder, mesh=mesh, reshard_after_forward=False, shard_placement_fn=lambda _: Shard(0))
        self.holder.set_gradient_divide_factor(1.0)  # the gradients are summed, not averaged
        self.holder.set_force_sum_reduction_for_comms(True)
        self.param: Any = self.holder.logits  # a DTensor
        self.size = -(-K * N // ranks.size)  # the run of each rank but the last ones (as torch.chunk cuts)
        self.lo, self.hi = min(ranks.rank * self.size, K * N), min((ranks.rank + 1) * self.size, K * N)
        assert self.local.numel() == self.hi - self.lo
        self.whole_tasks = K % ranks.size == 0  # this rank's run is tasks lo/N .. hi/N
        #: ``(task, start, end)``: where each task's part of this rank's run lies in it
        self.pieces = [(k, max(self.lo, k * N) - self.lo, min(self.hi, (k + 1) * N) - self.lo)
                       for k in range(self.lo // N, -(-self.hi // N))]
        self.optimizer = torch.optim.Adam([self.param], lr=lr)

    @property
    def local(self) -> torch.Tensor:
        """This rank's run of the flattened logits, elements ``lo:hi``."""
        return self.param.to_local()

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """A run of whole tasks (`whole_tasks`) as a (tasks, N) matrix."""
        return flat.view(-1, self.shape[1])

    def local_part(self, row: torch.Tensor) -> torch.Tensor:
        """A per-weight (N,) tensor as it lines up with this rank's run (the whole row for whole tasks)."""
        if self.whole_tasks:
            return row
        return torch.cat([row[a + self.lo - k * self.shape[1] : b + self.lo - k * self.shape[1]] for k, a, b in self.pieces])

    def local_grad(self) -> torch.Tensor:
        """This rank's gradient shard, zeroed, as (tasks, N): for a rank whose share of the step is exactly the tasks
        it holds, which writes its gradients there without a reduce-scatter."""
        if self.param.grad is None:
            from torch.distributed.tensor import DTensor

            self.param.grad = DTensor.from_local(torch.zeros_like(self.local), self.param.device_mesh, self.param.placements,
                                                 shape=self.param.shape, stride=self.param.stride())
        grad = self.param.grad.to_local()
        grad.zero_()
        return self.rows(grad)

    def gather(self) -> torch.Tensor:
        """The whole (K, N) logits, all-gathered (a collective); `backward` frees them."""
        with warnings.catch_warnings():  # its view is only read, never written in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            return self.ranks.collective("the all-gather of the mask logits", self.holder)

    def backward(self, gathered: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Sum every rank's (K, N) ``grad`` of the ``gathered`` logits into the gradient shards (a reduce-scatter in
        the backward pass, which frees ``gathered``); returns this rank's run of the sum (as rows for whole tasks)."""
        self.param.grad = None
        self.ranks.collective("the reduce-scatter of the mask gradients", gathered.backward, grad)
        local = self.param.grad.to_local()
        return self.rows(local) if self.whole_tasks else local

    def norms(self, grad: torch.Tensor) -> torch.Tensor:
        """The L2 norms of the tasks' whole gradient rows, shaped to scale ``grad``, this rank's part of them: (tasks, 1)
        for whole tasks, else one per element of the run (its task's norm, summed over the ranks)."""
        if self.whole_tasks:
            return grad.norm(dim=1, keepdim=True)
        squares = self._task_sums(grad, lambda part: part.square().sum(), grad.dtype, "the gradient norms")
        lengths = torch.tensor([b - a for _, a, b in self.pieces], device=grad.device)
        return squares.sqrt()[[k for k, _, _ in self.pieces]].repeat_interleave(lengths)

    def density(self) -> torch.Tensor:
        """Each task's fraction of logits above 0 (K,), counted on the shards (a collective)."""
        counts = self._task_sums(self.local.detach(), lambda part: (part > 0).sum().double(), torch.float64,
                                 "the mask densities")
        return (counts.float() / self.shape[1]).cpu()

    def _task_sums(self, run: torch.Tensor, part_sum: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                   what: str) -> torch.Tensor:
        """(K,): ``part_sum`` of each task's part of ``run`` (this rank's run of a flat (K, N) tensor), summed over the
        ranks (a collective)."""
        sums = torch.zeros(self.shape[0], dtype=dtype, device=run.device)
        for k, a, b in self.pieces:
            sums[k] = part_sum(run[a:b])
        self.ranks.collective(f"the all-reduce of {what}", _dist().all_reduce, sums)
        return sums

    def full(self) -> torch.Tensor:
        """The whole (K, N) logits on every rank (a collective)."""
        return self.ranks.collective("the all-gather of the mask logits", self.param.full_tensor).detach().view(self.shape)

    def _to_leader(self, shard: torch.Tensor, what: str) -> torch.Tensor | None:
        """The whole (K, N) tensor of which ``shard`` is this rank's run, on rank 0 only (None on the others)."""
        padded = torch.zeros(self.size, dtype=shard.dtype, device=shard.device)
        padded[: shard.numel()] = shard
        parts = [torch.empty_like(padded) for _ in range(self.ranks.size)] if self.ranks.leader else None
        self.ranks.collective(f"the checkpoint's gathering of {what}", _dist().gather, padded, parts, dst=0)
        return None if parts is None else torch.cat(parts)[: self.shape[0] * self.shape[1]].view(self.shape).cpu()

    def gathered_state(self) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
        """The whole logits and the Adam state in the format of `torch.optim.Adam` over them, on rank 0 (a
        collective; None, None on the other ranks). Rank 0 holds a full copy of both while it writes."""
        state = self.optimizer.state_dict()
        logits = self._to_leader(self.local.detach(), "the mask logits")
        whole: dict[int, Any] = {}
        for index, moments in state["state"].items():
            whole[index] = {"step": moments["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                whole[index][key] = self._to_leader(moments[key].to_local(), "the Adam state")
        if not self.ranks.leader:
            return None, None
        return logits, {"state": whole, "param_groups": state["param_groups"]}

    def load(self, logits: torch.Tensor, state: dict[str, Any]) -> None:
        """Take this rank's runs of whole logits and of a whole-logits `torch.optim.Adam` state (a checkpoint's, of
        any number of ranks)."""
        from torch.distributed.tensor import distribute_tensor

        def shard(whole: torch.Tensor) -> Any:
            return distribute_tensor(whole.reshape(-1).to(self.local.device), self.param.device_mesh, self.param.placements,
                                     src_data_rank=None)

        with torch.no_grad():
            self.local.copy_(shard(logits).to_local())
        state = {"state": {i: {k: (shard(v) if k != "step" else v) for k, v in s.items()} for i, s in state["state"].items()},
                 "param_groups": [{**g, "fused": None} for g in state["param_groups"]]}  # the sharded step: not fused
        self.optimizer.load_state_dict(state)

    def local_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of the logits, their gradient and Adam's moments (their storage, padding included)."""
        def nbytes(t: Any) -> int:
            return 0 if t is None else t.to_local().untyped_storage().nbytes()

        moments = self.optimizer.state.get(self.param, {})
        return {"logits": nbytes(self.param), "grad": nbytes(self.param.grad),
                "adam": sum(nbytes(moments.get(k)) for k in ("exp_avg", "exp_avg_sq"))}


@dataclass
class _WholeAdam:
    """A whole-logits Adam state, handed to `checkpoint.save_checkpoint` / `load_checkpoint` in an optimizer's place."""

    state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        assert self.state is not None
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class DistributedStep:
    """One rank's part of `MaskTrainer.step` in a distributed run (see the module's docstring).

    It shards the trainer's state: ``trainer.logits`` becomes the (K, N) logits, flattened, as a DTensor sharded over
    the ranks (`ShardedLogits.param`), ``trainer.optimizer`` Adam over it, ``trainer.trainable`` the flags of this
    rank's run.
    """

    def __init__(self, trainer: MaskTrainer, ranks: Ranks):
        self.trainer, self.ranks = trainer, ranks
        config = trainer.config
        check_launch(ranks, trainer.device, config)
        shares = share_work(len(trainer.tasks), config.n_samples, ranks.size)
        self.units = shares[ranks.rank]
        self.owner = {u.task: r for r in reversed(range(ranks.size)) for u in shares[r]}  # the rank of sample 0
        self.split = sorted({u.task for units in shares for u in units if (u.s0, u.s1) != (0, config.n_samples)})
        self.mine = {u.task for u in self.units}
        most = max(u.s1 - u.s0 for u in self.units)
        N = trainer.layout.total
        self.noise = torch.empty(config.n_samples, N, device=trainer.device, dtype=trainer.logits.dtype)
        self.buffers = StepBuffers(trainer._masked, trainer.layout.offsets, most, 1)
        trainer.buffers = self.buffers  # `MaskTrainer._backward` writes the gradients through them
        self.sharded = sharded = ShardedLogits(trainer.logits.detach(), config.lr, ranks)
        trainer.logits, trainer.optimizer = sharded.param, sharded.optimizer  # the whole ones are freed
        trainer.trainable = sharded.local_part(trainer.trainable)
        # whole tasks per rank (the ranks divide K): a rank's share of a step is the tasks it holds, so it reads and
        # writes its shards in place, with no all-gather or reduce-scatter
        self.own = sharded.whole_tasks and [(u.task, u.s0, u.s1) for u in self.units] == [
            (k, 0, config.n_samples) for k in range(sharded.lo // N, sharded.hi // N)]
        self.first = sharded.lo // N if self.own else 0  # the task of row 0 of the logits a step reads

    def summary(self) -> str:
        """One line: how the ranks share a step and what this rank runs."""
        trainer = self.trainer
        parts = ", ".join(f"{trainer.tasks[u.task].name} samples {u.s0}-{u.s1 - 1}" for u in self.units)
        how = "by tasks, each rank holding those it runs" if self.own else "in equal runs, gathered for each step"
        return (f"torch.distributed: {self.ranks.size} ranks share each step's {len(trainer.tasks)} task(s) x "
                f"{trainer.config.n_samples} samples; rank {self.ranks.rank} runs {parts}; logits, gradients and Adam "
                f"state sharded {how} (FSDP2)")

    def step(self) -> torch.Tensor:
        """This rank's share of a step on its shard or on the gathered logits, the reduce-scatter of the gradients in
        the second case, the all-reduce of the losses, and the update of this rank's shard."""
        trainer, config = self.trainer, self.trainer.config
        batches: list[Any] = []
        for k, (task, g) in enumerate(zip(trainer.tasks, trainer.gens.data)):  # every data stream moves every step
            rows = torch.randint(len(task), (config.batch_size,), generator=g)
            batches.append(task.batch(rows, trainer.device) if k in self.mine else None)
        if self.own:  # this rank's tasks' rows
            logits, grad = self.sharded.rows(self.sharded.local), self.sharded.local_grad()
        else:  # (K, N); both freed by the reduce-scatter
            logits = self.sharded.gather()
            grad = torch.zeros_like(logits, requires_grad=False)
        losses = torch.zeros(len(trainer.tasks) + 1, device=trainer.device)
        pending = []
        for u in self.units:
            draw_uniforms((config.n_samples, trainer.layout.total), trainer.gens.noise[u.task], trainer.device, out=self.noise)
            rows = self._row(logits.detach(), u.task)
            uniforms = self.noise[None, u.s0 : u.s1]
            effective = self.buffers.effective(rows, uniforms, trainer._masked, trainer.runner.kernels)
            if u.task in self.split:  # back-propagated after the next units reuse the buffers: keep copies
                uniforms, effective = uniforms.clone(), [e.clone() for e in effective]
            leaves = [e.detach().requires_grad_() for e in effective]
            (out,) = trainer._outputs(leaves, batches, range(u.task, u.task + 1), (u.s0, u.s1))
            if u.task in self.split:
                pending.append((u, rows, uniforms, leaves, out))
                continue
            loss = trainer.tasks[u.task].loss_fn()(out, batches[u.task][1])
            self._backward(u, rows, uniforms, leaves, loss, losses, grad)
        if self.split:
            self._split_tasks(pending, batches, losses, grad)
        local = grad if self.own else self.sharded.backward(logits, grad)
        del logits, grad
        self.ranks.collective("the all-reduce of the losses", _dist().all_reduce, losses)
        trainer._update(local)
        return losses[:-1].cpu()

    def _row(self, matrix: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s (1, N) row of the logits or the gradient a step works on."""
        return matrix[task - self.first : task - self.first + 1]

    def _backward(self, u: Unit, rows: torch.Tensor, uniforms: torch.Tensor, leaves: list[torch.Tensor],
                  loss: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor) -> None:
        trainer = self.trainer
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        trainer._backward(rows, uniforms, leaves, grads, self._row(grad, u.task), accumulate=False)
        if self.owner[u.task] == self.ranks.rank:
            losses[u.task] = loss.detach()

    def _split_tasks(self, pending: list, batches: list, losses: torch.Tensor, grad: torch.Tensor) -> None:
        """Tasks whose samples several ranks share: exchange their outputs, then each rank back-propagates the
        whole-batch loss through its own rows."""
        mine = {(u.task, u.s0): out.detach().cpu() for u, *_, out in pending}
        gathered: list[Any] = [None] * self.ranks.size
        self.ranks.collective("the exchange of outputs", _dist().all_gather_object, gathered, mine)
        pieces = {key: out for part in gathered for key, out in part.items()}
        for u, rows, uniforms, leaves, out in pending:
            parts = [out if s0 == u.s0 else piece.to(out.device) for (k, s0), piece in sorted(pieces.items()) if k == u.task]
            loss = self.trainer.tasks[u.task].loss_fn()(torch.cat(parts), batches[u.task][1])
            self._backward(u, rows, uniforms, leaves, loss, losses, grad)

    def save(self, path: Path, state: TrainingState) -> None:
        """Write the full state (rank 0); every rank must call it: the logits, the Adam moments and the noise streams
        are gathered from the ranks that hold them."""
        from .checkpoint import save_checkpoint

        trainer = self.trainer
        logits, adam = self.sharded.gathered_state()
        streams = {k: trainer.gens.noise[k].get_state() for k in self.mine if self.owner[k] == self.ranks.rank}
        gathered: list[Any] = [None] * self.ranks.size
        self.ranks.collective("the checkpoint's gathering of the noise streams", _dist().all_gather_object, gathered, streams)
        if not self.ranks.leader:
            return
        assert logits is not None and adam is not None
        for part in gathered:
            for k, s in part.items():
                trainer.gens.noise[k].set_state(s)
        save_checkpoint(path, trainer.identity, state, logits, _WholeAdam(adam), trainer.gens.all())  # type: ignore[arg-type]

    def load(self, path: Path) -> TrainingState:
        """Resume from a checkpoint of any number of ranks: every rank reads the whole file and keeps its shards."""
        from .checkpoint import load_checkpoint

        whole = torch.empty(self.sharded.shape)
        adam = _WholeAdam()
        state = load_checkpoint(path, self.trainer.identity, whole, adam, self.trainer.gens.all())  # type: ignore[arg-type]
        assert adam.state is not None
        self.sharded.load(whole, adam.state)
        return state


def lost_rank_message(error: DistributedError, checkpoint: Path | None, saved_step: int | None) -> str:
    """The sentence a run that lost a rank ends with: what happened and what the last checkpoint holds."""
    if checkpoint is None:
        where = "no checkpoint was asked for"
    elif saved_step is None:
        where = f"no checkpoint was written yet ({checkpoint})"
    else:
        where = f"the last checkpoint, {checkpoint} at step {saved_step}, is intact: run again with --resume"
    return f"{error}; {where}"

