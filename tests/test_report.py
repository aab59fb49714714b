"""`modscope.Report`: measurements of hand-made masks on a tiny model, and their JSON, Markdown, CSV and HTML forms."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import modscope
from modscope import MaskSet, Report
from modscope.errors import InvalidParameterError
from modscope.metrics.drop import relative_drop as drop
from modscope.report.tables import SECTIONS, build_tables


@pytest.fixture
def setup() -> tuple[MaskSet, torch.nn.Module, list[modscope.Task]]:
    """Identity weights 4x4 with no bias; the class is the argmax of the input. "low" keeps the rows of classes 0/1,
    "high" those of 2/3, so the masks are disjoint and each serves its own classes."""
    net = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(4))
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)).abs()
    y = x.argmax(1)
    low, high = y < 2, y >= 2
    tasks = [modscope.Task("low", x[low], y[low]), modscope.Task("high", x[high], y[high])]
    rows = torch.arange(4)[:, None].expand(4, 4)
    masks = MaskSet.from_masks({"low": {"weight": (rows < 2) & torch.eye(4, dtype=torch.bool)},
                                "high": {"weight": (rows >= 2) & torch.eye(4, dtype=torch.bool)}})
    return masks, net, tasks


def test_measurements_of_disjoint_masks(setup) -> None:
    masks, net, tasks = setup
    report = Report.from_masks(masks, net, tasks)
    assert report.tasks == ["low", "high"]
    assert report["iou"]["total"][0][1] == 0.0 and report["sharing"]["total"] == {"low": 0.0, "high": 0.0}
    assert report["density"] == {"low": 2 / 16, "high": 2 / 16}
    ab = report["ablation"]
    assert ab["full"] == [1.0, 1.0]
    assert ab["kept"][0][0] == 1.0 and ab["kept"][1][1] == 1.0  # each mask alone does its task
    assert ab["removed"][0][1] == 1.0  # removing "low" spares "high"
    assert ab["removed"][0][0] < 0.5  # ... and breaks "low" (its logits become 0: argmax picks class 0 or 2 ...)
    assert report["clustering"]["hierarchical"]["low"] != report["clustering"]["hierarchical"]["high"]
    assert report["model"]["n_weights"] == 16 and report["layers"] == {"weight": 16}


def test_json_round_trip(setup, tmp_path: Path) -> None:
    report = Report.from_masks(*setup)
    path = report.save(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert next(iter(data)) == "schema_version" and data["schema_version"] == 1
    assert Report.load(path).to_dict() == report.to_dict()


def test_html_has_every_section_with_a_plot(setup) -> None:
    page = Report.from_masks(*setup).to_html(title="<toy> & co")
    for key, heading, _ in SECTIONS:
        if key != "curves":  # hand-made masks have no training curves
            assert f'<section id="{key}">' in page and heading in page
    assert '<section id="curves">' not in page
    assert page.count('<img alt="') == 5  # sharing, overlap, ablation, dendrogram, density
    assert "&lt;toy&gt; &amp; co" in page and "<toy>" not in page


def test_html_without_plots_or_curves(setup) -> None:
    page = Report.from_masks(*setup).to_html(plots=False)
    assert "<img" not in page and '<section id="ablation">' in page


def test_markdown_and_csv_carry_the_same_tables(setup, tmp_path: Path) -> None:
    report = Report.from_masks(*setup)
    text = report.to_markdown()
    written = report.write_csv(tmp_path / "tables")
    tables = report.tables()
    assert [p.stem for p in written] == [t.key for t in tables]
    for table, path in zip(tables, written):
        rows = list(csv.reader(path.open()))
        assert rows[0] == table.headers and len(rows) == len(table.rows) + 1
        if table.key != "curves":
            assert f"### {table.title}" in text
    summary = next(t for t in tables if t.key == "summary")
    assert summary.rows[0][:5] == ["low", "accuracy", 1.0, 1.0, report["ablation"]["removed"][0][0]]


def test_one_task_has_no_clustering(setup) -> None:
    masks, net, tasks = setup
    report = Report.from_masks(masks.subset(["low"]), net, tasks[:1])
    assert report["clustering"] is None
    assert '<section id="clustering">' not in report.to_html()
    assert "## Clustering" not in report.to_markdown()


def test_drop_is_relative_and_signed_by_the_metric() -> None:
    assert drop(0.8, 0.2, True) == pytest.approx(0.75)
    assert drop(0.1, 0.3, False) == pytest.approx(2.0)  # an error metric that triples
    assert drop(0.0, 0.5, False) == 0.5 and drop(None, 0.5, True) is None


def test_non_finite_values_become_null(setup) -> None:
    data = Report.from_masks(*setup).to_dict()
    data["ablation"]["full"][0] = math.nan
    report = Report(data)
    assert json.loads(report.to_json())["ablation"]["full"][0] is None
    assert "| low | accuracy | - |" in report.to_markdown()


def test_incomplete_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="lacks"):
        Report({"tasks": ["a"]})
    path = tmp_path / "r.json"
    path.write_text('{"schema_version": 1, "tasks": []}')
    with pytest.raises(InvalidParameterError, match="not a modscope report"):
        Report.load(path)
    path.write_text('{"schema_version": 99}')
    with pytest.raises(InvalidParameterError, match="upgrade"):
        Report.load(path)


def test_masks_without_tasks_are_refused(setup) -> None:
    masks, net, tasks = setup
    with pytest.raises(InvalidParameterError, match="no task for the masks"):
        Report.from_masks(masks, net, tasks[:1])


def test_tables_follow_the_sections(setup) -> None:
    order = [key for key, _, _ in SECTIONS]
    sections = [t.section for t in build_tables(Report.from_masks(*setup).to_dict())]
    assert sections == sorted(sections, key=order.index)


def test_html_plots_have_axis_titles_and_real_layer_names() -> None:
    import re
    from html import unescape

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(64, 4)
    tasks = [modscope.Task("a", x, (x[:, 0] > 0).long()), modscope.Task("b", x, (x[:, 1] > 0).long())]
    gen = torch.Generator().manual_seed(1)
    masks = MaskSet.from_masks({t.name: {n: torch.rand(p.shape, generator=gen) > 0.3 for n, p in net.named_parameters()
                                         if n.endswith("weight")} for t in tasks}, layers={"0.weight": "0", "2.weight": "2"})
    report = Report.from_masks(masks, net, tasks)
    assert report["layer_modules"] == {"0": "Linear 8×4", "2": "Linear 2×8"}
    page = report.to_html()
    alts = [unescape(a) for a in re.findall(r'<img alt="([^"]*)"', page)]
    assert len(alts) == 5
    for alt in alts:  # every panel of every plot names both axes
        for panel in alt.split("; "):
            assert re.search(r"x axis '[^']+'", panel) and re.search(r"y axis '[^']+'", panel), panel
    by_title = {alt.split(":")[0]: alt for alt in alts}
    for title in ("Sharing per layer", "Mask density per layer"):
        assert "(0 Linear 8×4, 2 Linear 2×8)" in by_title[title] and "x axis 'layer" in by_title[title]
    assert "x axis 'task evaluated'" in by_title["Relative drop of each task"]
    assert "y axis 'mask removed'" in by_title["Relative drop of each task"]
    assert "<td>Linear 8×4</td>" in page
    # two tasks, two modules: the spectral column is empty and the page says why
    assert "Spectral clustering skipped: it needs more tasks than modules, and there are 2 tasks for 2 modules." in page
    assert 'title="Each cell: the overlap of two tasks' in page  # chance levels explained in the tooltip
