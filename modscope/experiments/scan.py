"""SCAN (docs/method.md section 8.3): does a network trained on the IID split use combination-specific weights?

An LSTM encoder-decoder (`scan_model`) is trained on the simple (IID) split of SCAN, generated from its grammar
(`scan_data`). Masks are then trained on the frozen net on the training set of each split: a control mask on the
simple split, and masks on the length, add-primitive "jump" and add-primitive "turn left" training sets. Each split's
test set is evaluated with the control mask ("before") and with the mask trained on that split's training data
("after"). If the net had learned the composition rules in shared weights, a mask that never saw "jump" in
combination would keep them; the paper finds instead that the test accuracy falls to about what a net trained from
scratch on the split reaches (optionally measured here with ``scratch``), and that the jump mask removes the
I_JUMP row of the decoder's output layer far more than the other rows.

Settings (paper): batch 256, Adam 1e-3, clip 5, 25,000 steps; masks β 3e-5, lr 1e-2, 25,000 steps, biases
unmasked, embeddings never masked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import InvalidParameterError
from ..evaluation import evaluate
from ..masks.maskset import MaskSet
from ..model import Model
from ..tasks import Task
from . import scan_data, scan_model
from .common import (
    MODSCOPE, Claim, ExperimentOptions, fit_masks, fmt, format_table, log, mask_config, mean_std, run_experiment,
    train_base
)

DESCRIPTION = "SCAN LSTM encoder-decoder: masks trained without compositions lose them (paper 8.3)"

#: the paper's settings (docs/method.md section 8.3).
SETTINGS: dict[str, Any] = {
    "hidden": 200,
    "layers": 2,
    "dropout": 0.5,
    "base_steps": 25_000,
    "mask_steps": 25_000,
    "batch_size": 256,
    "mask_batch_size": 256,
    "base_lr": 1e-3,
    "mask_lr": 1e-2,
    "beta": 3e-5,
    "grad_clip": 5.0,
    "max_test": None,
    "scratch": True,
    "masks": ("control", "length", "jump", "turn_left"),
}
#: quick: a 64-unit LSTM with light dropout learns the simple split to ~90% in 1,000 steps on a CPU. Only the control
#: and jump masks are trained, on 64 examples per step (β is still divided by the base batch size, as in the paper),
#: with lr 0.1 for 2,500 steps: at the paper's 1e-2 the masks barely move in that time (density 99.6% after 800 steps).
#: One net is trained from scratch on the jump split with the base settings, the reference the paper compares with.
QUICK: dict[str, Any] = {"hidden": 64, "dropout": 0.1, "base_steps": 1000, "base_lr": 3e-3, "mask_steps": 2500,
                         "mask_batch_size": 64, "mask_lr": 0.1, "max_test": 600, "scratch": True, "masks": ("control", "jump")}
#: the paper's 200-unit, 2-layer LSTM with the steps that fit in about 1.5 hours on 2 CPU cores: the quick preset's
#: learning rates, dropout and masks (the two of the claim that did not hold at --quick), 600 test examples per split.
MEDIUM: dict[str, Any] = {"dropout": 0.1, "base_steps": 1500, "base_lr": 3e-3, "mask_steps": 1000, "mask_batch_size": 64,
                          "mask_lr": 0.1, "max_test": 600, "scratch": True, "masks": ("control", "jump")}

#: mask name -> the split whose training set it is trained on.
MASKS = {"control": "simple", "length": "length", "jump": "addprim_jump", "turn_left": "addprim_turn_left"}
OUTPUT_WEIGHT = "output.weight"


def splits(seed: int = 0) -> dict[str, tuple[list[scan_data.Example], list[scan_data.Example]]]:
    """``{split: (train, test)}`` for the four splits."""
    full = scan_data.generate()
    return {name: scan_data.split(full, name, seed=seed) for name in scan_data.SPLITS}


def _subsample(examples: list[scan_data.Example], limit: int | None, seed: int) -> list[scan_data.Example]:
    if limit is None or len(examples) <= limit:
        return examples
    keep = np.sort(np.random.RandomState(seed).choice(len(examples), limit, replace=False))
    return [examples[i] for i in keep]


def make_tasks(data: dict[str, tuple[list, list]], max_test: int | None, seed: int = 0,
               masks: tuple[str, ...] = tuple(MASKS)) -> tuple[dict[str, Task], dict[str, Task]]:
    """Training tasks per mask (teacher forcing on half of the draws) and greedy test tasks per split."""
    unknown = [m for m in masks if m not in MASKS]
    if unknown or "control" not in masks:
        raise InvalidParameterError(f"SCAN masks must include 'control' and come from {list(MASKS)}; got {list(masks)}")
    train = {mask: scan_model.make_task(mask, scan_data.encode(data[MASKS[mask]][0])) for mask in masks}
    test = {split: scan_model.make_task(split, scan_data.encode(_subsample(data[split][1], max_test, seed)), teacher_forcing=False)
            for split in scan_data.SPLITS}
    return train, test


def train_net(task: Task, settings: dict[str, Any], seed: int, options: ExperimentOptions, what: str) -> Model:
    torch.manual_seed(seed)
    net = scan_model.build(settings["hidden"], settings["layers"], settings["dropout"])
    return train_base(net, task, settings, seed, options, tag="scan", what=what, grad_clip=settings["grad_clip"])


def removed_per_token(masks: MaskSet, mask: str = "jump", reference: str = "control") -> dict[str, float]:
    """% of the reference mask's weights in each output-layer row that ``mask`` does not keep (paper Fig. 4b)."""
    ref = masks[reference][OUTPUT_WEIGHT]
    removed = ref & ~masks[mask][OUTPUT_WEIGHT]
    share = removed.sum(1).double() / ref.sum(1).clamp(min=1).double() * 100
    return dict(zip(scan_data.Vocab().token_names(), share.tolist()))


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: base net on the simple split, a mask per split, accuracies before/after, per-token removal."""
    device = resolve_device(options.device)
    data = splits()
    train, test = make_tasks(data, settings["max_test"], seed, tuple(settings["masks"]))
    model = train_net(train["control"], settings, seed, options, "the LSTM on the simple split")
    config = mask_config(settings, seed, options, batch_size=settings["mask_batch_size"],
                         penalty_batch_size=settings["batch_size"], grad_clip=settings["grad_clip"])
    masks = fit_masks(model, list(train.values()), config, options, tag="scan", seed=seed,
                      what=f"masks on {', '.join(MASKS[m] for m in train)}")
    log(f"[scan seed {seed}] evaluating")
    accuracy = {"full": {s: evaluate(model, test[s], device=device) for s in scan_data.SPLITS}}
    for mask in train:
        accuracy[mask] = {s: evaluate(model, test[s], masks[mask], device=device) for s in scan_data.SPLITS}
    scratch = {}
    if settings["scratch"]:
        for mask in train:
            if mask != "control":
                net = train_net(train[mask], settings, seed, options, f"a net from scratch on {MASKS[mask]}")
                scratch[MASKS[mask]] = evaluate(net, test[MASKS[mask]], device=device)
    return {"seed": seed, "masks": list(train), "accuracy": accuracy, "scratch": scratch, "density": masks.density(),
            "removed_per_token": removed_per_token(masks) if "jump" in masks else None,
            "vectorize": masks.extra.get("vectorize")}


def _trained(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(mask, split) of the masks the runs trained, control first."""
    return [(mask, MASKS[mask]) for mask in runs[0]["masks"]]


