"""Projected run time of each experiment at the paper's settings (the default of ``modscope reproduce NAME``).

Running the paper's settings takes hours on a CPU, so this runs every experiment end to end with the paper's networks,
data and batch sizes but only a few base-training and mask-training steps, times each base-training and each
mask-training call, and projects: time per step x the paper's step count, plus everything else (data, evaluation,
metrics) as measured. Short mask runs use the eager sampler (the compiled one is used from 1,000 steps), so the
projection for the masks is an upper bound on a CPU.

    python benchmarks/experiment_runtime.py                       # every experiment, CPU
    python benchmarks/experiment_runtime.py double-add --device cuda
    python benchmarks/experiment_runtime.py --steps 50            # more steps, steadier per-step figures

The class-removal and stability figures are for the bundled digits data; CIFAR-10's 32x32 images cost more per step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modscope.experiments import EXPERIMENTS, get_experiment
from modscope.experiments.common import ExperimentOptions


class PhaseClock:
    """Wall time and step counts of the base-training and mask-training calls an experiment makes."""

    def __init__(self) -> None:
        self.seconds = {"base": 0.0, "masks": 0.0}
        self.calls = {"base": 0, "masks": 0}

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        return timed


def project(name: str, steps: int, device: str | None) -> dict[str, Any]:
    """Run ``name`` with ``steps`` base and mask steps per call; the measured and projected times in seconds."""
    module = get_experiment(name)
    clock = PhaseClock()
    # experiments call these through their own module globals (some through another experiment's helpers)
    for mod in [m for n, m in sys.modules.items() if n.startswith("modscope.experiments.")]:
        for attr, phase in (("train_network", "base"), ("train_masks", "masks")):
            if hasattr(mod, attr):
                original = getattr(getattr(mod, attr), "__wrapped__", getattr(mod, attr))
                setattr(mod, attr, clock.wrap(phase, original))
    overrides = {"base_steps": steps, "mask_steps": steps}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            module.run(ExperimentOptions(out=Path(out), device=device, progress=False, overrides=overrides))
        total = time.perf_counter() - start
    settings = module.SETTINGS
    other = total - clock.seconds["base"] - clock.seconds["masks"]
    base = clock.seconds["base"] / steps * settings["base_steps"]
    masks = clock.seconds["masks"] / steps * settings["mask_steps"]
    return {"name": name, "calls": dict(clock.calls), "measured": total, "other": other, "base": base, "masks": masks,
            "projected": other + base + masks}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(EXPERIMENTS), help="experiments (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="base and mask steps per call to time (default: 20)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {args.steps} steps per training call")
    header = f"{'experiment':<14} {'calls b/m':>9} {'this run':>9} {'base (paper)':>13} {'masks (paper)':>14} {'other':>9} {'projected':>10}"
    print(header)
    print("-" * len(header))
    for name in args.names:
        r = project(name, args.steps, args.device)
        calls = f"{r['calls']['base']}/{r['calls']['masks']}"
        print(f"{name:<14} {calls:>9} {hours(r['measured']):>9} {hours(r['base']):>13} {hours(r['masks']):>14} "
              f"{hours(r['other']):>9} {hours(r['projected']):>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
