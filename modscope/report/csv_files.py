"""A report as CSV files: one file per table, named after the table's key."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ..fileio import write_text
from .tables import Table, build_tables


def table_csv(table: Table) -> str:
    """One table as CSV text (raw values, full precision; empty cells for missing values)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.headers)
    writer.writerows([["" if v is None else v for v in row] for row in table.rows])
    return buf.getvalue()


def write_csv(data: dict[str, Any], folder: str | os.PathLike) -> list[Path]:
    """Write every table of a report into ``folder`` (created if needed), each file atomically.

    Returns:
        The paths written, e.g. ``summary.csv``, ``sharing.csv``, ``overlap.csv``, ``ablation.csv`` ...
    """
    out = Path(folder)
    contents = {f"{t.key}.csv": table_csv(t) for t in build_tables(data)}
    out.mkdir(parents=True, exist_ok=True)
    return [write_text(out / name, text) for name, text in contents.items()]
