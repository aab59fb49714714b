"""Sharing between the + and × masks as the network grows (docs/method.md section 8.1, "total shared vs network size").

For each of three FNN sizes (the paper's small 400-400-200, medium 800x4 and big 2000x4; its huge 4000x4 is left out
for time), the add/mul network of `addmul` is trained on both operations and a + mask and a × mask are trained on the
frozen net. The measurement is the paper's "total shared": the fraction of the + mask's weights that the × mask also
uses, over all masked weights (`modscope.metrics.sharing`). The paper finds that it falls as the network grows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import metrics
from ..evaluation import evaluate
from ..devices import resolve_device
from .addmul import SETTINGS as ADDMUL_SETTINGS
from .addmul import AddMulNet, make_tasks
from .common import (
    PAPER, Claim, ExperimentOptions, fit_masks, fmt, format_table, mask_config, mean_std, run_experiment,
    train_base
)

DESCRIPTION = "share of the + mask used by the × mask for three network sizes (paper 8.1)"

#: the paper's settings (docs/method.md section 8.1): its sharing-vs-size figure's small, medium, big and huge FNNs,
#: β 1e-4.
SETTINGS: dict[str, Any] = {
    **{k: ADDMUL_SETTINGS[k] for k in ("base_steps", "mask_steps", "batch_size", "base_lr", "mask_lr", "beta", "n_valid")},
    "sizes": ((400, 400, 200), (800, 800, 800, 800), (2000, 2000, 2000, 2000), (4000, 4000, 4000, 4000)),
}
#: quick: the paper's small net and one smaller and one larger (500x4 keeps the mask temporaries under 32 MB, see
#: class_removal), trained for fewer steps.
QUICK: dict[str, Any] = {"sizes": ((200, 200, 100), (400, 400, 200), (500, 500, 500, 500)),
                         "base_steps": 5000, "mask_steps": 1500, "base_lr": 3e-3}


def run_size(settings: dict[str, Any], hidden: tuple[int, ...], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One network size and seed: train the net and the + and × masks; the sharing and accuracies."""
    device = resolve_device(options.device)
    torch.manual_seed(seed)
    train, valid = make_tasks(settings["n_valid"], seed)
    net = AddMulNet(hidden)
    model = train_base(net, train["control"], settings, seed, options, tag="addmul-sizes", what=f"the network {hidden}")
    masks = fit_masks(model, [train["add"], train["mul"]], mask_config(settings, seed, options), options,
                      tag="addmul-sizes", seed=seed, what="the + and × masks")
    share = metrics.sharing(masks, ["add", "mul"])
    return {
        "hidden": list(hidden),
        "seed": seed,
        "n_weights": sum(w.numel for w in masks.weights),
        "shared": share.total["add"],
        "shared_chance": share.chance_total["add"],
        "counts": {t: sum(c.values()) for t, c in masks.counts().items()},
        "accuracy": {
            "full": {op: evaluate(model, valid[op], device=device) for op in ("add", "mul")},
            "mask": {op: evaluate(model, valid[op], masks[op], device=device) for op in ("add", "mul")},
        },
    }


def _table(by_size: list[list[dict[str, Any]]]) -> str:
    rows = []
    for runs in by_size:
        rows.append(["x".join(map(str, runs[0]["hidden"])), f"{runs[0]['n_weights']:,}", fmt([r["shared"] for r in runs]),
                     fmt([r["shared_chance"] for r in runs]),
                     f"{mean_std([r['counts']['add'] for r in runs])[0]:,.0f}", f"{mean_std([r['counts']['mul'] for r in runs])[0]:,.0f}",
                     *(fmt([r["accuracy"][kind][op] for r in runs]) for op in ("add", "mul") for kind in ("full", "mask"))])
    headers = ["hidden", "masked weights", "+ shared with ×", "chance", "n(+)", "n(×)", "+ acc full", "+ acc (+ mask)", "× acc full", "× acc (× mask)"]
    return format_table(headers, rows)


def claims(by_size: list[list[dict[str, Any]]]) -> list[Claim]:
    """Sharing falls with size: the mean over seeds decreases from each size to the next."""
    shared = [mean_std([r["shared"] for r in runs])[0] for runs in by_size]
    falls = bool(np.all(np.diff(shared) < 0))
    measured = " > ".join(f"{s * 100:.1f}%" for s in shared) if falls else " , ".join(f"{s * 100:.1f}%" for s in shared)
    return [Claim("+ weights also used by ×, small → big", measured, "falls as the network grows", falls,
                  PAPER + "each size below the previous one")]


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the table and write the report."""
    return run_experiment("addmul-sizes", options, paper=SETTINGS, quick=QUICK, run_size=run_size, claims=claims,
                          tables=lambda by_size: [("Sharing of the + mask with the × mask per network size", _table(by_size))])
