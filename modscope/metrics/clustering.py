"""Clustering masks into modules: hierarchical (scipy) on the distance 1 − IoU, and spectral (scikit-learn) on IoU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from ..masks.maskset import Mask, MaskSet
from .labelled import floats
from .overlap import iou


@dataclass(frozen=True)
class ClusterResult:
    """Attributes:
    tasks: the task names.
    distance: (K, K) 1 − IoU.
    linkage: scipy linkage matrix ((K−1, 4)) for a dendrogram.
    hierarchical: cluster label per task from cutting the tree into ``n_clusters``.
    spectral: cluster label per task from spectral clustering on IoU (None when K <= n_clusters).
    spectral_skipped: why ``spectral`` is None, in one sentence (None when it ran).
    """

    tasks: tuple[str, ...]
    distance: np.ndarray
    linkage: np.ndarray
    hierarchical: dict[str, int]
    spectral: dict[str, int] | None
    spectral_skipped: str | None = None

    def modules(self) -> dict[int, list[str]]:
        """The hierarchical clusters as ``{label: [tasks]}``."""
        out: dict[int, list[str]] = {}
        for t, label in self.hierarchical.items():
            out.setdefault(label, []).append(t)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "distance": self.distance.tolist(),
            "linkage": self.linkage.tolist(),
            "hierarchical": self.hierarchical,
            "spectral": self.spectral,
            "spectral_skipped": self.spectral_skipped,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterResult:
        """The result of `to_dict` (a report's ``clustering`` section)."""
        return cls(tuple(data["tasks"]), floats(data["distance"]), floats(data["linkage"]), dict(data["hierarchical"]),
                   dict(data["spectral"]) if data.get("spectral") else None, data.get("spectral_skipped"))


def cluster(
    masks: MaskSet | dict[str, Mask],
    tasks: Sequence[str] | None = None,
    *,
    n_clusters: int = 2,
    method: str = "average",
    seed: int = 0,
) -> ClusterResult:
    """Group tasks whose masks overlap into modules.

    Args:
        masks: at least two tasks' masks.
        tasks: the tasks to cluster; all by default.
        n_clusters: how many modules to cut the tree into.
        method: scipy linkage method ("average", "complete", "single").
        seed: seed of spectral clustering.

    Example:
        >>> import torch, modscope
        >>> a = torch.tensor([1, 1, 0, 0]); b = torch.tensor([0, 0, 1, 1])
        >>> ms = modscope.MaskSet.from_masks({"a1": {"w": a}, "a2": {"w": a}, "b1": {"w": b}})
        >>> sorted(modscope.metrics.cluster(ms).modules().values())
        [['a1', 'a2'], ['b1']]
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    overlap = iou(masks, tasks)
    k = len(overlap.tasks)
    if k < 2:
        raise InvalidParameterError("clustering needs the masks of at least two tasks")
    if n_clusters < 1:
        raise InvalidParameterError(f"n_clusters must be >= 1, got {n_clusters}")
    distance = 1.0 - overlap.total
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2
    tree = linkage(squareform(distance, checks=False), method=method)
    labels = fcluster(tree, t=min(n_clusters, k), criterion="maxclust")
    hierarchical = {t: int(label) for t, label in zip(overlap.tasks, labels)}
    spectral, skipped = None, None
    if k <= n_clusters:
        skipped = (f"spectral clustering skipped: it needs more tasks than modules, and there are {k} tasks for "
                   f"{n_clusters} modules")
    else:
        from sklearn.cluster import SpectralClustering

        affinity = np.clip(overlap.total, 0, 1)
        model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed)
        spectral = {t: int(label) for t, label in zip(overlap.tasks, model.fit_predict(affinity + 1e-9))}
    return ClusterResult(overlap.tasks, distance, tree, hierarchical, spectral, skipped)
