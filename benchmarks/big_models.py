"""Mask steps on big models: time against plain fine-tuning, peak memory against the memory plan's estimate.

Two models with random weights: a BERT-base-sized encoder classifier (about 110M parameters; built from a
`transformers.BertConfig` when transformers is installed, else a plain torch encoder of the same sizes) and a
ResNet-50-sized CNN (bottleneck blocks 3-4-6-3, about 25M parameters, plain torch). For each, three runs, each in
its own process so that its peak memory is its own:

1. a plain fine-tuning step (Adam on every parameter, the whole batch): time per step, peak RSS;
2. mask training of K tasks, all K x S (task, sample) passes at once (unchunked): time per step, the memory
   plan's estimate, peak RSS;
3. the same with ``max_memory`` set to half of run 2's peak and the plan choosing the passes: the passes it chose,
   peak RSS (it must stay under the limit) and whether the masks equal run 2's.

On a GPU (``--device cuda``) the peak is torch's peak allocated memory instead of RSS.

    python benchmarks/big_models.py                       # both models, CPU
    python benchmarks/big_models.py --model resnet --steps 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet50(classes: int = 10) -> nn.Module:
    """The ResNet-50 layout (bottlenecks 3-4-6-3, widths 64-512) in plain torch: 23.5M parameters for 10 classes."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class _Classifier(nn.Module):
    """The first output (the logits) of a transformers model, so that the model returns a tensor."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, return_dict=False)[0]


def bert_base(classes: int = 2) -> tuple[nn.Module, str]:
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
        encoder = nn.Sequential(nn.Embedding(30522, 768), nn.TransformerEncoder(layer, 12, enable_nested_tensor=False))
        return nn.Sequential(encoder, _MeanPool(), nn.Linear(768, classes)), "torch encoder (BERT-base sizes)"
    config = BertConfig(num_labels=classes)
    config._attn_implementation = "eager"  # the math attention batches under vmap
    return _Classifier(BertForSequenceClassification(config)), "transformers BertForSequenceClassification"


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def build(name: str, batch: int) -> tuple[nn.Module, str, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "bert":
        net, what = bert_base()
        x = torch.randint(0, 30522, (batch * 4, 32))
        y = torch.randint(0, 2, (batch * 4,))
    else:
        net, what = resnet50(), "ResNet-50 layout (plain torch), 64x64 images"
        x = torch.randn(batch * 4, 3, 64, 64)
        y = torch.randint(0, 10, (batch * 4,))
    return net.eval(), what, x, y


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(args: argparse.Namespace) -> dict[str, object]:
    """One run in this process: "plain", or "mask" with ``args.max_memory``."""
    import modscope
    from modscope.masks.memory import retained_heap
    from modscope.masks.trainer import MaskTrainer

    torch.set_num_threads(args.threads)
    net, what, x, y = build(args.model, args.batch)
    device = torch.device(args.device)
    n_params = sum(p.numel() for p in net.parameters())
    out: dict[str, object] = {"model": what, "params": n_params}
    with retained_heap(device.type == "cpu" and args.case == "plain"):  # as the mask trainer does when it has room
        if args.case == "plain":
            net = net.to(device)
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)
            xb, yb = x[: args.batch].to(device), y[: args.batch].to(device)

            def step() -> None:
                loss = nn.functional.cross_entropy(net(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        else:
            model = modscope.load(net)
            tasks = [modscope.Task(f"task{k}", x, torch.roll(y, k)) for k in range(args.tasks)]
            config = modscope.MaskConfig(n_samples=args.samples, batch_size=args.batch, device=args.device,
                                         max_memory=args.max_memory, pass_size=args.pass_size, lr=0.1, init=0.5)
            trainer = MaskTrainer(model, model.module_on(device), tasks, config, device)
            plan = trainer.plan
            out.update(masked=trainer.layout.total, estimate=plan.estimate, limit=plan.limit, passes=len(plan.passes),
                       replicas=plan.replicas, summary=plan.summary())
            step = trainer.step  # type: ignore[assignment]
        step()  # warm-up (and the first step's set-up)
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out.update(step_s=sorted(times)[len(times) // 2], peak=peak_bytes(args.device))
        if args.case == "mask":
            bits = (trainer.logits.detach() > 0).cpu().numpy().tobytes()
            out["masks"] = hashlib.sha256(bits).hexdigest()[:16]
            trainer.close()
    return out


def child(args: argparse.Namespace, case: str, max_memory: int | None = None) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--case", case, "--model", args.model, "--device", args.device,
           "--threads", str(args.threads), "--steps", str(args.steps), "--tasks", str(args.tasks),
           "--samples", str(args.samples), "--batch", str(args.batch)]
    if max_memory:
        cmd += ["--max-memory", str(max_memory)]
    else:
        cmd += ["--pass-size", str(args.tasks * args.samples)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{case} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: object) -> str:
    return f"{int(n) / 2**30:.2f} GiB"  # type: ignore[call-overload]


def compare(args: argparse.Namespace) -> None:
    plain = child(args, "plain")
    mask = child(args, "mask")
    half = int(mask["peak"]) // 2  # type: ignore[call-overload]
    limited = child(args, "mask", half)
    memory = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"{mask['model']}: {int(mask['params']) / 1e6:.1f}M parameters, {int(mask['masked']) / 1e6:.1f}M masked; "  # type: ignore[call-overload]
          f"{args.tasks} tasks x {args.samples} samples, batch {args.batch}, {args.device}, {args.threads} thread(s), "
          f"median of {args.steps} steps")
    print(f"  plain fine-tuning step   {float(plain['step_s']):8.2f} s   {memory} {gib(plain['peak'])}")  # type: ignore[arg-type]
    print(f"  mask step (unchunked)    {float(mask['step_s']):8.2f} s   ({float(mask['step_s']) / float(plain['step_s']):.1f}x plain)  "  # type: ignore[arg-type]
          f"{memory} {gib(mask['peak'])}, plan estimate {gib(mask['estimate'])} "
          f"({int(mask['estimate']) / int(mask['peak']) - 1:+.0%})")  # type: ignore[call-overload]
    under = int(limited["peak"]) <= half  # type: ignore[call-overload]
    print(f"  max_memory = half that peak ({gib(half)}): {float(limited['step_s']):8.2f} s/step, {limited['passes']} passes of "  # type: ignore[arg-type]
          f"up to {limited['replicas']}, {memory} {gib(limited['peak'])} ({'under' if under else 'OVER'} the limit), plan "
          f"estimate {gib(limited['estimate'])}; masks {'equal' if limited['masks'] == mask['masks'] else 'DIFFERENT'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert", "resnet", "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="examples per step and task (default 8)")
    parser.add_argument("--case", choices=["plain", "mask"], help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pass-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return 0
    for name in (["bert", "resnet"] if args.model == "all" else [args.model]):
        args.model = name
        compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
