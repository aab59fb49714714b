"""`modscope report`: render a run's measurements as text, JSON, Markdown, CSV or a self-contained HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidParameterError, MissingFileError

if TYPE_CHECKING:  # pragma: no cover
    from ..report import Report

HELP = "show a run's metrics; write them as HTML (with plots), Markdown, CSV or JSON"
DESCRIPTION = """\
Show the measurements of a run made by `modscope fit`: per task the metric with the full model and with only its
mask, sharing per layer, pairwise IoU and IoMin with the chance level, the ablation matrix, clustering with a
dendrogram, density per layer and the training curves.

Without an output flag the report is printed to stdout as Markdown. --html writes one self-contained page (plots
embedded, readable offline); --csv writes one CSV file per table. Every file is written atomically."""
EXAMPLE = "modscope report runs/addmul --html addmul.html --csv addmul-tables/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run folder made by `modscope fit` (or its report.json)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page with plots")
    p.add_argument("--md", metavar="FILE", help="write the report as Markdown")
    p.add_argument("--csv", metavar="DIR", help="write one CSV file per table into DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON (with schema_version) on stdout")
    p.add_argument("--title", metavar="TEXT", help="the report's title (default: 'modscope report: RUN')")


def read_report(path: str) -> Report:
    """The `Report` of a run folder, or of a report.json file, checked to render (its tables build).

    Raises:
        InvalidParameterError: the folder or file is missing, or the report is malformed (wrong types, missing keys).
    """
    from ..report import Report
    from ..runs import RunFolder, malformed_report

    p = Path(path)
    if p.is_dir():
        report_path = RunFolder(p).report_path
        if not report_path.exists():
            raise InvalidParameterError(f"{p} holds no report.json: it is not a finished run folder of `modscope fit`")
    elif p.is_file():
        report_path = p
    else:
        raise MissingFileError(f"run folder {p} does not exist; make one with `modscope fit MODEL --task NAME=FILE --out {p}`")
    report = Report.load(report_path)
    with malformed_report(report_path):
        report.tables()
    return report


def run_name(path: str) -> str:
    """The name of a run for titles: its folder's name (also when given its report.json)."""
    p = Path(path)
    return p.resolve().parent.name if p.is_file() else p.name


def run(args: argparse.Namespace) -> int:
    from ..runs import malformed_report, write_text

    report = read_report(args.run)
    title = args.title or f"modscope report: {run_name(args.run)}"
    # render everything first, so that a failure leaves no output behind
    with malformed_report(Path(args.run)):
        html = report.to_html(title=title) if args.html else None
        markdown = report.to_markdown(title=title) if args.md or not (args.html or args.csv or args.json) else None
        body = report.to_json() if args.json else None
    for target in (args.html, args.md):
        if target and not Path(target).parent.is_dir():
            raise MissingFileError(f"the folder of {target} does not exist; create it first")
    if args.html:
        write_text(args.html, html or "")
    if args.md:
        write_text(args.md, markdown or "")
    if args.csv:
        report.write_csv(args.csv)
    if body is not None:
        sys.stdout.write(body)
    elif not (args.html or args.md or args.csv):
        sys.stdout.write(markdown or "")
    for target in (args.html, args.md, args.csv):
        if target:
            print(f"wrote {target}", file=sys.stderr)
    return 0
