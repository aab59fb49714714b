"""`Report`: the metrics of one run of masks, and its renderings as JSON, Markdown, CSV and a self-contained HTML page.

A report is plain data (what `modscope fit` saves as ``report.json``), so it can be rendered again, checked against a
policy or compared with another run without the model. Sections: a summary per task, sharing per layer, pairwise IoU
and IoMin with the chance level, the ablation matrix, clustering with a dendrogram, density per layer, and the
training curves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParameterError
from ..fileio import SCHEMA_VERSION, dumps, jsonable, read_json, write_text

if TYPE_CHECKING:  # pragma: no cover
    from ..masks.convergence import ConvergenceCheck
    from ..masks.maskset import MaskSet
    from ..metrics.ablation import AblationResult
    from ..metrics.clustering import ClusterResult
    from ..metrics.overlap import OverlapResult
    from ..metrics.sharing import SharingResult
    from ..model import Model
    from ..tasks import Task
    from .tables import Table

#: keys every report has.
REQUIRED = ("tasks", "task_info", "layers", "density", "density_per_layer", "sharing", "iou", "iomin", "ablation", "curves")


class Report:
    """The measurements of one run.

    Args:
        data: the report's data, as made by `Report.from_masks` or read from ``report.json``.

    Raises:
        InvalidParameterError: ``data`` lacks a section.

    Example:
        >>> import torch, modscope
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(64, 4)
        >>> tasks = [modscope.Task("sign", x, (x[:, 0] > 0).long()), modscope.Task("big", x, (x[:, 1] > 1).long())]
        >>> masks = modscope.train_masks(net, tasks, modscope.MaskConfig(n_steps=20, batch_size=32), progress=False)
        >>> report = modscope.Report.from_masks(masks, net, tasks)
        >>> report.tasks, "## Ablation" in report.to_markdown()
        (['sign', 'big'], True)
    """

    def __init__(self, data: Mapping[str, Any]):
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise InvalidParameterError(f"report data lacks {missing}; make the report with Report.from_masks or `modscope fit`")
        self._data = {k: v for k, v in jsonable(data).items() if k != "schema_version"}
        if not self._data.get("convergence"):  # reports written before the check: judge the recorded curves
            from ..masks.convergence import check_convergence

            self._data["convergence"] = check_convergence(self._data["curves"] or {}).to_dict()

    @classmethod
    def from_masks(
        cls,
        masks: MaskSet,
        model: Model | Any,
        tasks: Sequence[Task],
        *,
        n_clusters: int = 2,
        device: str | None = None,
    ) -> Report:
        """Measure a run: sharing, IoU/IoMin with chance, ablation, clustering, density and curves.

        Args:
            masks: the trained masks.
            model: the model they were trained on (a `Model` or a torch module).
            tasks: one task per mask, with the masks' names (held-out data where there is any).
            n_clusters: modules to cut the clustering tree into.
            device: where to run the ablations; cuda when present by default.

        Raises:
            InvalidParameterError: a mask has no task of the same name.
        """
        from ..model import Model
        from .compute import compute

        by_name = {t.name: t for t in tasks}
        missing = [m for m in masks.tasks if m not in by_name]
        if missing:
            raise InvalidParameterError(f"no task for the masks {missing}; pass one Task per mask, with the same names")
        return cls(compute(masks, Model.of(model), [by_name[m] for m in masks.tasks], n_clusters=n_clusters, device=device))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read a report saved with `save` (a run's ``report.json``).

        Raises:
            MissingFileError, UnreadableFileError: the file is missing or the system will not read it.
            InvalidParameterError: the file is not a report.
        """
        data = read_json(path, "report")
        try:
            return cls(data)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{path} is not a modscope report ({exc})") from None

    # -- data -------------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._data["tasks"])

    @property
    def convergence(self) -> ConvergenceCheck:
        """Whether each task's mask density had stopped falling at the end of training (`masks.convergence`)."""
        from ..masks.convergence import ConvergenceCheck

        return ConvergenceCheck.from_dict(self._data["convergence"])

    @property
    def ablation(self) -> AblationResult:
        """The ablation matrices as a labelled `AblationResult` (``report.ablation.drop["add", "mul"]``)."""
        from ..metrics.ablation import AblationResult

        info = self._data["task_info"]
        return AblationResult.from_dict(self._data["ablation"],
                                        [bool(info.get(t, {}).get("higher_is_better", True)) for t in self._data["ablation"]["tasks"]])

    @property
    def iou(self) -> OverlapResult:
        """Pairwise IoU as the `OverlapResult` of `metrics.iou` (``report.iou.pair("add", "mul")``)."""
        from ..metrics.overlap import OverlapResult

        return OverlapResult.from_dict(self._data["iou"])

    @property
    def iomin(self) -> OverlapResult:
        """Pairwise IoMin as the `OverlapResult` of `metrics.iomin`."""
        from ..metrics.overlap import OverlapResult

        return OverlapResult.from_dict(self._data["iomin"])

    @property
    def sharing(self) -> SharingResult:
        """The shared fractions as the `SharingResult` of `metrics.sharing`."""
        from ..metrics.sharing import SharingResult

        return SharingResult.from_dict(self._data["sharing"])

    @property
    def clustering(self) -> ClusterResult | None:
        """The modules as the `ClusterResult` of `metrics.cluster`; None for a run of one task."""
        from ..metrics.clustering import ClusterResult

        return ClusterResult.from_dict(self._data["clustering"]) if self._data.get("clustering") else None

    def drop(self, task: str, removed: str) -> float | None:
        """The relative drop of ``task``'s metric with ``removed``'s mask removed (`metrics.drop.relative_drop`)."""
        from .values import drop

        return drop(self._data, task, removed)

    def __getitem__(self, section: str) -> Any:
        return self._data[section]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, ``schema_version`` first."""
        return {"schema_version": SCHEMA_VERSION, **self._data}

    def tables(self) -> list[Table]:
        """The report's tables, as the renderers show them."""
        from .tables import build_tables

        return build_tables(self._data)

    # -- renderings -------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return dumps(self._data)

    def to_markdown(self, *, title: str = "modscope report") -> str:
        from .markdown import to_markdown

        return to_markdown(self._data, title=title)

    def to_html(self, *, title: str = "modscope report", plots: bool = True) -> str:
        """A self-contained HTML page (plots embedded as PNG; needs matplotlib unless ``plots=False``)."""
        from .html import to_html

        return to_html(self._data, title=title, plots=plots)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        return write_text(path, self.to_json())

    def write_csv(self, folder: str | os.PathLike) -> list[Path]:
        """One CSV file per table in ``folder``."""
        from .csv_files import write_csv

        return write_csv(self._data, folder)

    def __repr__(self) -> str:
        return f"Report(tasks={self.tasks})"


__all__ = ["Report"]
