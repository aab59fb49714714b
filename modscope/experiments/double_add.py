"""Double addition (docs/method.md section 8.2): does one network reuse the same weights for two identical sub-problems?

Data: two independent pairs (a1, b1), (a2, b2) of 2-digit numbers; the targets are (a_t + b_t) mod 100 as two digits
each. The network is the paper's feed-forward variant: a ReLU FNN with 80 inputs (one-hot of the 8 digits,
little-endian, pair 1 first) and 40 outputs (2 pairs x 2 digits x 10). Pair t's prediction is read from output slot t
of a forward pass in which the other pair's inputs are zeroed (the paper's per-pair forward). Each pass is its own
example row (digits, pair), so that the two passes of an example fall into different slices of the batch and see
different mask samples, as the authors' two forward calls per step do. The net is trained on both pairs; then three
masks are trained on the frozen net: "both" (stage 0, both passes), "pair1" (pair 1's pass only) and "pair2".

Measured: each pair's accuracy with each mask kept and removed, the pair masks' IoU and sharing per layer with the
chance level, and two variants of the removal test that protect the input and output layers (whose weights are
necessarily pair-specific): "I/O kept" removes a pair's mask in the hidden layers only (paper ``ones``), "I/O control"
additionally keeps only the stage-0 mask in the I/O layers (paper ``fullmask``). If the pairs shared hidden weights,
removing pair 1's hidden weights would break pair 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .. import metrics
from ..evaluation import evaluate
from ..devices import resolve_device
from ..masks.maskset import Mask, MaskSet
from ..model import Model
from ..tasks import Task
from .common import (
    MODSCOPE, PAPER_FNN, Claim, ExperimentOptions, fit_masks, fmt, format_table, mask_config, mean_std, relu_mlp, run_experiment,
    train_base
)

DESCRIPTION = "two pairs of additions through one feed-forward net: is the adder reused? (paper 8.2)"

#: the paper's settings (docs/method.md section 8.2, the authors' ``tuple_ff`` big): FNN 2000x4, β 4e-4.
SETTINGS: dict[str, Any] = {**PAPER_FNN, "beta": 4e-4, "n_train": 1_000_000, "n_valid": 10_000}
#: the quick preset: half the paper's small width (800x4) and a quarter of its mask steps. At 256x4 with 2,000 mask
#: steps the masks stay dense (35%) and the pairs look shared; see RESULTS.md for the sizes tried.
QUICK: dict[str, Any] = {"hidden": (400, 400, 400, 400), "base_steps": 6000, "mask_steps": 5000, "n_train": 200_000}

PAIRS = ("pair1", "pair2")


def sample_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random examples: digits (N, 8) int64 and targets (N, 4) int64.

    Digits are a1, b1, a2, b2 little-endian (a1 % 10, a1 // 10, b1 % 10, ...); targets the sums' digits, pair 1 first.
    """
    rng = np.random.RandomState(0x12345678 + seed)
    a1, b1, a2, b2 = (rng.randint(0, 100, n) for _ in range(4))
    digits = np.stack([v for x in (a1, b1, a2, b2) for v in (x % 10, x // 10)], axis=1).astype(np.int64)
    s1, s2 = (a1 + b1) % 100, (a2 + b2) % 100
    targets = np.stack([s1 % 10, s1 // 10, s2 % 10, s2 // 10], axis=1).astype(np.int64)
    return digits, targets


class DoubleAddNet(nn.Module):
    """ReLU FNN 80 → hidden... → 40, one pass per row with the other pair's inputs zeroed.

    ``forward(digits (N, 8), pair (N,))`` returns pair ``pair[i]``'s two digits, (N, 2, 10), read from output slot
    ``pair[i]`` of a pass that sees only that pair's inputs.

    Example:
        >>> net = DoubleAddNet((16, 16))
        >>> net(torch.zeros(3, 8, dtype=torch.long), torch.tensor([0, 1, 1])).shape
        torch.Size([3, 2, 10])
    """

    def __init__(self, hidden: tuple[int, ...] = (2000, 2000, 2000, 2000)):
        super().__init__()
        self.layers = relu_mlp(80, hidden, 40)

    def forward(self, digits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        one_hot = (digits.unsqueeze(-1) == torch.arange(10, device=digits.device)).to(self.layers[0].weight.dtype)
        one_hot = one_hot.flatten(1)  # (N, 80)
        of_pair = (torch.arange(80, device=digits.device) >= 40).long()  # which pair each input belongs to
        seen = (of_pair == pair.unsqueeze(-1)).to(one_hot.dtype)  # the row's own pair only
        out = self.layers(one_hot * seen).view(-1, 2, 2, 10)  # (N, slot, digit, class)
        return out.gather(1, pair.view(-1, 1, 1, 1).expand(-1, 1, 2, 10)).squeeze(1)


def make_tasks(digits: np.ndarray, targets: np.ndarray) -> dict[str, Task]:
    """Tasks "both" (each example's two passes as two rows), "pair1" and "pair2" (one pass each)."""
    n = len(digits)
    first, second = np.zeros(n, np.int64), np.ones(n, np.int64)
    return {
        "both": Task("both", (np.concatenate([digits, digits]), np.concatenate([first, second])),
                     np.concatenate([targets[:, :2], targets[:, 2:]]), loss="ce"),
        "pair1": Task("pair1", (digits, first), targets[:, :2], loss="ce"),
        "pair2": Task("pair2", (digits, second), targets[:, 2:], loss="ce"),
    }


def io_weights(model: Model) -> tuple[str, ...]:
    """Names of the first and last layers' weights (the input and output layers)."""
    layers = sorted({w.layer for w in model.weights}, key=lambda n: int(n.split(".")[-1]))
    return tuple(w.name for w in model.weights if w.layer in (layers[0], layers[-1]))


def removal_masks(masks: MaskSet, io: tuple[str, ...], pair: str) -> dict[str, Mask]:
    """The keep-masks of the three removal tests of ``pair``: all weights, hidden only, hidden + control in I/O."""
    removed = ~masks[pair]
    hidden_only = Mask({n: torch.ones_like(t) if n in io else t for n, t in removed.items()}, removed.layers)
    io_control = Mask({n: masks["both"][n] if n in io else t for n, t in removed.items()}, removed.layers)
    return {"removed": removed, "removed_io_kept": hidden_only, "removed_io_control": io_control}


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: train the net on both pairs, the three masks, and measure."""
    device = resolve_device(options.device)
    torch.manual_seed(seed)
    train = make_tasks(*sample_digits(settings["n_train"], 10 * seed))
    valid = make_tasks(*sample_digits(settings["n_valid"], 10 * seed + 2))
    net = DoubleAddNet(tuple(settings["hidden"]))
    model = train_base(net, train["both"], settings, seed, options, tag="double-add",
                       what=f"the network {tuple(settings['hidden'])}")
    masks = fit_masks(model, [train["both"], train["pair1"], train["pair2"]], mask_config(settings, seed, options), options,
                      tag="double-add", seed=seed, what="the both, pair-1 and pair-2 masks")
    io = io_weights(model)

    def acc(mask: Mask | None = None, invert: bool = False) -> dict[str, float]:
        return {p: evaluate(model, valid[p], mask, invert, device=device) for p in PAIRS}

    accuracy = {"full": acc()}
    for name in ("both", *PAIRS):
        accuracy[name] = acc(masks[name])
    for pair in PAIRS:
        for test, keep in removal_masks(masks, io, pair).items():
            accuracy[f"{test}_{pair}"] = acc(keep)
    layers = sorted(set(masks.layers.values()), key=lambda n: int(n.split(".")[-1]))
    return {
        "seed": seed,
        "accuracy": accuracy,
        "density": masks.density(),
        "counts": masks.counts(),
        "sharing": metrics.sharing(masks, list(PAIRS)).to_dict(),
        "iou": metrics.iou(masks, list(PAIRS)).to_dict(),
        "iomin": metrics.iomin(masks, list(PAIRS)).to_dict(),
        "layers": layers,
        "io_layers": [layers[0], layers[-1]],
    }


_ROWS = {
    "full": "full net",
    "both": "both-pairs mask",
    "pair1": "pair-1 mask",
    "pair2": "pair-2 mask",
    "removed_pair1": "pair 1 removed",
    "removed_pair2": "pair 2 removed",
    "removed_io_kept_pair1": "pair 1 removed, I/O kept",
    "removed_io_kept_pair2": "pair 2 removed, I/O kept",
    "removed_io_control_pair1": "pair 1 removed, I/O = control",
    "removed_io_control_pair2": "pair 2 removed, I/O = control",
}


def _accuracy_table(runs: list[dict[str, Any]]) -> str:
    rows = [[label] + [fmt([r["accuracy"][key][p] for r in runs]) for p in PAIRS] for key, label in _ROWS.items()]
    return format_table(["weights", "pair 1 acc", "pair 2 acc"], rows)


def _pair_value(run: dict[str, Any], metric: str, layer: str, chance: bool = False) -> float:
    """The pair1/pair2 value of an overlap metric in ``layer`` ("all" for the whole model)."""
    key = ("chance_" if chance else "") + ("total" if layer == "all" else "per_layer")
    matrix = run[metric][key] if layer == "all" else run[metric][key][layer]
    return matrix[0][1]


def _layer_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for layer in [*runs[0]["layers"], "all"]:
        shared = [r["sharing"]["total"]["pair1"] if layer == "all" else r["sharing"]["per_layer"][layer]["pair1"] for r in runs]
        counts = [[sum(r["counts"][p].values()) if layer == "all" else r["counts"][p][layer] for r in runs] for p in PAIRS]
        rows.append([layer, fmt([_pair_value(r, "iou", layer) for r in runs]), fmt([_pair_value(r, "iou", layer, True) for r in runs]),
                     fmt([_pair_value(r, "iomin", layer) for r in runs]), fmt(shared),
                     f"{mean_std(counts[0])[0]:.0f}", f"{mean_std(counts[1])[0]:.0f}"])
    return format_table(["layer", "IoU pair1/pair2", "IoU chance", "IoMin", "pair-1 shared with pair 2", "n(pair1)", "n(pair2)"], rows)


def hidden_iou(run: dict[str, Any]) -> tuple[float, float]:
    """Mean IoU and mean chance IoU of the pair masks over the hidden layers (I/O layers excluded)."""
    hidden = [layer for layer in run["layers"] if layer not in run["io_layers"]]
    iou = float(np.mean([run["iou"]["per_layer"][layer][0][1] for layer in hidden]))
    chance = float(np.mean([run["iou"]["chance_per_layer"][layer][0][1] for layer in hidden]))
    return iou, chance


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """The paper's findings, checked on the means over seeds."""
    def m(key: str, pair: str) -> float:
        return mean_std([r["accuracy"][key][pair] for r in runs])[0]

    def vals(key: str, pair: str) -> list[float]:
        return [r["accuracy"][key][pair] for r in runs]

    out = []
    for pair, other in (("pair1", "pair2"), ("pair2", "pair1")):
        t, o = pair[-1], other[-1]
        kept = m(pair, pair) / max(m("full", pair), 1e-9)
        out.append(Claim(f"pair-{t} mask keeps pair {t} (of full)", f"{kept * 100:.1f}%", "≈ full", kept >= 0.9,
                         MODSCOPE + "≥ 90% of the full net"))
        out.append(Claim(f"pair {t} removed: pair {t} acc", fmt(vals(f"removed_{pair}", pair)), "≈ 0",
                         m(f"removed_{pair}", pair) < 0.1, MODSCOPE + "< 10%"))
        for test, label in (("removed", ""), ("removed_io_kept", ", I/O kept"), ("removed_io_control", ", I/O = control")):
            spared = m(f"{test}_{pair}", other) / max(m("full", other), 1e-9)
            out.append(Claim(f"pair {t} removed{label}: pair {o} acc (of full)", f"{spared * 100:.1f}%",
                             "largely kept (no reuse)", spared >= 0.5,
                             MODSCOPE + "≥ 50% of the full net"))
    hid = [hidden_iou(r) for r in runs]
    out.append(Claim("hidden-layer IoU pair1/pair2 (chance)", f"{fmt([h[0] for h in hid])} ({fmt([h[1] for h in hid])})",
                     "low: little overlap beyond what is forced", None,
                     "reported, not judged"))
    return out


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report."""
    return run_experiment("double-add", options, paper=SETTINGS, quick=QUICK, run_seed=run_seed, claims=claims,
                          tables=lambda runs: [("Accuracy on validation data", _accuracy_table(runs)),
                                               ("Pair masks per layer", _layer_table(runs))])
