"""How much slower is a model converted from ONNX than the torch module it was exported from?

Exports three models from torch (an MLP, a CNN with batch norm, a small Transformer encoder) with each torch
exporter, loads each with ``modscope.load`` and times the forward pass of the native module and of the converted
one in alternating rounds, reporting the medians. By default torch runs on one thread and the time is that
thread's CPU time, which other work on a shared machine disturbs far less than wall-clock time; ``--threads N``
(N > 1) or ``--wall`` time wall-clock instead (idle worker threads spin, so CPU time would overcount them).
The target is a ratio of at most 1.2.

The native Transformer runs with torch's fused attention fast path turned off, as modscope runs every model while
it trains masks (`Model.frozen`); the ratio against the fast path is printed too, for reference.

Usage::

    python benchmarks/converter_forward.py                         # both exporters, 1 thread, CPU time
    python benchmarks/converter_forward.py --threads 2             # 2 threads, wall-clock time
    python benchmarks/converter_forward.py --exporter torchscript  # torch.onnx.export(dynamo=False) only
    python benchmarks/converter_forward.py --grad                  # forward + backward instead of forward only
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

TARGET = 1.2


class CNN(nn.Module):
    """Three conv-BN-ReLU blocks with pooling, then a linear classifier (CIFAR-sized input)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in [(3, 32), (32, 64), (64, 64)]:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class Encoder(nn.Module):
    """Token embedding, two Transformer encoder layers, mean pooling and a linear head."""

    def __init__(self, vocab: int = 100, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def distinct(module: nn.Module) -> nn.Module:
    """Perturb every float tensor, as training would: exporters store equal tensors (cloned layers) only once."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.rand_like(tensor))
    return module.eval()


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return {
        "mlp": (distinct(mlp), torch.randn(64, 784)),
        "cnn": (distinct(CNN()), torch.randn(32, 3, 32, 32)),
        "transformer": (distinct(Encoder()), torch.randint(0, 100, (16, 32))),
    }


def export(module: nn.Module, x: torch.Tensor, exporter: str) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=exporter == "dynamo", opset_version=18)
    return buffer.getvalue()


def block_time(fn: Callable[[], object], number: int, clock: Callable[[], float]) -> float:
    """Mean time of ``number`` calls, in milliseconds."""
    start = clock()
    for _ in range(number):
        fn()
    return (clock() - start) / number * 1e3


def timed_pair(
    native: Callable[[], object], converted: Callable[[], object], rounds: int, clock: Callable[[], float]
) -> tuple[float, float, float]:
    """Median native and converted times and the median of the per-round ratios, the two run alternately.

    Alternating blocks of calls makes load from other processes hit both alike; the ratio of each round is taken
    before the median, so a slow moment does not skew it.
    """
    for fn in (native, converted):
        for _ in range(3):
            fn()
    number = max(1, int(0.05 / max(block_time(native, 2, time.perf_counter) / 1e3, 1e-6)))
    n_times, c_times = [], []
    for _ in range(rounds):
        n_times.append(block_time(native, number, clock))
        c_times.append(block_time(converted, number, clock))
    ratios = [c / n for n, c in zip(n_times, c_times)]
    return statistics.median(n_times), statistics.median(c_times), statistics.median(ratios)


def make_call(module: Callable[..., torch.Tensor], x: torch.Tensor, grad: bool) -> Callable[[], object]:
    if not grad:

        def forward() -> object:
            with torch.no_grad():
                return module(x)

        return forward

    def step() -> object:
        out = module(x)
        out.float().sum().backward()
        return out

    return step


def run(exporter: str, args: argparse.Namespace) -> float:
    """Print one table for ``exporter``; return the worst ratio."""
    import onnx

    import modscope

    wall = args.wall or args.threads > 1  # idle worker threads spin, which CPU time would count
    clock = time.perf_counter if wall else time.thread_time
    worst = 0.0
    print(f"\nexporter={exporter}, {args.threads} thread(s), {'forward+backward' if args.grad else 'forward'}, "
          f"{'wall-clock' if wall else 'CPU'} time, median of {args.rounds} alternating rounds")
    print(f"{'model':12} {'native ms':>10} {'modscope ms':>12} {'ratio':>6}  target <= {TARGET}")
    for name, (module, x) in models().items():
        model = modscope.load(onnx.load_from_string(export(module, x, exporter)))
        with model.frozen():  # eval mode, attention fast path off: how modscope runs models
            native_ms, converted_ms, ratio = timed_pair(
                make_call(module, x, args.grad), make_call(model.module, x, args.grad), args.rounds, clock
            )
        worst = max(worst, ratio)
        line = f"{name:12} {native_ms:10.3f} {converted_ms:12.3f} {ratio:6.2f}"
        if name == "transformer" and not args.grad:
            fast_ms, _, fast_ratio = timed_pair(
                make_call(module, x, False), make_call(model.module, x, False), 5, clock
            )
            line += f"  (native with the fused fast path: {fast_ms:.3f} ms, ratio {fast_ratio:.2f})"
        print(line)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exporter", choices=["dynamo", "torchscript", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 implies --wall)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--grad", action="store_true", help="time forward + backward")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    exporters = ["dynamo", "torchscript"] if args.exporter == "both" else [args.exporter]
    worst = {exporter: run(exporter, args) for exporter in exporters}
    print()
    for exporter, ratio in worst.items():
        print(f"{exporter}: worst ratio {ratio:.2f}: {'PASS' if ratio <= TARGET else 'FAIL'} (target <= {TARGET})")
    return 0 if max(worst.values()) <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
