"""The convergence check at the end of mask training: a warning, a flag in the report, in `check` and its JSON."""

from __future__ import annotations

import warnings

import pytest
import torch

import modscope
from modscope.errors import ModscopeWarning
from modscope.masks.convergence import ConvergenceCheck, check_convergence
from modscope.policy import check, parse_policy

STEPS = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]


def _curve(density: list[float]) -> dict[str, list[float]]:
    return {"step": STEPS[: len(density)], "density": density}


def test_linear_fall_is_flagged_and_a_flat_end_is_not() -> None:
    result = check_convergence({"falling": _curve([1 - 0.05 * i for i in range(10)]),
                                "flat": _curve([0.9, 0.6, 0.4, 0.31, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])})
    assert result.not_converged == ("falling",) and not result.converged
    assert result.tail_fall["falling"] == pytest.approx(0.05 / 0.6) and result.tail_fall["flat"] == 0.0
    assert "'falling' (density -8.3%)" in result.message() and "n_steps=2000" in result.message()


def test_a_fall_that_has_only_begun_is_flagged() -> None:
    # the case: 200 steps end at density 0.999, the whole fall in the last points (relative fall < 1 %)
    result = check_convergence({"a": {"step": [50, 100, 150, 200], "density": [1.0, 1.0, 1.0, 0.999]},
                                "untouched": {"step": [50, 100], "density": [1.0, 1.0]}})
    assert result.tail_fall["a"] < result.threshold
    assert result.not_converged == ("a", "untouched") and result.unpruned == ("untouched",)
    assert "'a' (density -0.1%) were still shrinking" in result.message()
    assert "'untouched' still keep every weight after 200 steps" in result.message()


def test_short_curves_are_not_judged_and_round_trip() -> None:
    result = check_convergence({"a": {"step": [20], "density": [1.0]}, "b": {}})
    assert result.converged and result.tail_fall == {"a": None, "b": None} and result.message() == ""
    flagged = check_convergence({"a": _curve([1 - 0.05 * i for i in range(10)])})
    assert ConvergenceCheck.from_dict(flagged.to_dict()) == flagged


def _fit(**config: float) -> tuple[modscope.MaskSet, list[modscope.Task], torch.nn.Module, list[warnings.WarningMessage]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(256, 4)
    tasks = [modscope.Task("sign", x, (x[:, 0] > 0).long())]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = modscope.train_masks(net, tasks, modscope.MaskConfig(batch_size=64, log_every=10, seed=0, **config),
                                     progress=False)
    return masks, tasks, net, [w for w in caught if issubclass(w.category, ModscopeWarning)]


def test_a_short_fit_warns_and_its_report_is_flagged() -> None:
    masks, tasks, net, caught = _fit(n_steps=60)
    # 60 steps from logits 2.0 (lr 0.01): nothing is pruned yet
    assert len(caught) == 1 and "'sign' still keep every weight after 60 steps" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller of train_masks
    report = modscope.Report.from_masks(masks, net, tasks)
    assert report["convergence"]["not_converged"] == ["sign"] and not report.convergence.converged
    assert 'id="not-converged"' in report.to_html(plots=False)
    assert "NOT CONVERGED" in report.to_markdown()
    gate = parse_policy({"rule": [{"metric": "converged", "min": 1}, {"metric": "converged", "task": "sign", "min": 1}]})
    verdicts = check(report.to_dict(), gate).verdicts
    assert [v.value for v in verdicts] == [0.0, 0.0] and [v.rule.label for v in verdicts] == [
        "masks converged", "masks converged for sign"]


def test_a_converged_fit_does_not_warn() -> None:
    # a high rate and sparsity weight: the density settles within 300 steps and stays flat
    masks, tasks, net, caught = _fit(n_steps=300, lr=0.1, init=0.5, beta=1e-2)
    assert caught == [] and masks.curves["sign"]["density"][-1] < 1
    report = modscope.Report.from_masks(masks, net, tasks)
    assert report.convergence.converged and 'id="not-converged"' not in report.to_html(plots=False)
    assert "- convergence: converged" in report.to_markdown()
    assert check(report.to_dict(), parse_policy({"rule": [{"metric": "converged", "min": 1}]})).passed


def test_an_old_report_without_the_section_is_judged_from_its_curves() -> None:
    masks, tasks, net, _ = _fit(n_steps=60)
    data = modscope.Report.from_masks(masks, net, tasks).to_dict()
    del data["convergence"]
    assert modscope.Report(data)["convergence"]["not_converged"] == ["sign"]


def test_reproduce_gives_its_own_advice_for_longer_training():
    from modscope.commands.reproduce import _steps_hint
    from modscope.experiments.common import ExperimentOptions
    from modscope.masks.convergence import check_convergence, convergence_hint

    curves = {"a": {"step": [100, 200, 300, 400], "density": [0.9, 0.7, 0.5, 0.3]}}
    assert "--n-steps 800" in check_convergence(curves).message()
    with convergence_hint(_steps_hint(ExperimentOptions(quick=True))):
        message = check_convergence(curves).message()
    assert "--n-steps" not in message and message.endswith("run without --quick/--medium for the paper's step counts")
    assert "--n-steps 800" in check_convergence(curves).message()  # the hint ends with its block
