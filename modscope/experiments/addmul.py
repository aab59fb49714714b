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
from ..evaluation import evaluate, predict
from ..devices import resolve_device
from ..masks.maskset import Mask
from ..model import Model
from ..tasks import Task
from .common import (
    MODSCOPE, PAPER, PAPER_FNN, Claim, ExperimentOptions, fit_masks, fmt, format_table, mask_config, mean_std, relu_mlp,
    run_experiment, train_base
)

DESCRIPTION = "addition vs multiplication on a feed-forward net: specialization and sharing (paper 8.1)"

#: the paper's settings (docs/method.md section 8.1). Its add/mul tables and figures use the "big" 2000x4 FNN (the
#: authors' plotting scripts and sweeps); 800-800-256 is only their command-line default and no figure shows it.
SETTINGS: dict[str, Any] = {"model": "fnn", **PAPER_FNN, "beta": 1e-4, "n_valid": 10_000}
QUICK: dict[str, Any] = {"hidden": (400, 400, 200), "base_steps": 4000, "mask_steps": 1500, "base_lr": 3e-3}
#: the paper's 2000x4 network with the steps that fit in about an hour and a half on 2 CPU cores: a base step takes
#: about 0.1 s and a step of the three masks (12.5M weights each, 4 samples) about 1.2 s at 2 threads (2.8 s at 1).
MEDIUM: dict[str, Any] = {"base_steps": 6000, "mask_steps": 3000, "base_lr": 3e-3}

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


