"""Policies: bounds on a run's measurements that `modscope check` turns into a CI verdict.

A policy is a TOML file with one ``[[rule]]`` table per bound::

    [[rule]]                       # the add and mul masks overlap little
    metric = "iou"
    tasks = ["add", "mul"]
    max = 0.5

    [[rule]]                       # removing add's weights spares mul ...
    metric = "drop"
    removed = "add"
    task = "mul"
    max = 0.1

    [[rule]]                       # ... but breaks add itself
    metric = "drop"
    removed = "add"
    task = "add"
    min = 0.5

Metrics (each rule needs ``min``, ``max`` or both; ``name`` labels it in tables and JUnit; ``layer`` restricts
``iou``, ``iomin``, ``sharing`` and ``density`` to one layer):

============  ===================  ====================================================================================
metric        keys                 value
============  ===================  ====================================================================================
iou, iomin    tasks = [A, B]       overlap of the two masks (whole model, or ``layer``)
sharing       task                 fraction of the task's mask that other masks also use
density       task                 fraction of the masked weights the task's mask keeps
drop          task, removed        relative drop of ``task``'s metric when ``removed``'s mask is removed
                                   (`modscope.metrics.drop.relative_drop`): (full − ablated) / |full| (for error
                                   metrics such as mse: (ablated − full) / |full|)
performance   task, mask           ``task``'s metric with only ``mask``'s weights kept (``mask`` defaults to ``task``)
accuracy      task, mask           the same, for tasks whose metric is accuracy
converged     task (optional)      1 when the task's mask (every mask without ``task``) had stopped shrinking at the end
                                   of training, else 0 (``modscope.masks.convergence``); gate with ``min = 1``
============  ===================  ====================================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PolicyError
from .fileio import file_error
from .report.values import ablation_value, drop, pair_value

if TYPE_CHECKING:  # pragma: no cover
    from .report import Report

#: metric -> the keys a rule for it needs (beyond metric/min/max/name), and those it may have.
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "iou": (("tasks",), ("layer",)),
    "iomin": (("tasks",), ("layer",)),
    "sharing": (("task",), ("layer",)),
    "density": (("task",), ("layer",)),
    "drop": (("task", "removed"), ()),
    "performance": (("task",), ("mask",)),
    "accuracy": (("task",), ("mask",)),
    "converged": ((), ("task",)),
}
_COMMON = ("metric", "min", "max", "name")


@dataclass(frozen=True)
class Rule:
    """One bound of a policy.

    Attributes:
        metric: one of iou, iomin, sharing, density, drop, performance, accuracy.
        subject: the tasks/masks the rule is about, by key ("task", "removed", "mask", "tasks").
        min, max: the bounds (inclusive); at least one is set.
        layer: restrict an overlap, sharing or density rule to one layer.
        name: a label; derived from the metric and subject when not given.
    """

    metric: str
    subject: Mapping[str, Any]
    min: float | None = None
    max: float | None = None
    layer: str | None = None
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        s = self.subject
        what = {
            "drop": lambda: f"drop of {s['task']} without {s['removed']}",
            "performance": lambda: f"{s['task']} with only {s.get('mask') or s['task']}",
            "accuracy": lambda: f"accuracy of {s['task']} with only {s.get('mask') or s['task']}",
            "converged": lambda: f"masks converged{' for ' + s['task'] if 'task' in s else ''}",
        }.get(self.metric, lambda: f"{self.metric} {'/'.join(s['tasks']) if 'tasks' in s else s['task']}")()
        return what + (f" in {self.layer}" if self.layer else "")

    @property
    def bound(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + ([f"<= {self.max:g}"] if self.max is not None else [])
        return ", ".join(parts)


@dataclass(frozen=True)
class Verdict:
    """A rule and what the run measured for it."""

    rule: Rule
    value: float | None
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        r = self.rule
        return {"name": r.label, "metric": r.metric, **dict(r.subject), "layer": r.layer, "min": r.min, "max": r.max,
                "value": self.value, "ok": self.ok}


@dataclass(frozen=True)
class CheckResult:
    """The verdicts of every rule of a policy on one run."""

    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(v.ok for v in self.verdicts)

    @property
    def n_failed(self) -> int:
        return sum(not v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "n_rules": len(self.verdicts), "n_failed": self.n_failed,
                "rules": [v.to_dict() for v in self.verdicts]}


# -- reading ------------------------------------------------------------------------------------------------------
def load_policy(path: str | os.PathLike) -> list[Rule]:
    """Read the rules of a policy file.

    Raises:
        MissingFileError, UnreadableFileError: the file is missing or the system will not read it.
        PolicyError: the file is not TOML, or a rule is malformed (the message names the rule).

    Example:
        >>> from pathlib import Path
        >>> _ = Path("/tmp/doc_policy.toml").write_text('[[rule]]\\nmetric = "iou"\\ntasks = ["a", "b"]\\nmax = 0.5\\n')
        >>> [r.label for r in load_policy("/tmp/doc_policy.toml")]
        ['iou a/b']
    """
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise file_error(exc, p, "policy file") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy file {p} is not text ({exc}); see `modscope check --help` for the format") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {p} is not valid TOML ({exc}); see `modscope check --help` for the format") from exc
    except RecursionError:
        raise PolicyError(f"policy file {p} is nested too deeply to be a policy; see `modscope check --help` for the format") from None
    return parse_policy(data, str(p))


def parse_policy(data: Mapping[str, Any], source: str = "policy") -> list[Rule]:
    """Rules from parsed TOML data ``{"rule": [{...}, ...]}``.

    Raises:
        PolicyError: no rules, an unknown metric or key, a missing key, a bound that is not a number.
    """
    unknown = sorted(set(data) - {"rule", "version"})
    if unknown:
        raise PolicyError(f"{source}: unknown top-level keys {unknown}; a policy is a list of [[rule]] tables")
    rules = data.get("rule")
    if not isinstance(rules, list) or not rules:
        raise PolicyError(f"{source} has no rules; add [[rule]] tables, e.g. metric = \"iou\", tasks = [\"a\", \"b\"], max = 0.5")
    return [_parse_rule(r, f"{source}: rule {i}") for i, r in enumerate(rules, 1)]


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} is not a table")
    metric = raw.get("metric")
    if not isinstance(metric, str) or metric not in _KEYS:
        raise PolicyError(f"{where}: metric {metric!r} is not one of {', '.join(_KEYS)}")
    required, optional = _KEYS[metric]
    unknown = sorted(set(raw) - set(_COMMON) - set(required) - set(optional))
    if unknown:
        raise PolicyError(f"{where} ({metric}): unknown keys {unknown}; it takes {', '.join((*_COMMON, *required, *optional))}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise PolicyError(f"{where} ({metric}) needs {', '.join(missing)}")
    bounds = {k: raw.get(k) for k in ("min", "max")}
    if all(v is None for v in bounds.values()):
        raise PolicyError(f"{where} ({metric}) has no bound; give min, max or both")
    for k, v in bounds.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise PolicyError(f"{where}: {k} must be a number, got {v!r}")
    if "tasks" in raw and (not isinstance(raw["tasks"], list) or len(raw["tasks"]) != 2
                           or not all(isinstance(t, str) for t in raw["tasks"])):
        raise PolicyError(f"{where} ({metric}): tasks must name two tasks, e.g. tasks = [\"add\", \"mul\"]")
    for k in ("task", "removed", "mask", "layer", "name"):
        if k in raw and not isinstance(raw[k], str):
            raise PolicyError(f"{where}: {k} must be a string, got {raw[k]!r}")
    subject = {k: (tuple(raw[k]) if k == "tasks" else raw[k]) for k in ("tasks", "task", "removed", "mask") if k in raw}
    return Rule(metric, subject, bounds["min"], bounds["max"], raw.get("layer"), raw.get("name", ""))


# -- checking -----------------------------------------------------------------------------------------------------
def measure(rule: Rule, report: Mapping[str, Any]) -> float | None:
    """The value ``rule`` bounds, read from report data (`Report.to_dict`).

    Raises:
        PolicyError: the rule names a task, mask or layer the report does not have.
    """
    tasks = list(report["tasks"])
    s = rule.subject
    for key in ("task", "removed", "mask"):
        if key in s and s[key] not in tasks:
            raise PolicyError(f"rule '{rule.label}': {key} {s[key]!r} is not a task of this run (tasks: {', '.join(tasks)})")
    for t in s.get("tasks", ()):
        if t not in tasks:
            raise PolicyError(f"rule '{rule.label}': task {t!r} is not a task of this run (tasks: {', '.join(tasks)})")
    if rule.layer is not None and rule.layer not in report["layers"]:
        raise PolicyError(f"rule '{rule.label}': layer {rule.layer!r} is not a masked layer of this run "
                          f"(layers: {', '.join(list(report['layers'])[:6])}...)")
    if rule.metric in ("iou", "iomin"):
        return pair_value(report, rule.metric, *s["tasks"], rule.layer)
    if rule.metric == "sharing":
        sh = report["sharing"]
        return (sh["total"] if rule.layer is None else sh["per_layer"][rule.layer])[s["task"]]
    if rule.metric == "density":
        return report["density"][s["task"]] if rule.layer is None else report["density_per_layer"][s["task"]].get(rule.layer)
    if rule.metric == "converged":
        return _converged(report, s.get("task"))
    info = report["task_info"][s["task"]]
    if rule.metric == "drop":
        return drop(report, s["task"], s["removed"])
    if rule.metric == "accuracy" and info["metric"] != "accuracy":
        raise PolicyError(f"rule '{rule.label}': task {s['task']!r} is measured by {info['metric']}, not accuracy; "
                          "use metric = \"performance\"")
    return ablation_value(report, "kept", s.get("mask") or s["task"], s["task"])


def _converged(report: Mapping[str, Any], task: str | None) -> float:
    """1.0 when ``task`` (every task when None) had converged by the report's convergence check, else 0.0."""
    from .masks.convergence import check_convergence

    conv = report.get("convergence") or check_convergence(report.get("curves") or {}).to_dict()
    flagged = set(conv["not_converged"])
    return float(not (flagged if task is None else flagged & {task}))


