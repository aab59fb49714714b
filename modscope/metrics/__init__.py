"""The paper's measurements of subnetworks, as pure functions returning frozen result dataclasses.

- `sharing`: fraction of each task's mask also used by other masks (the paper's "total shared").
- `iou`, `iomin`: pairwise overlap, per layer and whole-model, with the chance level for equal densities.
- `ablation`: every task's metric with every mask removed / kept; `confusion_diff` for classifiers.
- `cluster`: modules from hierarchical (scipy) and spectral (scikit-learn) clustering on IoU.
- `stability`: IoU between masks of the same task trained with different seeds.
"""

from .ablation import AblationResult, ConfusionResult, ablation, confusion_diff, confusion_matrix
from .clustering import ClusterResult, cluster
from .overlap import OverlapResult, iomin, iou
from .sharing import SharingResult, sharing
from .stability import StabilityResult, stability

__all__ = [
    "AblationResult", "ClusterResult", "ConfusionResult", "OverlapResult", "SharingResult", "StabilityResult",
    "ablation", "cluster", "confusion_diff", "confusion_matrix", "iomin", "iou", "sharing", "stability",
]
