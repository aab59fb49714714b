"""Addition vs multiplication (docs/method.md section 8.1): does a network keep separate weights for + and ×?

Data: two 2-digit operands a, b and an operation flag; the target is (a op b) mod 100 as two digits. The input is the
one-hot of the four digits, little-endian (40), and of the operation (2): 42 values. The input space has 20,000
combinations, so training draws from all of them with replacement (as the paper's 1,000,000 random samples do) and
validation is 10,000 random samples of the same distribution. A ReLU feed-forward net (42 → hidden → 20, read as two
10-way digits) is trained on both operations; then three masks are trained on the frozen net: a control mask on all
data, a + mask on additions, a × mask on multiplications. The table gives each task's accuracy with the full net,
with each mask, and with each mask removed, and the masks' sharing and IoU per layer.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import metrics
from ..evaluation import evaluate
from ..masks.config import MaskConfig
from ..masks.trainer import resolve_device, train_masks
from ..model import Model
from ..tasks import Task
from .common import (
    MODSCOPE,
    PAPER,
    Claim,
    ExperimentOptions,
    fmt,
    format_table,
    log,
    mean_std,
    publish,
    resolve_settings,
    train_network,
)

DESCRIPTION = "addition vs multiplication on a feed-forward net: specialization and sharing (paper 8.1)"

#: the paper's settings (docs/method.md section 8.1). Its add/mul tables and figures use the "big" 2000x4 FNN (the
#: authors' plotting scripts and sweeps); 800-800-256 is only their command-line default and no figure shows it.
SETTINGS: dict[str, Any] = {
    "hidden": (2000, 2000, 2000, 2000),
    "base_steps": 20_000,
    "mask_steps": 20_000,
    "batch_size": 128,
    "base_lr": 1e-3,
    "mask_lr": 1e-2,
    "beta": 1e-4,
    "n_valid": 10_000,
}
QUICK: dict[str, Any] = {"hidden": (400, 400, 200), "base_steps": 4000, "mask_steps": 1500, "base_lr": 3e-3}

OPS = ("add", "mul")


def encode(a: np.ndarray, b: np.ndarray, op: np.ndarray) -> np.ndarray:
    """(N, 42) float32 one-hot: digits of a and b little-endian (4 x 10), then the operation (2)."""
    n = len(a)
    x = np.zeros((n, 42), dtype=np.float32)
    rows = np.arange(n)
    for slot, digit in enumerate((a % 10, a // 10, b % 10, b // 10)):
        x[rows, slot * 10 + digit] = 1
    x[rows, 40 + op] = 1
    return x


def targets(a: np.ndarray, b: np.ndarray, op: np.ndarray) -> np.ndarray:
    """(N, 2) int64: the digits of (a op b) mod 100, little-endian."""
    r = np.where(op == 0, a + b, a * b) % 100
    return np.stack([r % 10, r // 10], axis=1).astype(np.int64)


def all_examples() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (a, b, op) combination: 20,000 rows."""
    a, b, op = np.meshgrid(np.arange(100), np.arange(100), np.arange(2), indexing="ij")
    return a.ravel(), b.ravel(), op.ravel()


def make_tasks(n_valid: int, seed: int = 0) -> tuple[dict[str, Task], dict[str, Task]]:
    """Training tasks (control/add/mul over all combinations) and validation tasks (iid/add/mul, random samples)."""
    a, b, op = all_examples()
    rng = np.random.RandomState(0x12345678 + 2 + seed)
    va, vb, vop = rng.randint(0, 100, n_valid), rng.randint(0, 100, n_valid), rng.randint(0, 2, n_valid)

    def subset(name: str, a: np.ndarray, b: np.ndarray, op: np.ndarray, which: int | None) -> Task:
        keep = np.ones(len(a), bool) if which is None else op == which
        return Task(name, encode(a[keep], b[keep], op[keep]), targets(a[keep], b[keep], op[keep]), loss="ce")

    train = {"control": subset("control", a, b, op, None), "add": subset("add", a, b, op, 0), "mul": subset("mul", a, b, op, 1)}
    valid = {"iid": subset("iid", va, vb, vop, None), "add": subset("add", va, vb, vop, 0), "mul": subset("mul", va, vb, vop, 1)}
    return train, valid


