"""`modscope check`: a CI gate; hold a run's measurements against the bounds of a policy file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MissingFileError
from ._common import print_json, text_table

HELP = "CI gate: check a run against a policy of bounds (exit 0 holds, 1 violated, 2 bad input)"
DESCRIPTION = """\
Check a run's measurements against a policy: a TOML file of [[rule]] tables, each bounding one measurement with
min and/or max. Metrics: iou / iomin (tasks = [A, B]), sharing (task), density (task), drop (task, removed: the
relative drop of task's metric when removed's mask is removed), performance / accuracy (task, and optionally mask:
the task's metric with only that mask kept), converged (optional task: 1 when the masks had stopped shrinking
at the end of training, else 0; gate with min = 1). iou, iomin, sharing and density take an optional layer.

  [[rule]]
  metric = "iou"
  tasks = ["add", "mul"]
  max = 0.5

  [[rule]]
  metric = "drop"
  removed = "add"
  task = "mul"
  max = 0.1

  [[rule]]
  metric = "converged"
  min = 1

Prints a table of rule, measured value, bound and verdict. Exit codes: 0 every rule holds, 1 a rule is violated,
2 the policy or the run cannot be read. --junit writes one test case per rule for CI systems."""
EXAMPLE = "modscope check runs/addmul --policy modularity.toml --junit check.xml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run folder made by `modscope fit` (or its report.json)")
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="the policy file")
    p.add_argument("--junit", metavar="FILE", help="write the verdicts as JUnit XML (one test case per rule)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON (with schema_version) on stdout")


def run(args: argparse.Namespace) -> int:
    from ..policy import check, junit_xml, load_policy
    from ..runs import write_text
    from .report import read_report, run_name

    report = read_report(args.run)
    rules = load_policy(args.policy)
    result = check(report, rules)
    if not report.convergence.converged:
        print(f"modscope: warning: {report.convergence.message()}", file=sys.stderr)
    if args.junit:
        if not Path(args.junit).parent.is_dir():
            raise MissingFileError(f"the folder of --junit {args.junit} does not exist; create it first")
        write_text(args.junit, junit_xml(result, suite=f"modscope check {run_name(args.run)}"))
    if args.json:
        print_json({"run": args.run, "policy": args.policy, **result.to_dict(), "convergence": report["convergence"]})
    else:
        rows = [[v.rule.label, v.value, v.rule.bound, "ok" if v.ok else "VIOLATED"] for v in result.verdicts]
        print(text_table(["rule", "measured", "bound", "verdict"], rows))
        held = len(result.verdicts) - result.n_failed
        print(f"\n{held} rule(s) hold, {result.n_failed} violated", file=sys.stdout)
    return 0 if result.passed else 1