def _split_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for mask, split in _trained(runs):
        row = [split, fmt([r["accuracy"]["full"][split] for r in runs]), fmt([r["accuracy"]["control"][split] for r in runs]),
               fmt([r["accuracy"][mask][split] for r in runs])]
        row.append(fmt([r["scratch"][split] for r in runs]) if runs[0]["scratch"] and split in runs[0]["scratch"] else "-")
        rows.append(row)
    return format_table(["test set", "full net", "before (control mask)", "after (split's mask)", "from scratch"], rows)


def _matrix_table(runs: list[dict[str, Any]]) -> str:
    rows = [[mask] + [fmt([r["accuracy"][mask][s] for r in runs]) for s in scan_data.SPLITS]
            + [fmt([r["density"][mask] for r in runs]) if mask != "full" else "100.0%"] for mask in ("full", *runs[0]["masks"])]
    return format_table(["mask \\ test set", *scan_data.SPLITS, "weights kept"], rows)


def _token_table(runs: list[dict[str, Any]]) -> str:
    tokens = list(runs[0]["removed_per_token"])
    return format_table(["output token", "% of control weights removed by the jump mask"],
                        [[t, fmt([r["removed_per_token"][t] for r in runs], percent=False) + "%"] for t in tokens])


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """The paper's findings on the means over seeds."""
    def m(mask: str, split: str) -> float:
        return mean_std([r["accuracy"][mask][split] for r in runs])[0]

    out = [Claim("control mask on simple test (of full)", f"{m('control', 'simple') / max(m('full', 'simple'), 1e-9) * 100:.1f}%",
                 "≈ full", m("control", "simple") >= 0.9 * m("full", "simple"), MODSCOPE + "≥ 90% of the full net")]
    for mask, split in _trained(runs):
        if split == "simple":
            continue
        before, after = m("control", split), m(mask, split)
        paper = "drops to about from-scratch accuracy"
        holds = None  # a drop alone does not say "to about from-scratch": no verdict without a from-scratch net
        criterion = "no verdict without a from-scratch net"
        if runs[0]["scratch"]:
            scratch = mean_std([r["scratch"][split] for r in runs])[0]
            paper += f" (from scratch here: {scratch * 100:.1f}%)"
            holds = after - scratch <= 0.2 * (before - scratch)  # "about": at least 4/5 of the way down
            criterion = MODSCOPE + "≤ 1/5 of the gap to from-scratch left"
        if split == "addprim_turn_left":
            paper = "about from-scratch accuracy, which is high for turn left"
            holds, criterion = None, "reported, not judged"
        out.append(Claim(f"{split}: before → after", f"{before * 100:.1f}% → {after * 100:.1f}%", paper, holds, criterion))
    if runs[0]["removed_per_token"] is None:
        return out
    tok = {t: mean_std([r["removed_per_token"][t] for r in runs])[0] for t in runs[0]["removed_per_token"]}
    others = max(v for t, v in tok.items() if t != "I_JUMP")
    out.append(Claim("jump mask: I_JUMP row removed vs largest other row", f"{tok['I_JUMP']:.1f}% vs {others:.1f}%",
                     "I_JUMP loses a large share, others almost none", tok["I_JUMP"] > 2 * others,
                     MODSCOPE + "I_JUMP > 2 × the largest other row"))
    return out


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report."""
    return run_experiment("scan", options, paper=SETTINGS, quick=QUICK, medium=MEDIUM, run_seed=run_seed, claims=claims,
                          tables=_tables)


def _tables(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    tables = [("Test accuracy per split, before and after (paper Fig. 4a)", _split_table(runs)),
              ("Every mask on every test set", _matrix_table(runs))]
    if runs[0]["removed_per_token"] is not None:
        tables.append(("Decoder output layer: weights removed by the jump mask (paper Fig. 4b)", _token_table(runs)))
    return tables