class AddMulNet(nn.Module):
    """ReLU feed-forward net 42 → hidden... → 20, output viewed as (N, 2 digits, 10 classes)."""

    def __init__(self, hidden: tuple[int, ...] = (2000, 2000, 2000, 2000)):
        super().__init__()
        sizes = (42, *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 20))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).view(*x.shape[:-1], 2, 10)


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: train the net, the three masks, and measure."""
    device = resolve_device(options.device)
    torch.manual_seed(seed)
    train, valid = make_tasks(settings["n_valid"], seed)
    net = AddMulNet(tuple(settings["hidden"]))
    log(f"[addmul seed {seed}] training the network {tuple(settings['hidden'])} for {settings['base_steps']} steps")
    train_network(net, train["control"], n_steps=settings["base_steps"], batch_size=settings["batch_size"],
                  lr=settings["base_lr"], seed=seed, device=device, progress=options.progress)
    model = Model(net.cpu())
    config = MaskConfig(n_steps=settings["mask_steps"], batch_size=settings["batch_size"], lr=settings["mask_lr"],
                        beta=settings["beta"], seed=seed, device=str(device))
    log(f"[addmul seed {seed}] training control, + and × masks for {settings['mask_steps']} steps")
    masks = train_masks(model, [train["control"], train["add"], train["mul"]], config, progress=options.progress)
    accuracy: dict[str, dict[str, float]] = {"full": {op: evaluate(model, valid[op], device=device) for op in OPS}}
    for name in ("control", "add", "mul"):
        accuracy[name] = {op: evaluate(model, valid[op], masks[name], device=device) for op in OPS}
        accuracy[f"not_{name}"] = {op: evaluate(model, valid[op], masks[name], invert=True, device=device) for op in OPS}
    share = metrics.sharing(masks, ["add", "mul"])
    overlap = metrics.iou(masks, ["add", "mul"])
    overlap_min = metrics.iomin(masks, ["add", "mul"])
    return {
        "seed": seed,
        "accuracy": accuracy,
        "density": masks.density(),
        "counts": masks.counts(),
        "sharing": share.to_dict(),
        "iou": overlap.to_dict(),
        "iomin": overlap_min.to_dict(),
        "layers": sorted(set(masks.layers.values()), key=lambda n: int(n.split(".")[-1])),
    }


def _accuracy_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    labels = {"full": "full net", "control": "control mask", "add": "+ mask", "mul": "× mask", "not_add": "+ removed (¬+)", "not_mul": "× removed (¬×)"}
    for key, label in labels.items():
        rows.append([label] + [fmt([r["accuracy"][key][op] for r in runs]) for op in OPS])
    return format_table(["weights", "addition acc", "multiplication acc"], rows)


def _layer_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for layer in runs[0]["layers"]:
        shared = [r["sharing"]["per_layer"][layer]["add"] for r in runs]
        ious = [r["iou"]["per_layer"][layer][0][1] for r in runs]
        iomins = [r["iomin"]["per_layer"][layer][0][1] for r in runs]
        chance = [r["iou"]["chance_per_layer"][layer][0][1] for r in runs]
        n_add = [r["counts"]["add"][layer] for r in runs]
        n_mul = [r["counts"]["mul"][layer] for r in runs]
        rows.append([layer, fmt(shared), fmt(ious), fmt(chance), fmt(iomins), f"{mean_std(n_add)[0]:.0f}", f"{mean_std(n_mul)[0]:.0f}"])
    rows.append(["all", fmt([r["sharing"]["total"]["add"] for r in runs]), fmt([r["iou"]["total"][0][1] for r in runs]),
                 fmt([r["iou"]["chance_total"][0][1] for r in runs]), fmt([r["iomin"]["total"][0][1] for r in runs]),
                 f"{mean_std([sum(r['counts']['add'].values()) for r in runs])[0]:.0f}",
                 f"{mean_std([sum(r['counts']['mul'].values()) for r in runs])[0]:.0f}"])
    return format_table(["layer", "+ shared with ×", "IoU", "IoU chance", "IoMin", "n(+)", "n(×)"], rows)


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """The method's guarantees and the paper's findings, checked on the runs' means."""
    def acc(key: str, op: str) -> list[float]:
        return [r["accuracy"][key][op] for r in runs]

    def m(values: list[float]) -> float:
        return mean_std(values)[0]

    out = []
    for op, sym in (("add", "+"), ("mul", "×")):
        kept = m(acc(op, op)) / max(m(acc("full", op)), 1e-9)
        out.append(Claim(f"{sym} mask keeps {sym} accuracy (of full)", f"{kept * 100:.1f}%", "≈ full", kept >= 0.9,
                         MODSCOPE + "≥ 90% of the full net"))
        out.append(Claim(f"{sym} removed: {sym} accuracy", fmt(acc(f"not_{op}", op)), "≈ 0",
                         m(acc(f"not_{op}", op)) < 0.1, MODSCOPE + "< 10%"))
    other = {"add": "mul", "mul": "add"}
    for op, sym in (("add", "+"), ("mul", "×")):
        o = other[op]
        spared = m(acc(f"not_{op}", o)) / max(m(acc("full", o)), 1e-9)
        out.append(Claim(f"{sym} removed: {'×' if op == 'add' else '+'} accuracy (of full)", f"{spared * 100:.1f}%",
                         "largely kept (specialization)", spared >= 0.5, MODSCOPE + "≥ 50% of the full net"))
    n_add = m([sum(r["counts"]["add"].values()) for r in runs])
    n_mul = m([sum(r["counts"]["mul"].values()) for r in runs])
    out.append(Claim("weights used by × / by +", f"{n_mul / max(n_add, 1):.2f}", "× needs more weights", n_mul > n_add,
                     PAPER + "ratio > 1"))
    out.append(Claim("share of + weights also used by ×", fmt([r["sharing"]["total"]["add"] for r in runs]),
                     "partial; falls as the net grows", None, "reported, not judged here (see addmul-sizes)"))
    return out


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report."""
    settings = resolve_settings(SETTINGS, QUICK, options)
    runs = [run_seed(settings, seed, options) for seed in range(options.seeds)]
    checks = claims(runs)
    tables = [("Accuracy on validation data", _accuracy_table(runs)), ("+ and × masks per layer", _layer_table(runs))]
    return publish("addmul", options, settings, runs, checks, tables)
