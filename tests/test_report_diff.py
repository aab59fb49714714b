"""`diff_runs` on hand-made masks: tasks of one run only are named and left out of every comparison."""

import pytest
import torch

import modscope
from modscope.report.diff import diff_runs


def _run(masks: dict[str, list[int]], reported_sharing: dict[str, float]):
    ms = modscope.MaskSet.from_masks({t: {"w": torch.tensor(m)} for t, m in masks.items()})
    tasks = list(masks)
    report = {"sharing": {"total": reported_sharing},
              "iou": {"tasks": tasks, "total": [[1.0] * len(tasks) for _ in tasks]},
              "ablation": {"masks": tasks, "tasks": tasks, "removed": [[0.5] * len(tasks) for _ in tasks]}}
    return ms, report


def test_tasks_of_one_run_only_are_separated_and_sharing_is_recomputed_on_common_tasks():
    a, b = [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]
    # in run A, "c" uses every weight: "a" and "b" are then fully shared there, which says nothing about B
    masks_a, report_a = _run({"a": a, "b": b, "c": [1] * 6}, {"a": 1.0, "b": 1.0, "c": 0.5})
    masks_b, report_b = _run({"a": a, "b": b}, {"a": 0.5, "b": 0.5})
    result = diff_runs(masks_a, report_a, masks_b, report_b)
    assert result["tasks"] == ["a", "b"] and result["only_a"] == ["c"] and result["only_b"] == []
    assert result["sharing_basis"] == "common tasks"
    assert result["sharing"]["a"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5), "change": pytest.approx(0.0)}
    assert result["ablation"]["masks"] == ["a", "b"] and "c" not in result["drift"]


def test_same_task_sets_use_the_reports_sharing():
    masks_a, report_a = _run({"a": [1, 0], "b": [1, 1]}, {"a": 1.0, "b": 0.5})
    masks_b, report_b = _run({"a": [1, 0], "b": [1, 1]}, {"a": 0.25, "b": 0.5})
    result = diff_runs(masks_a, report_a, masks_b, report_b)
    assert result["only_a"] == result["only_b"] == [] and result["sharing_basis"] == "reports"
    assert result["sharing"]["a"]["change"] == pytest.approx(-0.75)
