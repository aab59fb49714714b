"""Class removal (docs/method.md section 8.5): are there weights that only one class needs?

The paper's 4-layer CNN is trained on all classes of scikit-learn's 8x8 digits (or of CIFAR-10 with ``--data``). A
control mask is trained on all classes; then one mask per class c on the training data without class c. As in the
paper (``keep_last_layer``), those masks start their output layer from the control mask's logits and keep it frozen,
so they can only drop feature weights, not simply cut class c's output unit. Applying the mask "without c" (keeping
only its weights) and comparing the confusion matrix with the control mask's shows what class c loses: its
relative accuracy drop, the drops of the other classes, and where its lost samples go.

Settings (paper): Adam 1e-3, batch 128, 20,000 base steps; masks β 3e-4, lr 1e-3, 20,000 steps, biases masked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..evaluation import evaluate
from ..masks.config import MaskConfig
from ..masks.maskset import MaskSet
from ..devices import resolve_device
from ..masks.trainer import train_masks
from ..model import Model
from ..tasks import Task
from . import common
from .common import (
    MODSCOPE, Claim, ExperimentOptions, fit_masks, fmt, format_table, log, mean_std, run_experiment, train_base
)
from .image_data import ImageData, SimpleCNN, load_images

DESCRIPTION = "a CNN on digits (or CIFAR-10): does removing one class's weights hurt only that class? (paper 8.5)"

#: the paper's settings (docs/method.md section 8.5).
SETTINGS: dict[str, Any] = {
    "base_steps": 20_000,
    "mask_steps": 20_000,
    "batch_size": 128,
    "mask_batch_size": 128,
    "base_lr": 1e-3,
    "mask_lr": 1e-3,
    "beta": 3e-4,
    "dropout": True,
    "classes": None,
    "tasks_per_call": 5,
}
#: quick: the masks see 32 examples per step (β is still divided by the base batch size, as in the paper) and use the
#: paper's default mask lr 1e-2 instead of CIFAR's 1e-3, which needs ~10x more steps to move a logit from 2 to 0.
QUICK: dict[str, Any] = {"base_steps": 600, "mask_steps": 1000, "mask_batch_size": 32, "mask_lr": 1e-2}

OUTPUT_LAYER = ("out_layer.*",)
# tasks_per_call: the per-class masks train independently, in groups of this size. On a CPU, one call for all 10
# classes holds (10 tasks x 4 samples x 295k) ~ 47 MB temporaries per conv layer, which glibc maps and unmaps at every
# step (more system than user time); groups of 5 stay below its 32 MB mmap threshold and run ~1.7x faster.


def base_network(data: ImageData, settings: dict[str, Any], seed: int, options: ExperimentOptions, tag: str) -> Model:
    """The CNN trained on all training images (settings: base_steps, batch_size, base_lr, dropout)."""
    torch.manual_seed(seed)
    net = SimpleCNN(data.x_train.shape[1], len(data.classes), dropout=settings["dropout"])
    return train_base(net, Task("all", data.x_train, data.y_train), settings, seed, options, tag=tag, what="the CNN")


def mask_config(settings: dict[str, Any], seed: int, options: ExperimentOptions, **changes: Any) -> MaskConfig:
    """The paper's CNN mask settings: biases masked, β and lr from ``settings``."""
    return common.mask_config(settings, seed, options, batch_size=settings["mask_batch_size"],
                              penalty_batch_size=settings["batch_size"], mask_biases=True, **changes)


def without_class(data: ImageData, c: int) -> Task:
    keep = data.y_train != c
    return Task(f"without_{c}", data.x_train[keep], data.y_train[keep])


def class_masks(model: Model, data: ImageData, classes: list[int], settings: dict[str, Any], seed: int, options: ExperimentOptions) -> MaskSet:
    """The control mask and, with the output layer frozen at the control's logits, one mask per left-out class."""
    control = fit_masks(model, [Task("control", data.x_train, data.y_train)], mask_config(settings, seed, options), options,
                        tag="class-removal", seed=seed, what="the control mask")
    frozen = {n: v for n, v in control.logits["control"].items() if n.startswith("out_layer.")}
    logits = {"control": control.logits["control"]}
    config = mask_config(settings, seed + 1, options, freeze=OUTPUT_LAYER)
    group = settings["tasks_per_call"]
    for start in range(0, len(classes), group):
        chunk = classes[start : start + group]
        log(f"[class-removal seed {seed}] training masks without class {', '.join(map(str, chunk))} ({start + len(chunk)}/{len(classes)})")
        part = train_masks(model, [without_class(data, c) for c in chunk], replace(config, seed=config.seed + start),
                           progress=options.progress, initial_logits=frozen)
        logits.update(part.logits)
    return MaskSet(logits, control.weights, config=config, model_checksum=model.checksum)


