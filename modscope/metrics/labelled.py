"""`Labelled`: a small array whose rows (and columns) carry names, e.g. masks × tasks.

The metrics return their matrices as `Labelled` so that a value can be read by name (``removed["add", "mul"]``) and
printed with its labels, while code written for a plain NumPy array keeps working: indexing by position, slicing,
``.shape``, ``.tolist()``, arithmetic and NumPy functions all act on the values (and return plain arrays).

Example:
    >>> import numpy as np
    >>> m = Labelled(np.array([[0.1, 0.9], [0.8, 0.2]]), ("add", "mul"), ("add", "mul"))
    >>> m["add", "mul"], bool(m[0, 1] == m["add", "mul"]), m.shape
    (0.9, True, (2, 2))
    >>> m.to_dict()
    {'add': {'add': 0.1, 'mul': 0.9}, 'mul': {'add': 0.8, 'mul': 0.2}}
    >>> float(np.max(m)), (1 - m).tolist()
    (0.9, [[0.9, 0.09999999999999998], [0.19999999999999996, 0.8]])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from ..errors import InvalidParameterError


def floats(values: Any) -> np.ndarray:
    """JSON numbers (lists of lists, None for NaN) as a float array: the inverse of ``tolist()`` in a ``to_dict``."""
    return np.array(values if not isinstance(values, list) else _nan(values), dtype=float)


def _nan(values: list[Any]) -> list[Any]:
    return [_nan(v) if isinstance(v, list) else (np.nan if v is None else v) for v in values]


def _unwrap(value: Any) -> Any:
    if isinstance(value, Labelled):
        return value.values
    if isinstance(value, tuple | list):
        return type(value)(_unwrap(v) for v in value)
    return value


class Labelled(NDArrayOperatorsMixin):
    """A 1-D or 2-D array with a name for every row (and column).

    Args:
        values: the numbers, shape (R,) or (R, C).
        rows: R row names (e.g. the masks removed).
        cols: C column names (e.g. the tasks evaluated); omitted for 1-D values.

    Raises:
        InvalidParameterError: the names do not match the shape.
    """

    def __init__(self, values: Any, rows: Sequence[str], cols: Sequence[str] | None = None):
        self.values = np.asarray(values, dtype=float)
        self.rows = tuple(rows)
        self.cols = None if cols is None else tuple(cols)
        expected = (len(self.rows),) if self.cols is None else (len(self.rows), len(self.cols))
        if self.values.shape != expected:
            raise InvalidParameterError(f"Labelled values of shape {self.values.shape} need {expected} names")

    # -- by name ----------------------------------------------------------------------------------------------------
    def _index(self, names: tuple[str, ...] | None, name: str, axis: str) -> int:
        if names is None or name not in names:
            raise KeyError(f"{name!r} is not a {axis} name; the {axis}s are {list(names or ())}")
        return names.index(name)

    def __getitem__(self, key: Any) -> Any:
        """``t[row]``, ``t[row, col]`` by name, or any NumPy index by position (which gives plain NumPy values)."""
        if isinstance(key, str):
            return self.values[self._index(self.rows, key, "row")].copy() if self.cols else float(
                self.values[self._index(self.rows, key, "row")])
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
            return float(self.values[self._index(self.rows, key[0], "row"), self._index(self.cols, key[1], "column")])
        return self.values[_unwrap(key)]

    def get(self, row: str, col: str | None = None, default: float | None = None) -> float | None:
        """The value at ``(row, col)`` (or ``row`` for 1-D), ``default`` when either name is absent."""
        try:
            return self[row] if col is None else self[row, col]
        except KeyError:
            return default

    # -- like an array ----------------------------------------------------------------------------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return getattr(ufunc, method)(*_unwrap(inputs), **{k: _unwrap(v) for k, v in kwargs.items()})

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def tolist(self) -> list[Any]:
        return self.values.tolist()

    def __eq__(self, other: object) -> bool:  # type: ignore[override]  # a value, not an element-wise comparison
        return (isinstance(other, Labelled) and self.rows == other.rows and self.cols == other.cols
                and np.array_equal(self.values, other.values, equal_nan=True))

    __hash__ = None  # type: ignore[assignment]  # mutable values

    # -- out --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{row: {col: value}}`` (``{row: value}`` for 1-D), NaN as None."""
        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        if self.cols is None:
            return {r: num(v) for r, v in zip(self.rows, self.values)}
        return {r: {c: num(v) for c, v in zip(self.cols, row)} for r, row in zip(self.rows, self.values)}

    def to_pandas(self) -> Any:
        """A pandas ``DataFrame`` (``Series`` for 1-D) with the names as index and columns.

        Raises:
            ModscopeError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            from ..errors import ModscopeError
            from ..install import install_hint

            raise ModscopeError(f"to_pandas needs pandas; install it with `{install_hint('pandas')}`") from exc
        if self.cols is None:
            return pd.Series(self.values, index=list(self.rows))
        return pd.DataFrame(self.values, index=list(self.rows), columns=list(self.cols))

    def __repr__(self) -> str:
        from ..texttable import render_table

        if self.cols is None:
            return "Labelled(\n" + render_table(["", "value"], [[r, float(v)] for r, v in zip(self.rows, self.values)]) + "\n)"
        return "Labelled(\n" + render_table(["", *self.cols], [[r, *map(float, row)] for r, row in zip(self.rows, self.values)]) + "\n)"


__all__ = ["Labelled", "floats"]
