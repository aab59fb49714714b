"""Labelled ablation results: task names on both axes, array use unchanged, one definition of the drop."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import modscope
from modscope.errors import InvalidParameterError, ModscopeError
from modscope.metrics import AblationResult, Labelled, relative_drop
from modscope.policy import check, parse_policy
from modscope.texttable import render_table


@pytest.fixture(scope="module")
def run() -> tuple[modscope.MaskSet, torch.nn.Module, list[modscope.Task]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(128, 4)
    tasks = [modscope.Task("sign", x, (x[:, 0] > 0).long()), modscope.Task("reg", x, x[:, :2], loss="mse")]
    masks = modscope.train_masks(net, tasks, modscope.MaskConfig(n_steps=20, batch_size=32, init=0.1, lr=0.05),
                                 progress=False)
    return masks, net, tasks


def test_labelled_reads_by_name_and_works_as_an_array() -> None:
    m = Labelled(np.array([[1.0, 2.0], [3.0, np.nan]]), ("a", "b"), ("x", "y"))
    assert m["b", "x"] == 3.0 and m.get("a", "z") is None and list(m["a"]) == [1.0, 2.0]
    assert m[1, 0] == 3.0 and m[:, 0].tolist() == [1.0, 3.0] and m.shape == (2, 2) and len(m) == 2
    assert isinstance(m * 2, np.ndarray) and (m * 2)[0, 1] == 4.0 and np.nanmax(m) == 3.0
    assert np.asarray(m).dtype == np.float64
    assert m.to_dict() == {"a": {"x": 1.0, "y": 2.0}, "b": {"x": 3.0, "y": None}}
    assert "x" in repr(m) and "b" in repr(m)
    with pytest.raises(KeyError, match="'z' is not a column name"):
        m["a", "z"]
    with pytest.raises(InvalidParameterError):
        Labelled(np.zeros((2, 3)), ("a", "b"), ("x", "y"))


def test_to_pandas_keeps_the_names_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Labelled(np.eye(2), ("a", "b"), ("x", "y"))
    pd = pytest.importorskip("pandas")
    frame = m.to_pandas()
    assert isinstance(frame, pd.DataFrame) and frame.loc["b", "y"] == 1.0 and list(frame.columns) == ["x", "y"]
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModscopeError, match=r"modscope\[pandas\]|\.\[pandas\]"):
        m.to_pandas()


def test_ablation_is_labelled_on_both_axes(run) -> None:
    masks, net, tasks = run
    result = modscope.metrics.ablation(net, masks, tasks)
    for matrix in (result.removed, result.kept, result.drop, result.relative_removed):
        assert isinstance(matrix, Labelled) and matrix.rows == ("sign", "reg") and matrix.cols == ("sign", "reg")
    # positional use of the old bare arrays keeps working and agrees with the names
    assert result.removed[0, 1] == result.removed["sign", "reg"] == result.value("sign", "reg")
    assert result.removed.shape == (2, 2) and result.full["reg"] == result.full[1]
    assert result.to_dict()["removed"] == np.asarray(result.removed).tolist()
    assert result.higher_is_better == (True, False)


def test_one_drop_definition_in_metrics_report_and_policy(run) -> None:
    masks, net, tasks = run
    report = modscope.Report.from_masks(masks, net, tasks)
    ab = report.ablation
    assert ab == AblationResult.from_dict(ab.to_dict())
    for removed in ("sign", "reg"):
        for task, hib in (("sign", True), ("reg", False)):
            expected = relative_drop(ab.full[task], ab.removed[removed, task], hib)
            assert ab.drop[removed, task] == pytest.approx(expected)
            assert report.drop(task, removed) == pytest.approx(expected)
            rule = parse_policy({"rule": [{"metric": "drop", "task": task, "removed": removed, "max": 1e9}]})
            assert check(report, rule).verdicts[0].value == pytest.approx(expected)
    table = next(t for t in report.tables() if t.key == "ablation_drop")
    assert table.rows[1][2] == pytest.approx(ab.drop["reg", "reg"])


def test_one_text_table_renderer() -> None:
    from modscope.commands._common import text_table
    from modscope.experiments.common import format_table

    rows = [["a", 0.5, 3], ["bb", None, 12]]
    assert text_table(["t", "v", "n"], rows) == render_table(["t", "v", "n"], rows)
    assert render_table(["t", "v", "n"], rows).splitlines()[2] == "a   0.500   3"
    assert format_table(["t", "n"], [["a", 3], ["bb", 12]]).splitlines() == ["t   n", "--  --", "a   3", "bb  12"]


def test_the_report_holds_the_metrics_result_objects(run) -> None:
    masks, net, tasks = run
    report = modscope.Report.from_masks(masks, net, tasks)
    again = modscope.Report(report.to_dict())  # as read back from report.json
    assert again.iou.pair("sign", "reg") == modscope.metrics.iou(masks).pair("sign", "reg")
    assert again.iomin.to_dict() == modscope.metrics.iomin(masks).to_dict()
    assert again.sharing == modscope.metrics.sharing(masks)
    assert again.clustering.to_dict() == modscope.metrics.cluster(masks).to_dict()
    assert again.ablation.removed["reg", "sign"] == report["ablation"]["removed"][1][0]