def check(report: Report | Mapping[str, Any], rules: Sequence[Rule]) -> CheckResult:
    """Evaluate every rule on a report (a `Report` or its data); a missing or non-finite value violates its rule.

    Example:
        >>> report = {"tasks": ["a", "b"], "layers": {"w": 4}, "iou": {"tasks": ["a", "b"], "total": [[1, .2], [.2, 1]]}}
        >>> check(report, parse_policy({"rule": [{"metric": "iou", "tasks": ["a", "b"], "max": 0.5}]})).passed
        True
    """
    if not isinstance(report, Mapping):
        report = report.to_dict()
    verdicts = []
    for rule in rules:
        value = measure(rule, report)
        ok = value is not None and math.isfinite(value) and (rule.min is None or value >= rule.min) and (
            rule.max is None or value <= rule.max)
        verdicts.append(Verdict(rule, None if value is None else float(value), ok))
    return CheckResult(tuple(verdicts))


def junit_xml(result: CheckResult, *, suite: str = "modscope check", classname: str = "modscope.policy") -> str:
    """The verdicts as JUnit XML: one ``<testcase>`` per rule, a ``<failure>`` for each violated rule."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name=suite, tests=str(len(result.verdicts)), failures=str(result.n_failed))
    suite_el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(result.verdicts)), failures=str(result.n_failed),
                             errors="0", skipped="0")
    for v in result.verdicts:
        case = ET.SubElement(suite_el, "testcase", classname=classname, name=v.rule.label)
        measured = "missing" if v.value is None else f"{v.value:.6g}"
        if not v.ok:
            failure = ET.SubElement(case, "failure", message=f"measured {measured}, bound {v.rule.bound}", type="PolicyViolation")
            failure.text = f"rule '{v.rule.label}' ({v.rule.metric}): measured {measured}, expected {v.rule.bound}"
        else:
            ET.SubElement(case, "system-out").text = f"measured {measured}, bound {v.rule.bound}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
