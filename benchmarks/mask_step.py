"""Time of one mask-training step against a plain training step, the authors'-style step, and K tasks at once.

The paper's FNN (42 → 800 → 800 → 256 → 20, ReLU), batch 128, 4 mask samples per step. For each thread count:

- the median time of a plain step (forward, backward, Adam on the weights), of modscope's mask step as configured
  by default, eager (``compile=False``) and compiled (``compile=True``, its one-off compilation timed separately),
  and of a paper-style step (two uniforms per element turned into a difference of Gumbels, the soft sample kept for
  the backward pass, one forward/backward per sample: the authors' implementation, measured as before);
- for the default step: the system-time share and page faults per step (``resource.getrusage``), the matmul share
  (torch profiler), the element-wise bytes one step moves (noise written and read, effective weights written, their
  gradients and the noise read again: 5 passes of 4 bytes over K x S x N values with the native kernels, 7 as torch
  operations) and the bandwidth that achieves (those bytes over the time of the element-wise work alone);
- K = 1, 4, 10 tasks: one ``train_masks`` call of K tasks against K calls of one task (set-up included).

Every time is given as wall time and, in brackets, as the process's CPU time: on a shared machine the CPU time is the
steadier figure at one thread (waiting for a core is not in it); at two threads it also counts spin-waiting.

Then the scaling over model size: FNNs of about 0.1M, 1M, 10M and 100M weights (two hidden layers), mask step
against plain step.

    python benchmarks/mask_step.py                          # CPU, 1 and 2 threads
    python benchmarks/mask_step.py --threads 1 --no-compile --sizes 0.1M,1M
    python benchmarks/mask_step.py --device cuda            # on a GPU
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import modscope
from modscope.masks import native
from modscope.masks.trainer import MaskTrainer

SIZES = (42, 800, 800, 256, 20)
MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::convolution",
              "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward"}
ELEMENTWISE_PASSES = 7  # torch operations: noise written, read for the keep test, effective weight written (twice:
# 0/1 then W), the gradient of the effective weights read, the noise read again in the backward pass; 4 bytes each
NATIVE_PASSES = 5  # native kernels: noise written, read and effective weight written in one pass, noise and gradient
# read in one pass


def make_net(sizes: Sequence[int] = SIZES) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def sized_net(n_weights: float) -> tuple[nn.Sequential, tuple[int, ...]]:
    """An FNN 42 → h → h → 20 with about ``n_weights`` weights (h² dominates)."""
    h = 1
    while 42 * h + h * h + h * 20 < n_weights:
        h += max(1, h // 50)
    sizes = (42, h, h, 20)
    return make_net(sizes), sizes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(step: Callable[[], object], n_steps: int, warmup: int, device: str) -> tuple[float, float]:
    """Median wall time and median process CPU time (user + system, all threads) of one step.

    On a shared machine the CPU time is the steadier figure at one thread (time waiting for a core is not in it); at
    more threads it also counts the threads' spin-waiting."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(n_steps):
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def median_time(step: Callable[[], object], n_steps: int, warmup: int, device: str) -> float:
    return median_times(step, n_steps, warmup, device)[0]


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


def make_trainer(net: nn.Module, tasks: list[modscope.Task], device: str, **config: object) -> MaskTrainer:
    model = modscope.load(net)
    cfg = modscope.MaskConfig(n_samples=4, batch_size=128, device=device, **config)  # type: ignore[arg-type]
    return MaskTrainer(model, model.module_on(device), tasks, cfg, torch.device(device))


def usage_per_step(step: Callable[[], object], n_steps: int) -> tuple[float, float, float]:
    """(system-time share, page faults per step, CPU seconds per step) over ``n_steps`` steps."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n_steps):
        step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return system / max(user + system, 1e-9), (r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt) / n_steps, (user + system) / n_steps


def matmul_share(step: Callable[[], object], n_steps: int = 3) -> float:
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(n_steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / max(total, 1e-9)


def elementwise_time(trainer: MaskTrainer, n_steps: int, warmup: int, device: str) -> float:
    """Median time of one step's element-wise work alone: noise, effective weights and the logit gradient."""
    trainer.step()  # makes the plan and the buffers
    S = trainer.config.n_samples
    grads = [torch.randn(len(p.tasks), S, *w.shape, device=w.device).mul_(1e-3) for p in trainer.plan.passes[:1]
             for w in trainer._masked]
    grad = torch.zeros_like(trainer.logits)

    def work() -> None:
        for p in trainer.plan.passes:
            rows, uniforms, _ = trainer._sample(p.tasks, p.samples)
            g = [t[: len(p.tasks), : p.samples[1] - p.samples[0]] for t in grads]
            trainer._backward(rows, uniforms, [], g, grad[p.tasks.start : p.tasks.stop], accumulate=p.samples[0] > 0)

    return median_time(work, n_steps, warmup, device)