class AddMulLSTM(nn.Module):
    """The paper's LSTM variant: 2 layers (256 units), the 42-d input repeated for 3 time steps, Linear(256 → 20) on the
    last step, output viewed as (N, 2 digits, 10 classes). Written with explicit gate matmuls so that vmap batches it.

    Example:
        >>> AddMulLSTM((16, 16))(torch.zeros(5, 42)).shape
        torch.Size([5, 2, 10])
    """

    def __init__(self, hidden: tuple[int, ...] = (256, 256), steps: int = 3):
        super().__init__()
        from .scan_model import LSTMLayer

        self.steps = steps
        self.cells = nn.ModuleList(LSTMLayer(n_in, n_out) for n_in, n_out in itertools.pairwise((42, *hidden)))
        self.output = nn.Linear(hidden[-1], 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.unsqueeze(1).expand(-1, self.steps, -1)
        for cell in self.cells:
            gates = cell.project(seq)
            h = gates.new_zeros(x.shape[0], cell.weight_hh.shape[1])
            c, outs = torch.zeros_like(h), []
            for t in range(self.steps):
                h, c = cell.step(gates[:, t], h, c)
                outs.append(h)
            seq = torch.stack(outs, dim=1)
        return self.output(seq[:, -1]).view(-1, 2, 10)


def build_net(settings: dict[str, Any]) -> nn.Module:
    """The FNN (``model: "fnn"``) or LSTM (``"lstm"``) of the settings."""
    kind = settings.get("model", "fnn")
    if kind not in ("fnn", "lstm"):
        from ..errors import InvalidParameterError

        raise InvalidParameterError(f"unknown add/mul model {kind!r}; use 'fnn' or 'lstm'")
    return AddMulLSTM(tuple(settings["hidden"])) if kind == "lstm" else AddMulNet(tuple(settings["hidden"]))


CONFUSION_COLUMNS = ("= a+b", "= a×b", "neither")


def op_confusion(model: Model, task: Task, mask: Mask | None = None, invert: bool = False, *,
                 device: torch.device | str | None = None) -> np.ndarray:
    """The paper's op confusion: for each true operation (rows +, ×), the % of examples whose prediction equals the sum,
    the product, or neither (columns `CONFUSION_COLUMNS`). A row can exceed 100% where sum and product coincide."""
    digits = predict(model, task, mask, invert, device=device).argmax(-1)
    predicted = (digits[:, 0] + 10 * digits[:, 1]).numpy()
    x = task.inputs[0].numpy()
    d = [x[:, 10 * slot: 10 * slot + 10].argmax(1) for slot in range(4)]
    a, b, op = d[0] + 10 * d[1], d[2] + 10 * d[3], x[:, 40:42].argmax(1)
    is_sum, is_product = predicted == (a + b) % 100, predicted == (a * b) % 100
    table = np.zeros((2, 3))
    for row in range(2):
        rows = op == row
        if rows.any():
            table[row] = [is_sum[rows].mean(), is_product[rows].mean(), (~is_sum & ~is_product)[rows].mean()]
    return table * 100


def half_masks(model: Model, control: Mask) -> dict[str, Mask]:
    """The paper's half-mask test: the control mask on the first ceil(L/2) masked tensors only ("early") or on the
    others only ("late"); the rest keep all their weights. Tensors in the model's order."""
    names = [w.name for w in model.weights if w.name in control]
    early = set(names[: -(-len(names) // 2)])

    def only(which: set[str]) -> Mask:
        return Mask({n: t if n in which else torch.ones_like(t) for n, t in control.items()}, control.layers)

    return {"early": only(early), "late": only(set(names) - early)}


class AddMulNet(nn.Module):
    """ReLU feed-forward net 42 → hidden... → 20, output viewed as (N, 2 digits, 10 classes)."""

    def __init__(self, hidden: tuple[int, ...] = (2000, 2000, 2000, 2000)):
        super().__init__()
        self.layers = relu_mlp(42, hidden, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).view(*x.shape[:-1], 2, 10)


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: train the net, the three masks, and measure."""
    device = resolve_device(options.device)
    torch.manual_seed(seed)
    train, valid = make_tasks(settings["n_valid"], seed)
    net = build_net(settings)
    model = train_base(net, train["control"], settings, seed, options, tag="addmul",
                       what=f"the {settings['model']} {tuple(settings['hidden'])}")
    masks = fit_masks(model, [train["control"], train["add"], train["mul"]], mask_config(settings, seed, options), options,
                      tag="addmul", seed=seed, what="control, + and × masks")
    accuracy: dict[str, dict[str, float]] = {"full": {op: evaluate(model, valid[op], device=device) for op in OPS}}
    for name in ("control", "add", "mul"):
        accuracy[name] = {op: evaluate(model, valid[op], masks[name], device=device) for op in OPS}
        accuracy[f"not_{name}"] = {op: evaluate(model, valid[op], masks[name], invert=True, device=device) for op in OPS}
    confusion = {"full": op_confusion(model, valid["iid"], device=device).tolist()}
    for op in OPS:
        confusion[f"not_{op}"] = op_confusion(model, valid["iid"], masks[op], invert=True, device=device).tolist()
    with_control = evaluate(model, valid["iid"], masks["control"], device=device)
    half = {part: with_control - evaluate(model, valid["iid"], keep, device=device)
            for part, keep in half_masks(model, masks["control"]).items()}
    share = metrics.sharing(masks, ["add", "mul"])
    overlap = metrics.iou(masks, ["add", "mul"])
    overlap_min = metrics.iomin(masks, ["add", "mul"])
    return {
        "seed": seed,
        "accuracy": accuracy,
        "op_confusion": confusion,
        "half_mask_drop": half,
        "density": masks.density(),
        "counts": masks.counts(),
        "sharing": share.to_dict(),
        "iou": overlap.to_dict(),
        "iomin": overlap_min.to_dict(),
        "layers": sorted(set(masks.layers.values()), key=lambda n: [w.layer for w in model.weights].index(n)),
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


def _confusion_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for key, label in (("full", "full net"), ("not_add", "+ removed"), ("not_mul", "× removed")):
        for row, op in enumerate(("+", "×")):
            rows.append([label if row == 0 else "", f"true {op}"]
                        + [f"{mean_std([r['op_confusion'][key][row][col] for r in runs])[0]:.1f}%" for col in range(3)])
    return format_table(["weights", "examples", *(f"prediction {c}" for c in CONFUSION_COLUMNS)], rows)


def _half_mask_table(runs: list[dict[str, Any]]) -> str:
    rows = [[f"control mask on the {part} half of the layers only", fmt([r["half_mask_drop"][part] for r in runs])]
            for part in ("early", "late")]
    return format_table(["test", "accuracy drop vs the whole control mask"], rows)


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


def run(options: ExperimentOptions, *, name: str = "addmul", paper: dict[str, Any] | None = None,
        quick: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report.

    ``paper`` and ``quick`` replace the FNN's settings and quick preset (the LSTM variant, ``addmul-lstm``, which has
    no medium preset).
    """
    return run_experiment(name, options, paper=paper or SETTINGS, quick=quick if quick is not None else QUICK,
                          medium=None if paper else MEDIUM, run_seed=run_seed, claims=claims, tables=_tables)


def _tables(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [("Accuracy on validation data", _accuracy_table(runs)), ("+ and × masks per layer", _layer_table(runs)),
            ("Op confusion on validation data", _confusion_table(runs)), ("Half-mask test", _half_mask_table(runs))]