def removal_effects(confusion: metrics.ConfusionResult, c: int) -> dict[str, Any]:
    """Class c's relative drop, the other classes' drops, the largest other/target ratio and where c's samples went."""
    rel = np.diag(confusion.diff) / np.maximum(np.diag(confusion.reference), 1e-12)  # relative change per class
    others = [j for j in range(len(rel)) if j != c]
    target = float(-rel[c] * 100)
    largest_other = float(min(min(rel[others]), 0.0) / rel[c] * 100) if rel[c] < 0 else float("nan")
    gained = confusion.diff[c].copy()
    gained[c] = -np.inf
    return {
        "target_drop": target,
        "other_drops": {int(j): float(-rel[j] * 100) for j in others},
        "mean_other_drop": float(np.mean(-rel[others] * 100)),
        "largest_other_over_target": largest_other,
        "lost_to": int(np.argmax(gained)),
        "lost_to_share": float(confusion.diff[c, int(np.argmax(gained))]),
    }


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: train the CNN, the control and per-class masks, and measure the confusion differences."""
    device = resolve_device(options.device)
    name, data = load_images(options.data)
    classes = list(settings["classes"] if settings["classes"] is not None else range(len(data.classes)))
    model = base_network(data, settings, seed, options, "class-removal")
    masks = class_masks(model, data, classes, settings, seed, options)
    valid = Task("valid", data.x_valid, data.y_valid)
    per_class = {}
    for c in classes:
        confusion = metrics.confusion_diff(model, valid, masks[f"without_{c}"], reference=masks["control"], invert=False, device=device)
        per_class[c] = {**removal_effects(confusion, c), "diff": confusion.diff}
    return {
        "seed": seed,
        "dataset": name,
        "class_names": list(data.classes),
        "accuracy": {"full": evaluate(model, valid, device=device), "control": evaluate(model, valid, masks["control"], device=device)},
        "density": masks.density(),
        "per_class": per_class,
    }


def _pct(values: list[float]) -> str:
    """Mean (± std) of the finite values in %, or "-" when none is defined."""
    finite = [v for v in values if np.isfinite(v)]
    return fmt(finite, percent=False) + "%" if finite else "-"


def _class_table(runs: list[dict[str, Any]]) -> str:
    names = runs[0]["class_names"]
    rows = []
    for c in runs[0]["per_class"]:
        got = [r["per_class"][c] for r in runs]
        lost = [g for g in got if g["lost_to_share"] > 0]
        lost_to = [g["lost_to"] for g in lost]
        top = max(set(lost_to), key=lost_to.count) if lost_to else None
        where = f"{names[top]} ({fmt([g['lost_to_share'] for g in lost])} of class)" if top is not None else "-"
        rows.append([names[c], _pct([g["target_drop"] for g in got]), _pct([g["mean_other_drop"] for g in got]),
                     _pct([g["largest_other_over_target"] for g in got]), where])
    return format_table(["removed class", "its drop", "mean drop of others", "largest other / target", "lost samples go to"], rows)


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values (the ratio is undefined for a class that did not drop); NaN if there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """The paper's findings on the means over classes and seeds."""
    target = [np.mean([g["target_drop"] for g in r["per_class"].values()]) for r in runs]
    other = [np.mean([g["mean_other_drop"] for g in r["per_class"].values()]) for r in runs]
    ratio = [_finite_mean([g["largest_other_over_target"] for g in r["per_class"].values()]) for r in runs]
    control = [r["accuracy"]["control"] / max(r["accuracy"]["full"], 1e-9) for r in runs]
    return [
        Claim("control mask keeps accuracy (of full)", fmt(control), "≈ full", mean_std(control)[0] >= 0.9,
              MODSCOPE + "≥ 90%"),
        Claim("drop of the removed class (mean over classes)", fmt(target, percent=False) + "%", "large", None, "reported, not judged"),
        Claim("drop of the other classes (mean)", fmt(other, percent=False) + "%", "small",
              mean_std(other)[0] < 0.2 * mean_std(target)[0], MODSCOPE + "< 1/5 of the removed class's drop"),
        Claim("largest other-class drop / target drop (mean)", fmt(ratio, percent=False) + "%",
              "small (plotted on a 0-10% axis)", mean_std(ratio)[0] <= 10.0,
              MODSCOPE + "≤ 10%, the paper's plot range"),
    ]


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report."""
    return run_experiment("class-removal", options, paper=SETTINGS, quick=QUICK, run_seed=run_seed, claims=claims,
                          tables=_tables)


def _tables(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    acc = format_table(["weights", "validation accuracy"],
                       [["full net", fmt([r["accuracy"]["full"] for r in runs])], ["control mask", fmt([r["accuracy"]["control"] for r in runs])]])
    return [(f"CNN on {runs[0]['dataset']}", acc), ("Per removed class (mask trained without it, vs control)", _class_table(runs))]