def fnn_section(args: argparse.Namespace, threads: int) -> dict[str, tuple[float, float]]:
    device = args.device
    torch.manual_seed(0)
    net = make_net().to(device).eval()
    x = torch.nn.functional.one_hot(torch.randint(0, 42, (128,)), 42).float().to(device)
    y = torch.randint(0, 20, (128,), device=device)
    task = modscope.Task("t", x.cpu(), y.cpu())
    results = {"plain step": median_times(plain_step(make_net().to(device), x, y), args.steps, args.warmup, device)}
    variants = [("default", {}), ("eager", {"compile": False})] + ([] if args.no_compile else [("compiled", {"compile": True})])
    default = None
    for name, extra in variants:
        trainer = make_trainer(net, [task], device, **extra)
        start = time.perf_counter()
        trainer.step()
        first = time.perf_counter() - start
        results[f"modscope mask step, {name}"] = median_times(trainer.step, args.steps, args.warmup, device)
        if name == "compiled":
            print(f"  (compiling the sampler: first step {first:.1f} s)")
        if name == "default":
            default = trainer
        else:
            trainer.close()
    results["paper-style mask step"] = median_times(paper_style_step(net, x, y, 4), args.steps, args.warmup, device)

    (plain, _), (paper, paper_cpu) = results["plain step"], results["paper-style mask step"]
    print(f"FNN {' → '.join(map(str, SIZES))}, batch 128, 4 samples, device {device}, {threads} thread(s), "
          f"median of {args.steps} steps (wall time; CPU time of the process in brackets)")
    for name, (t, c) in results.items():
        print(f"  {name:36s} {t * 1e3:8.2f} ms   {t / plain:5.2f}× plain   {t / paper:5.2f}× paper-style   "
              f"[CPU {c * 1e3:7.2f} ms, {c / paper_cpu:5.2f}× paper-style]")

    assert default is not None
    system, faults, _ = usage_per_step(default.step, args.steps)
    share = matmul_share(default.step)
    n_values = len(default.tasks) * default.config.n_samples * default.layout.total
    moved = (NATIVE_PASSES if native.kernels() is not None else ELEMENTWISE_PASSES) * 4 * n_values
    elementwise = elementwise_time(default, args.steps, args.warmup, device)
    step = results["modscope mask step, default"][0]
    print(f"  default step: system time {system:.1%} of CPU time, {faults:.0f} page faults/step, matmul share "
          f"{share:.0%}; element-wise work {elementwise * 1e3:.1f} ms ({elementwise / step:.0%} of the step) moving "
          f"{moved / 1e6:.0f} MB: {moved / elementwise / 1e9:.1f} GB/s")
    default.close()
    return results


def tasks_section(args: argparse.Namespace) -> None:
    """K tasks in one train_masks call against K calls of one task (set-up included)."""
    torch.manual_seed(0)
    net = make_net().eval()
    x = torch.nn.functional.one_hot(torch.randint(0, 42, (512,)), 42).float()
    y = torch.randint(0, 20, (512,))
    config = modscope.MaskConfig(n_steps=args.run_steps, n_samples=4, batch_size=128, device=args.device,
                                 threads=torch.get_num_threads())  # as asked: no idle-core probe per run
    for K in args.tasks:
        tasks = [modscope.Task(f"t{k}", x, torch.roll(y, k)) for k in range(K)]
        sync(args.device)
        start, cpu = time.perf_counter(), time.process_time()
        modscope.train_masks(net, tasks, config, progress=False)
        sync(args.device)
        together, together_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        for t in tasks:
            modscope.train_masks(net, [t], config, progress=False)
        sync(args.device)
        apart, apart_cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"  K = {K:2d} tasks x {args.run_steps} steps: one run {together:6.2f} s, {K} runs of one task "
              f"{apart:6.2f} s: ratio {together / apart:.2f} [CPU {together_cpu:6.2f} s / {apart_cpu:6.2f} s: "
              f"{together_cpu / apart_cpu:.2f}]")


def scaling_section(args: argparse.Namespace) -> None:
    print(f"scaling over model size (FNN 42 → h → h → 20, batch 128, 4 samples, default mask step, {args.device}, "
          f"{torch.get_num_threads()} thread(s)):")
    for label in args.sizes:
        n = float(label.upper().rstrip("M")) * 1e6
        torch.manual_seed(0)
        net, sizes = sized_net(n)
        net = net.to(args.device).eval()
        weights = sum(p.numel() for name, p in net.named_parameters() if name.endswith("weight"))
        x = torch.nn.functional.one_hot(torch.randint(0, 42, (128,)), 42).float()
        y = torch.randint(0, 20, (128,))
        steps = max(3, args.steps // (1 if n < 5e6 else 5 if n < 5e7 else 10))
        plain, plain_cpu = median_times(plain_step(net, x.to(args.device), y.to(args.device)), steps, 1, args.device)
        net.zero_grad(set_to_none=True)
        trainer = make_trainer(net, [modscope.Task("t", x, y)], args.device)
        mask, mask_cpu = median_times(trainer.step, steps, 1, args.device)
        trainer.close()
        print(f"  {label:>5s} ({weights / 1e6:7.2f}M weights, h = {sizes[1]:5d}): plain {plain * 1e3:9.1f} ms, mask step "
              f"{mask * 1e3:9.1f} ms ({mask / plain:4.1f}× plain, {mask / weights * 1e9:6.1f} ns per weight) [CPU: plain "
              f"{plain_cpu * 1e3:9.1f} ms, mask step {mask_cpu * 1e3:9.1f} ms, {mask_cpu / weights * 1e9:6.1f} ns per weight]")
        del trainer, net


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts (default 1 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant (about 30 s to compile)")
    parser.add_argument("--tasks", type=int, nargs="*", default=[1, 4, 10], help="task counts K (default 1 4 10)")
    parser.add_argument("--run-steps", type=int, default=20, help="steps of each run in the K-tasks comparison")
    parser.add_argument("--sizes", type=lambda s: [v for v in s.split(",") if v], default=["0.1M", "1M", "10M", "100M"],
                        help="model sizes for the scaling table (default 0.1M,1M,10M,100M; empty to skip)")
    args = parser.parse_args(argv)
    print(native.status())
    for threads in args.threads:
        torch.set_num_threads(threads)
        fnn_section(args, threads)
        if args.tasks:
            tasks_section(args)
    if args.sizes:
        torch.set_num_threads(min(args.threads))
        scaling_section(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
