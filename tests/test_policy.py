"""Policies for `modscope check`: parsing, measuring, verdicts, JUnit XML, and the command's exit codes."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from cli_fixtures and then named as arguments

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_fixtures import FIT_FLAGS, Toy, cli, console, fitted_run, read_json, toy

from modscope.errors import MissingFileError, PolicyError
from modscope.policy import check, junit_xml, load_policy, measure, parse_policy

#: a hand-made report: tasks a (accuracy) and b (mse), layers l1 and l2.
REPORT = {
    "tasks": ["a", "b"],
    "layers": {"l1": 10, "l2": 10},
    "task_info": {"a": {"metric": "accuracy", "higher_is_better": True}, "b": {"metric": "mse", "higher_is_better": False}},
    "iou": {"tasks": ["a", "b"], "total": [[1, 0.3], [0.3, 1]], "per_layer": {"l1": [[1, 0.1], [0.1, 1]], "l2": [[1, 0.5], [0.5, 1]]}},
    "iomin": {"tasks": ["a", "b"], "total": [[1, 0.6], [0.6, 1]], "per_layer": {}},
    "sharing": {"total": {"a": 0.4, "b": 0.2}, "per_layer": {"l1": {"a": 0.1, "b": 0.05}}},
    "density": {"a": 0.25, "b": 0.5},
    "density_per_layer": {"a": {"l1": 0.2, "l2": 0.3}, "b": {"l1": 0.5, "l2": 0.5}},
    "ablation": {"masks": ["a", "b"], "tasks": ["a", "b"], "full": [0.9, 0.1],
                 "removed": [[0.09, 0.1], [0.9, 0.4]], "kept": [[0.85, 0.5], [0.2, 0.12]]},
}


def rule(**keys) -> list:
    return parse_policy({"rule": [keys]})


@pytest.mark.parametrize(("keys", "value"), [
    ({"metric": "iou", "tasks": ["a", "b"]}, 0.3),
    ({"metric": "iou", "tasks": ["b", "a"], "layer": "l2"}, 0.5),
    ({"metric": "iomin", "tasks": ["a", "b"]}, 0.6),
    ({"metric": "sharing", "task": "a"}, 0.4),
    ({"metric": "sharing", "task": "b", "layer": "l1"}, 0.05),
    ({"metric": "density", "task": "b"}, 0.5),
    ({"metric": "density", "task": "a", "layer": "l2"}, 0.3),
    ({"metric": "drop", "task": "a", "removed": "a"}, 0.9),  # (0.9 - 0.09) / 0.9
    ({"metric": "drop", "task": "b", "removed": "b"}, 3.0),  # mse 0.1 -> 0.4: (0.4 - 0.1) / 0.1
    ({"metric": "drop", "task": "a", "removed": "b"}, 0.0),
    ({"metric": "performance", "task": "a"}, 0.85),
    ({"metric": "accuracy", "task": "a", "mask": "b"}, 0.2),
])
def test_measure(keys: dict, value: float) -> None:
    assert measure(rule(max=1, **keys)[0], REPORT) == pytest.approx(value)


def test_verdicts_and_bounds_are_inclusive() -> None:
    rules = parse_policy({"rule": [
        {"metric": "iou", "tasks": ["a", "b"], "max": 0.3},             # holds, at the bound
        {"metric": "drop", "task": "b", "removed": "a", "max": 0.1},    # holds: removing a spares b
        {"metric": "drop", "task": "a", "removed": "a", "min": 0.95},   # violated: 0.9 < 0.95
        {"metric": "density", "task": "a", "min": 0.1, "max": 0.2},     # violated: 0.25 > 0.2
    ]})
    result = check(REPORT, rules)
    assert [v.ok for v in result.verdicts] == [True, True, False, False]
    assert not result.passed and result.n_failed == 2
    assert result.to_dict()["rules"][2] == {"name": "drop of a without a", "metric": "drop", "task": "a", "removed": "a",
                                            "layer": None, "min": 0.95, "max": None, "value": pytest.approx(0.9), "ok": False}


def test_a_missing_value_violates_its_rule() -> None:
    report = json.loads(json.dumps(REPORT))
    report["ablation"]["kept"][0][0] = None
    report["iou"]["total"][0][1] = math.nan
    result = check(report, parse_policy({"rule": [{"metric": "performance", "task": "a", "min": 0},
                                                  {"metric": "iou", "tasks": ["a", "b"], "max": 1}]}))
    assert [v.ok for v in result.verdicts] == [False, False]


@pytest.mark.parametrize(("data", "message"), [
    ({}, "no rules"),
    ({"rules": []}, "unknown top-level"),
    ({"rule": [{"metric": "modularity", "max": 1}]}, "not one of"),
    ({"rule": [{"metric": "iou", "tasks": ["a", "b"]}]}, "no bound"),
    ({"rule": [{"metric": "iou", "tasks": ["a"], "max": 1}]}, "two tasks"),
    ({"rule": [{"metric": "drop", "task": "a", "max": 1}]}, "needs removed"),
    ({"rule": [{"metric": "density", "task": "a", "max": "low"}]}, "must be a number"),
    ({"rule": [{"metric": "density", "task": "a", "max": 1, "treshold": 2}]}, "unknown keys ['treshold']; it takes metric, min, max, name, task"),
    ({"rule": [{"metric": "sharing", "task": 3, "max": 1}]}, "must be a string"),
])
def test_malformed_rules(data: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=__import__("re").escape(message)):
        parse_policy(data)


@pytest.mark.parametrize(("keys", "message"), [
    ({"metric": "iou", "tasks": ["a", "zz"]}, "'zz' is not a task"),
    ({"metric": "drop", "task": "a", "removed": "zz"}, "removed 'zz'"),
    ({"metric": "density", "task": "a", "layer": "l9"}, "layer 'l9'"),
    ({"metric": "accuracy", "task": "b"}, "measured by mse"),
])
def test_rules_that_do_not_fit_the_run(keys: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        check(REPORT, rule(max=1, **keys))


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        load_policy(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\nmetric = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)


def test_junit_xml() -> None:
    rules = parse_policy({"rule": [{"metric": "iou", "tasks": ["a", "b"], "max": 0.5, "name": "a & b <overlap>"},
                                   {"metric": "density", "task": "a", "max": 0.1}]})
    root = ET.fromstring(junit_xml(check(REPORT, rules)))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["a & b <overlap>", "density a"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message") == "measured 0.25, bound <= 0.1"


# -- the command ------------------------------------------------------------------------------------------------------
def _policies(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    report = json.loads((run / "report.json").read_text())
    iou = report["iou"]["total"][0][1]
    density = report["density"]["a"]
    holds = tmp_path / "holds.toml"
    holds.write_text(f'[[rule]]\nmetric = "iou"\ntasks = ["a", "b"]\nmax = {iou + 0.01}\n\n'
                     f'[[rule]]\nmetric = "density"\ntask = "a"\nmin = {density - 0.01}\nmax = 1\n')
    violated = tmp_path / "violated.toml"
    violated.write_text(holds.read_text() + f'\n[[rule]]\nname = "a is sparse"\nmetric = "density"\ntask = "a"\nmax = {density - 0.01}\n')
    return holds, violated


def test_check_exit_codes_table_and_junit(fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holds, violated = _policies(fitted_run, tmp_path)
    assert cli("check", fitted_run, "--policy", holds, "--junit", tmp_path / "holds.xml") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rule", "measured", "bound", "verdict"]
    assert "iou a/b" in out and "VIOLATED" not in out and "2 rule(s) hold, 0 violated" in out
    assert ET.parse(tmp_path / "holds.xml").getroot().get("failures") == "0"

    assert cli("check", fitted_run, "--policy", violated, "--junit", tmp_path / "violated.xml") == 1
    out = capsys.readouterr().out
    assert "a is sparse" in out and "VIOLATED" in out and "2 rule(s) hold, 1 violated" in out
    cases = ET.parse(tmp_path / "violated.xml").getroot().iter("testcase")
    assert [c.find("failure") is not None for c in cases] == [False, False, True]


def test_check_json(fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, violated = _policies(fitted_run, tmp_path)
    assert cli("check", fitted_run / "report.json", "--policy", violated, "--json") == 1
    data = read_json(capsys.readouterr().out)
    assert data["passed"] is False and data["n_rules"] == 3 and data["n_failed"] == 1
    assert data["rules"][2]["name"] == "a is sparse" and data["rules"][2]["ok"] is False
    assert data["convergence"]["converged"] is False and data["convergence"]["not_converged"] == ["a", "b"]


def test_check_through_the_console_script(fitted_run: Path, tmp_path: Path) -> None:
    holds, violated = _policies(fitted_run, tmp_path)
    assert console("check", fitted_run, "--policy", holds).returncode == 0
    result = console("check", fitted_run, "--policy", violated)
    assert result.returncode == 1 and "VIOLATED" in result.stdout
    # the 30-step run has not converged: one warning line, nothing else on stderr
    assert result.stderr.startswith("modscope: warning: the masks of") and result.stderr.count("\n") == 1


def test_check_needs_no_torch(fitted_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    holds, _ = _policies(fitted_run, tmp_path)
    code = (f"import sys; from modscope.cli import main; rc = main(['check', {str(fitted_run)!r}, '--policy', {str(holds)!r}]); "
            "print(rc, 'torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 False False"
