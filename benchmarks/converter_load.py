"""How long does ``modscope.load`` take on a 50 MB ONNX file? Target: under 5 s on 2 cores.

Exports an MLP with about 13 million float32 weights (50 MB) from torch once, both as a single file and with its
weights in an external-data file, then times ``modscope.load`` on each (fresh load each time, median of the runs).
The process is pinned to 2 cores where the OS allows it.

Usage::

    python benchmarks/converter_load.py            # 50 MB, 3 runs each
    python benchmarks/converter_load.py --mb 200   # a larger file
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

TARGET_S = 5.0


def build(mb: float) -> nn.Module:
    """An MLP whose float32 weights take about ``mb`` megabytes."""
    width = int(((mb * 1e6 / 4) / 3) ** 0.5)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
    ).eval()


def write_files(module: nn.Module, folder: Path) -> dict[str, Path]:
    import onnx

    width = module[0].in_features
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, width),), buffer, dynamo=False, opset_version=17)
    single = folder / "model.onnx"
    single.write_bytes(buffer.getvalue())
    external = folder / "external" / "model.onnx"
    external.parent.mkdir()
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.save_model(proto, external, save_as_external_data=True, location="weights.bin", size_threshold=1024)
    return {"single file": single, "external data": external}


def time_load(path: Path, runs: int) -> float:
    import modscope

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model = modscope.load(path)
        times.append(time.perf_counter() - start)
        del model
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the weights in megabytes (default 50)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(available[: args.cores]))
    torch.set_num_threads(args.cores)
    import modscope  # noqa: F401 - imported before timing, as a user's program would have

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(build(args.mb), Path(tmp))
        for label, path in files.items():
            size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) / 1e6
            seconds = time_load(path, args.runs)
            worst = max(worst, seconds)
            print(f"{label:14} {size:7.1f} MB  load {seconds:6.2f} s  (target < {TARGET_S:.0f} s on {args.cores} cores)")
    print(f"{'PASS' if worst < TARGET_S else 'FAIL'}: slowest load {worst:.2f} s")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
