"""The tables of a report, built once from its data and rendered as Markdown, HTML and CSV.

Each `Table` keeps raw values (floats, ints, strings); renderers format them with `cell`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from .values import ablation_value, drop, full_value

#: the report's sections in order: (key, title, what it shows).
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("summary", "Summary", "Each task's metric with the full model and with only its own mask, and its mask's density."),
    ("sharing", "Sharing per layer",
     ("The fraction of each task's mask that other tasks' masks also use (the paper's 'shared'), beside the fraction "
      "expected by chance for random masks of the same densities.")),
    ("overlap", "Overlap: IoU and IoMin",
     "Intersection over union and over the smaller mask, for each pair of tasks, with the chance level."),
    ("ablation", "Ablation",
     ("Each task's metric with one mask's weights removed (rows: mask removed; columns: task evaluated), and the "
      "relative drop from the full model.")),
    ("clustering", "Clustering", "Tasks grouped into modules by hierarchical clustering on 1 - IoU (and spectral clustering)."),
    ("density", "Density per layer", "The fraction of each layer's masked weights that each task's mask keeps."),
    ("curves", "Training curves", "Mask training loss and density per task."),
)


@dataclass(frozen=True)
class Table:
    """One table of a report.

    Attributes:
        key: a file-name-safe identifier (CSV file stem, HTML anchor).
        section: the key of the section it belongs to.
        title: a heading.
        headers: column names.
        rows: raw cell values.
        note: a sentence shown under the table (e.g. why a column is empty).
    """

    key: str
    section: str
    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""


def build_tables(data: dict[str, Any]) -> list[Table]:
    """Every table of a report, in section order."""
    tables = [summary(data), sharing(data), *overlap(data), *ablation(data)]
    if data.get("clustering"):
        tables.append(clustering(data))
    tables.append(density(data))
    if any(c.get("step") for c in data["curves"].values()):
        tables.append(curves(data))
    return tables


def summary(data: dict[str, Any]) -> Table:
    info, shared = data["task_info"], data["sharing"]
    rows = [[t, info[t]["metric"], full_value(data, t), ablation_value(data, "kept", t, t),
             ablation_value(data, "removed", t, t), data["density"][t], shared["total"].get(t), shared["chance_total"].get(t)]
            for t in data["tasks"]]
    return Table("summary", "summary", "Tasks",
                 ["task", "metric", "full model", "own mask only", "own mask removed", "density", "shared", "shared (chance)"], rows)


def layer_module(data: dict[str, Any], layer: str) -> str:
    """What a layer is ("Linear 32×9"), or "" for reports written before it was recorded."""
    return (data.get("layer_modules") or {}).get(layer, "")


def sharing(data: dict[str, Any]) -> Table:
    sh, tasks = data["sharing"], data["tasks"]
    headers = ["layer", "module"] + [h for t in tasks for h in (t, f"{t} (chance)")]
    rows = [[layer, layer_module(data, layer)] + [v for t in tasks for v in (sh["per_layer"][layer][t], sh["chance_per_layer"][layer][t])]
            for layer in sh["per_layer"]]
    rows.append(["(whole model)", ""] + [v for t in tasks for v in (sh["total"][t], sh["chance_total"][t])])
    return Table("sharing", "sharing", "Shared fraction per layer", headers, rows)


def _pairs(data: dict[str, Any]) -> list[tuple[int, int]]:
    return list(combinations(range(len(data["iou"]["tasks"])), 2))


def overlap(data: dict[str, Any]) -> list[Table]:
    iou, iomin = data["iou"], data["iomin"]
    names = iou["tasks"]
    headers = ["task a", "task b", "IoU", "IoU (chance)", "IoMin", "IoMin (chance)"]
    whole = [[names[i], names[j], iou["total"][i][j], iou["chance_total"][i][j], iomin["total"][i][j], iomin["chance_total"][i][j]]
             for i, j in _pairs(data)]
    per_layer = [[layer, names[i], names[j], iou["per_layer"][layer][i][j], iou["chance_per_layer"][layer][i][j],
                  iomin["per_layer"][layer][i][j], iomin["chance_per_layer"][layer][i][j]]
                 for layer in iou["per_layer"] for i, j in _pairs(data)]
    return [Table("overlap", "overlap", "Whole model", headers, whole),
            Table("overlap_per_layer", "overlap", "Per layer", ["layer", *headers], per_layer)]


def ablation(data: dict[str, Any]) -> list[Table]:
    ab = data["ablation"]
    tasks = ab["tasks"]
    raw = [["(none: full model)", *ab["full"]]] + [[f"{m} removed", *row] for m, row in zip(ab["masks"], ab["removed"])]
    drops = [[f"{m} removed", *(drop(data, t, m) for t in tasks)] for m in ab["masks"]]
    return [Table("ablation", "ablation", "Metric with a mask removed", ["mask removed", *tasks], raw),
            Table("ablation_drop", "ablation", "Relative drop from the full model", ["mask removed", *tasks], drops)]


def clustering(data: dict[str, Any]) -> Table:
    cl = data["clustering"]
    spectral = cl.get("spectral") or {}
    rows = [[t, cl["hierarchical"][t], spectral.get(t)] for t in cl["tasks"]]
    note = ""
    if not spectral:
        note = cl.get("spectral_skipped") or (
            f"spectral clustering skipped: it needs more tasks than modules, and there are {len(cl['tasks'])} tasks for "
            f"{max(cl['hierarchical'].values(), default=0)} modules")
        note = note[0].upper() + note[1:] + "."
    return Table("clustering", "clustering", "Module assignments", ["task", "hierarchical module", "spectral module"],
                 rows, note)


def density(data: dict[str, Any]) -> Table:
    tasks = data["tasks"]
    rows = [[layer, layer_module(data, layer), n, *(data["density_per_layer"][t].get(layer) for t in tasks)]
            for layer, n in data["layers"].items()]
    rows.append(["(whole model)", "", sum(data["layers"].values()), *(data["density"][t] for t in tasks)])
    return Table("density", "density", "Density per layer", ["layer", "module", "masked weights", *tasks], rows)


def curves(data: dict[str, Any]) -> Table:
    rows = [[t, step, loss, dens] for t, c in data["curves"].items()
            for step, loss, dens in zip(c.get("step", []), c.get("loss", []), c.get("density", []))]
    return Table("curves", "curves", "Training curves", ["task", "step", "loss", "density"], rows)
