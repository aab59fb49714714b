"""Mask training on 1, 2, ... ranks of torch.distributed: steps per second and the per-weight state each rank holds.

The paper's FNN (42 → 800 → 800 → 256 → 20; about 0.87M masked weights), K tasks, batch 128, 4 samples per step.
For each number of ranks N the script starts N processes (gloo on CPU; nccl, one GPU per rank, when CUDA is present),
times ``MaskTrainer.step`` after a warm-up (the slowest rank's time), and reports the bytes the largest rank keeps
from step to step of

- the logits, their gradient and Adam's two moments: on several ranks sharded by FSDP2's ``fully_shard``
  (`modscope.masks.distributed.ShardedLogits`), 1/N each; counted from the storage of the tensors themselves,

and, on a GPU, the peak allocated memory over the timed steps, which adds what a step holds while it runs (on several
ranks the gathered logits, a whole gradient buffer and FSDP's reduce-scatter buffers; see docs/scaling.md). One rank
is the plain single-process path (no process group).

    python benchmarks/distributed.py                       # 1 and 2 ranks, 2 tasks, on this machine
    python benchmarks/distributed.py --ranks 1,2,4,8 --tasks 10 --steps 50   # e.g. on a machine with 8 GPUs

On a CPU the ranks share the cores: expect little speed-up there; the state per rank is the figure to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mask_step import (  # the paper's FNN, as in the single-process benchmark
    SIZES,
    make_net,
)

import modscope
from modscope.masks.trainer import MaskTrainer


def make_tasks(k: int) -> list[modscope.Task]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, SIZES[0], generator=g)
    return [modscope.Task(f"t{i}", x, torch.randint(SIZES[-1], (1024,), generator=g)) for i in range(k)]


def state_bytes(trainer: MaskTrainer) -> dict[str, int]:
    """Bytes of the logits, their gradient and the Adam moments this process holds."""
    if trainer.distributed is not None:
        return trainer.distributed.sharded.local_state_bytes()
    moments = trainer.optimizer.state[trainer.logits]
    return {"logits": trainer.logits.untyped_storage().nbytes(), "grad": trainer.logits.grad.untyped_storage().nbytes(),
            "adam": sum(moments[k].untyped_storage().nbytes() for k in ("exp_avg", "exp_avg_sq"))}


def measure(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    """One rank's figures, written to ``out/rank{rank}.json``."""
    cuda = torch.cuda.is_available()
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    try:
        torch.manual_seed(0)
        model = modscope.load(make_net())
        config = modscope.MaskConfig(n_samples=4, batch_size=128, device="cuda" if cuda else "cpu", compile=False)
        trainer = MaskTrainer(model, model.module_on(device), make_tasks(args.tasks), config, torch.device(device))
        for _ in range(args.warmup):
            trainer.step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if world > 1:  # the step is as fast as the slowest rank
            t = torch.tensor([seconds], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = float(t.item())
        figures = {"rank": rank, "steps_per_s": args.steps / seconds, **state_bytes(trainer), "masked": trainer.layout.total,
                   "peak_gpu": torch.cuda.max_memory_allocated() if cuda else None}
        (out / f"rank{rank}.json").write_text(json.dumps(figures))
        trainer.close()
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if world == 1:
            measure(0, 1, 0, args, Path(tmp))
        else:
            mp.spawn(measure, args=(world, free_port(), args, Path(tmp)), nprocs=world, join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated numbers of ranks (default 1,2)")
    parser.add_argument("--tasks", type=int, default=2, help="K, the number of tasks (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank on a CPU (default 1)")
    args = parser.parse_args()
    worlds = [int(n) for n in args.ranks.split(",")]
    if torch.cuda.is_available() and max(worlds) > torch.cuda.device_count():
        parser.error(f"{max(worlds)} ranks need as many GPUs; this machine has {torch.cuda.device_count()}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    print(f"paper FNN {SIZES}, K = {args.tasks} tasks, S = 4 samples, batch 128; {backend}; "
          f"{args.threads} thread(s) per rank; {args.steps} steps after {args.warmup} warm-up")
    print("ranks | steps/s | per rank: logits | gradient | Adam moments | total (x of the first row) | B/weight/task | peak GPU")
    base = None
    for world in worlds:
        figures = run(world, args)
        first = figures[0]
        most = max(figures, key=lambda f: f["logits"] + f["grad"] + f["adam"])  # the largest rank's state
        total = most["logits"] + most["grad"] + most["adam"]
        base = base or total
        gpu = f"{max(f['peak_gpu'] for f in figures) / 2**20:.1f} MiB" if first["peak_gpu"] is not None else "-"
        print(f"{world:5d} | {first['steps_per_s']:7.2f} | {most['logits'] / 2**20:7.2f} MiB | {most['grad'] / 2**20:7.2f} MiB | "
              f"{most['adam'] / 2**20:7.2f} MiB | {total / 2**20:7.2f} MiB ({total / base:.2f}x) | "
              f"{total / (first['masked'] * args.tasks):5.2f} | {gpu}")


if __name__ == "__main__":
    main()
