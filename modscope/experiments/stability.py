"""Mask stability (docs/method.md section 8.6): do two masks trained on the same task with different seeds agree?

The paper's CNN without dropout is trained on all classes of the digits (or CIFAR-10 with ``--data``). For random
ordered pairs of distinct classes, two masks are trained on that 2-class subset with different seeds (different data
order and mask noise, same initialisation 2.0), and their pooled IoU over all masked weights is compared with the IoU
expected by chance for masks of the same per-layer densities (`modscope.metrics.stability`).

The authors' code froze the output layer at the first mask's logits (``keep_last_layer``, which makes output-layer
masks identical within a pair); here every mask is trained in full, so the IoU is not
inflated by copied layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import metrics
from ..masks.trainer import train_masks
from ..tasks import Task
from .class_removal import SETTINGS as CNN_SETTINGS
from .class_removal import base_network, mask_config
from .common import MODSCOPE, Claim, ExperimentOptions, fmt, format_table, log, mean_std, run_experiment
from .image_data import ImageData, load_images

DESCRIPTION = "IoU of masks trained on the same task with different seeds, for the CNN (paper 8.6)"

SETTINGS: dict[str, Any] = {**{k: v for k, v in CNN_SETTINGS.items() if k not in ("classes", "tasks_per_call")},
                            "dropout": False, "n_pairs": 10}
#: quick: as class-removal's quick preset, with 4 class pairs.
QUICK: dict[str, Any] = {"base_steps": 600, "mask_steps": 1000, "mask_batch_size": 32, "mask_lr": 1e-2, "n_pairs": 4}


def class_pairs(n_classes: int, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """``n_pairs`` distinct random ordered pairs of distinct classes."""
    rng = np.random.RandomState(seed)
    all_pairs = [(a, b) for a in range(n_classes) for b in range(n_classes) if a != b]
    return [all_pairs[i] for i in rng.choice(len(all_pairs), size=min(n_pairs, len(all_pairs)), replace=False)]


def pair_task(data: ImageData, pair: tuple[int, int]) -> Task:
    keep = np.isin(data.y_train, pair)
    return Task(f"classes_{pair[0]}_{pair[1]}", data.x_train[keep], data.y_train[keep])


def run_seed(settings: dict[str, Any], seed: int, options: ExperimentOptions) -> dict[str, Any]:
    """One seed: train the CNN, two masks per class pair with different seeds, and their IoU."""
    name, data = load_images(options.data)
    model = base_network(data, settings, seed, options, "stability")
    pairs = class_pairs(len(data.classes), settings["n_pairs"], seed)
    tasks = [pair_task(data, p) for p in pairs]
    runs = []
    for k in range(2):
        log(f"[stability seed {seed}] mask run {k + 1}/2: {len(tasks)} class pairs, {settings['mask_steps']} steps")
        runs.append(train_masks(model, tasks, mask_config(settings, 1000 * seed + 17 * k + 1, options), progress=options.progress))
    result = metrics.stability(runs)
    return {"seed": seed, "dataset": name, "pairs": [list(p) for p in pairs], "stability": result.to_dict(),
            "density": [r.density() for r in runs]}


def _pair_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        st = r["stability"]
        for task in st["tasks"]:
            dens = [d[task] for d in r["density"]]
            rows.append([r["seed"], task, fmt(st["mean"][task]), fmt(st["chance"][task]), fmt(dens)])
    return format_table(["seed", "task", "IoU (2 seeds)", "chance IoU", "mask density (both runs)"], rows)


def _layer_table(runs: list[dict[str, Any]]) -> str:
    layers = list(runs[0]["stability"]["per_layer"])
    rows = [[layer, fmt([float(np.mean(list(r["stability"]["per_layer"][layer].values()))) for r in runs])] for layer in layers]
    return format_table(["layer", "mean IoU over pairs"], rows)


def summary(run: dict[str, Any]) -> tuple[float, float]:
    """Mean IoU over the class pairs and mean chance IoU."""
    st = run["stability"]
    return float(np.mean(list(st["mean"].values()))), float(np.mean(list(st["chance"].values())))


def claims(runs: list[dict[str, Any]]) -> list[Claim]:
    """Reproducible masks: IoU across seeds well above chance (chance-corrected IoU (IoU − c)/(1 − c) ≥ 0.5)."""
    s = [summary(r) for r in runs]
    iou, chance = [v[0] for v in s], [v[1] for v in s]
    m_iou, m_chance = mean_std(iou)[0], mean_std(chance)[0]
    corrected = (m_iou - m_chance) / max(1 - m_chance, 1e-9)
    return [Claim("IoU of two masks, same task, different seeds (chance)",
                  f"{fmt(iou)} ({fmt(chance)})", "high: masks are reproducible", corrected >= 0.5,
                  MODSCOPE + "chance-corrected IoU ≥ 0.5"),
            Claim("chance-corrected IoU (IoU − chance) / (1 − chance)", f"{corrected:.2f}", "-", None)]


def run(options: ExperimentOptions) -> dict[str, Any]:
    """Run the experiment for ``options.seeds`` seeds, print the tables and write the report."""
    return run_experiment("stability", options, paper=SETTINGS, quick=QUICK, run_seed=run_seed, claims=claims,
                          tables=lambda runs: [(f"Mask IoU across seeds per class pair ({runs[0]['dataset']})", _pair_table(runs)),
                                               ("Per layer", _layer_table(runs))])
