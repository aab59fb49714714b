"""Image classification data for the class-removal and stability experiments, and the paper's simple CNN.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download).
- ``cifar10``: the standard CIFAR-10 python archive (``cifar-10-python.tar.gz``) at a path the user gives. Its batches
  are Python pickles of numpy arrays. Unpickling can run code, so they are read with an unpickler that only builds
  numpy arrays, dicts, lists and strings and refuses anything else (`UntrustedFileError`); the file is only ever
  opened because the user pointed ``--data`` at it.

Both are split as in the paper (docs/method.md section 8.5): 80% of the training images for training, the other 20%
(a fixed random draw) as the iid validation set; inputs are normalized per channel with the training mean and std.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError, UntrustedFileError
from ..fileio import require_file

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how pickle protocol 2 stores bytes when written by Python 3
}


@dataclass(frozen=True)
class ImageData:
    """Train/validation images (N, C, H, W) float32, normalized, and int64 labels, with the class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    classes: tuple[str, ...]


def _split_normalize(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], seed: int) -> ImageData:
    order = np.random.RandomState(seed).permutation(len(x))
    n_train = round(0.8 * len(x))
    tr, va = order[:n_train], order[n_train:]
    mean = x[tr].mean(axis=(0, 2, 3), keepdims=True)
    std = x[tr].std(axis=(0, 2, 3), keepdims=True) + 1e-8
    norm = ((x - mean) / std).astype(np.float32)
    return ImageData(norm[tr], y[tr].astype(np.int64), norm[va], y[va].astype(np.int64), classes)


def load_digits(seed: int = 1234) -> ImageData:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8), split 80/20 with ``seed``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.images.astype(np.float64)[:, None]
    return _split_normalize(x, bunch.target, tuple(str(c) for c in range(10)), seed)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UntrustedFileError(f"the CIFAR-10 archive contains a pickle that asks for {module}.{name}; only numpy arrays are accepted")


def _unpickle(raw: bytes) -> dict[bytes, Any]:
    # CIFAR-10 batches were pickled by Python 2: byte strings need encoding="bytes".
    data = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(data, dict) or b"data" not in data or b"labels" not in data:
        raise DataError("a CIFAR-10 batch in the archive has no 'data'/'labels' entries; is this the python version?")
    return data


def load_cifar10(path: str | Path, seed: int = 1234) -> ImageData:
    """The CIFAR-10 training set (50,000 images) from the python archive at ``path``, split 80/20 with ``seed``.

    Raises:
        MissingFileError: the file is missing.
        DataError: the file is not the CIFAR-10 python archive.
        UntrustedFileError: a pickle in it asks for anything but numpy arrays.
    """
    path = Path(path)
    require_file(path, "data file", "pass the CIFAR-10 python archive (cifar-10-python.tar.gz) with --data")
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if Path(m.name).name.startswith("data_batch_")), key=lambda m: m.name)
            if not members:
                raise DataError(f"{path} has no data_batch_* files; pass the CIFAR-10 *python* archive")
            for member in members:
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{path}: {member.name} is not a regular file")
                batch = _unpickle(f.read())
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{path} cannot be read as the CIFAR-10 python archive ({exc})") from exc
    return _split_normalize(np.concatenate(xs).astype(np.float64) / 255.0, np.concatenate(ys), CIFAR10_CLASSES, seed)


class SimpleCNN(nn.Module):
    """The paper's 4-layer CNN (8.5): conv3x3 32-64-128-256 with ReLU and max-pooling, global average pool, linear.

    conv(32)-ReLU-pool, conv(64)-ReLU-pool, conv(128)-dropout 0.25-ReLU-pool, conv(256)-ReLU-dropout 0.5, mean over
    space, Linear(256 → classes). ``dropout=False`` gives the no-dropout variant (used for mask stability).

    Example:
        >>> SimpleCNN(1, 10)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 10, *, dropout: bool = True):
        super().__init__()
        d1, d2 = (0.25, 0.5) if dropout else (0.0, 0.0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.Dropout(d1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.Dropout(d2),
        )
        self.out_layer = nn.Linear(256, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.features(x).mean(dim=(2, 3)))


def load_images(data: Path | None, seed: int = 1234) -> tuple[str, ImageData]:
    """(name, data): CIFAR-10 from ``data`` when given, else the bundled digits."""
    if data is not None:
        return "cifar10", load_cifar10(data, seed)
    return "digits", load_digits(seed)
