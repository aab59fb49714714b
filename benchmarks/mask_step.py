"""Time of one mask-training step against a plain training step of the same network.

The paper's FNN (42 → 800 → 800 → 256 → 20, ReLU), batch 128, 4 mask samples per step, one task. Printed: the median
time of a plain step (forward, backward, Adam on the weights), of modscope's mask step on the vmap path and on the
loop path (eager), and on the vmap path with the sampler fused by torch.compile (the default for runs of 1000+ steps;
its one-off compilation happens in the warm-up and is not timed), and of a paper-style step (two uniforms per element turned into a difference of Gumbels, soft sample
kept for the backward pass, one forward/backward per sample), each as a ratio to the plain step.

Targets (issue 2): mask step ≤ 4× a plain step on CPU, ≤ 2× on a GPU.

    python benchmarks/mask_step.py                   # CPU, 2 threads
    python benchmarks/mask_step.py --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import modscope
from modscope.masks.trainer import MaskTrainer

SIZES = (42, 800, 800, 256, 20)


def make_net() -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def median_time(step: Callable[[], object], n_steps: int, warmup: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(n_steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def paper_style_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, n_samples: int) -> Callable[[], None]:
    """The paper's portable variant: per-tensor logits, two-uniform Gumbel noise, one pass per sample."""
    weights = {n: p.detach() for n, p in net.named_parameters() if n.endswith("weight")}
    fixed = {n: p.detach() for n, p in net.named_parameters() if n not in weights}
    logits = {n: torch.full_like(w, 2.0, requires_grad=True) for n, w in weights.items()}
    optimizer = torch.optim.Adam(logits.values(), lr=1e-2)
    xs, ys = x.chunk(n_samples), y.chunk(n_samples)

    def step() -> None:
        optimizer.zero_grad()
        for k in range(n_samples):
            masked = {}
            for n, lg in logits.items():
                u0, u1 = torch.rand_like(lg), torch.rand_like(lg)
                noise = -torch.log(torch.log(u1 + 1e-10) / torch.log(u0 + 1e-10) + 1e-10)
                soft = torch.sigmoid(lg + noise)
                hard = (soft > 0.5).float()
                masked[n] = weights[n] * ((hard - soft).detach() + soft)
            out = torch.func.functional_call(net, {**fixed, **masked}, (xs[k],))
            loss = nn.functional.cross_entropy(out, ys[k]) / n_samples + 1e-4 / 128 * sum(lg.sum() for lg in logits.values())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(logits.values()), 1.0)
        optimizer.step()

    return step


def modscope_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, vectorize: str, device: str, compile: bool) -> Callable[[], torch.Tensor]:
    model = modscope.load(net)
    task = modscope.Task("t", x, y)
    config = modscope.MaskConfig(n_samples=4, batch_size=len(x), vectorize=vectorize, device=device, compile=compile)  # type: ignore[arg-type]
    trainer = MaskTrainer(model, model.module_on(device), [task], config, torch.device(device))
    return trainer.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the CI machine)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = make_net().to(args.device).eval()
    x = torch.nn.functional.one_hot(torch.randint(0, 42, (128,)), 42).float().to(args.device)
    y = torch.randint(0, 20, (128,), device=args.device)

    results = {"plain step": median_time(plain_step(make_net().to(args.device), x, y), args.steps, args.warmup, args.device)}
    for vectorize, compile in (("vmap", False), ("loop", False), ("vmap", True)):
        step = modscope_step(net, x.cpu(), y.cpu(), vectorize, args.device, compile)
        name = f"modscope mask step ({vectorize}{', compiled sampler' if compile else ''})"
        results[name] = median_time(step, args.steps, args.warmup, args.device)
    results["paper-style mask step"] = median_time(paper_style_step(net, x, y, 4), args.steps, args.warmup, args.device)

    target = 2.0 if args.device.startswith("cuda") else 4.0
    plain = results["plain step"]
    print(f"FNN {' → '.join(map(str, SIZES))}, batch 128, 4 samples, device {args.device}, {args.threads} threads, "
          f"median of {args.steps} steps")
    for name, t in results.items():
        print(f"  {name:48s} {t * 1e3:8.2f} ms   {t / plain:5.2f}× plain")
    best = min(t for name, t in results.items() if name.startswith("modscope")) / plain
    print(f"target: mask step ≤ {target:.0f}× plain on {'GPU' if target == 2 else 'CPU'}; measured {best:.2f}× -> "
          f"{'met' if best <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
