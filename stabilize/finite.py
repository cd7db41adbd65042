"""``check_finite``: find NaN and Inf values and say exactly where they are.

It accepts torch and TF tensors, numpy arrays, pandas DataFrames and Series,
Python numbers, and nested dict/list/tuple of those (seed 000 feeds
``{'input1': ..., 'input2': ...}``). For each offending leaf it reports the key
path, NaN, +inf and -inf counted separately, the first positions as
(row, column), and the finite min and max.

This check copies data to the host, so it is meant for data and for reports,
not for the per-step guard inside a training loop (the trainer keeps its flag
on the device).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import NonFiniteError

__all__ = ["check_finite", "FiniteReport", "LeafReport"]

MAX_POSITIONS = 5


@dataclass
class LeafReport:
    """What one array held. ``positions`` are index tuples (row, column, ...)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    n_nan: int = 0
    n_posinf: int = 0
    n_neginf: int = 0
    positions: list[tuple] = field(default_factory=list)
    finite_min: float | None = None
    finite_max: float | None = None
    row_labels: list | None = None
    column_labels: list | None = None

    @property
    def n_bad(self) -> int:
        return self.n_nan + self.n_posinf + self.n_neginf

    @property
    def ok(self) -> bool:
        return self.n_bad == 0

    def _where(self, pos: tuple) -> str:
        if not pos:
            return "scalar"
        parts = []
        for axis, i in enumerate(pos):
            if axis == 0:
                label = f"row {i}" if self.row_labels is None else f"row {self.row_labels[i]!r}"
            elif axis == 1:
                label = f"col {i}" if self.column_labels is None else f"col {self.column_labels[i]!r}"
            else:
                label = f"axis{axis} {i}"
            parts.append(label)
        return "(" + ", ".join(parts) + ")"

    def describe(self) -> str:
        shown = ", ".join(self._where(p) for p in self.positions)
        more = " ..." if self.n_bad > len(self.positions) else ""
        rng = (
            f"finite range [{self.finite_min:.6g}, {self.finite_max:.6g}]"
            if self.finite_min is not None
            else "no finite values"
        )
        return (
            f"{self.path}: shape {self.shape} {self.dtype}: {self.n_nan} NaN, "
            f"{self.n_posinf} +inf, {self.n_neginf} -inf; first at {shown}{more}; {rng}"
        )


@dataclass
class FiniteReport:
    """The result of :func:`check_finite`: every leaf checked, and the bad ones."""

    name: str
    leaves: list[LeafReport]

    @property
    def bad(self) -> list[LeafReport]:
        return [leaf for leaf in self.leaves if not leaf.ok]

    @property
    def ok(self) -> bool:
        return not self.bad

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: all {len(self.leaves)} array(s) finite"
        lines = [f"non-finite values in {self.name!r} ({len(self.bad)} of {len(self.leaves)} array(s)):"]
        lines += ["  " + leaf.describe() for leaf in self.bad]
        lines.append(
            "  fix: inspect those rows at their source; drop or impute them before training "
            "(np.nan_to_num hides them: use it only after deciding what they mean)"
        )
        return "\n".join(lines)


def _walk(obj, path):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, obj


def _to_numpy(obj, path):
    """Return ``(array, row_labels, column_labels)`` for a leaf."""
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, pd.DataFrame):
        numeric = obj.select_dtypes(include=[np.number, "bool"])
        if numeric.shape[1] != obj.shape[1]:
            others = [c for c in obj.columns if c not in numeric.columns]
            raise TypeError(
                f"check_finite: {path} has non-numeric columns {others}; select the numeric "
                f"columns first (df.select_dtypes('number'))"
            )
        return numeric.to_numpy(dtype=np.float64), list(obj.index), list(obj.columns)
    if pd is not None and isinstance(obj, pd.Series):
        return obj.to_numpy(dtype=np.float64), list(obj.index), None
    if isinstance(obj, (np.ndarray, np.generic, float, int, bool)):
        return np.asarray(obj), None, None
    from .registry import backend_for

    B = backend_for(obj)
    if not B.is_tensor(obj):
        raise TypeError(
            f"check_finite: {path} is a {type(obj).__name__}; expected a tensor, an array, "
            f"a pandas object, a number, or a dict/list/tuple of those"
        )
    return B.to_numpy(obj), None, None


def _inspect(arr: np.ndarray, path: str, rows, cols) -> LeafReport:
    if arr.dtype.kind not in "fcbiu":
        raise TypeError(f"check_finite: {path} has dtype {arr.dtype}, which is not numeric")
    leaf = LeafReport(path, tuple(arr.shape), str(arr.dtype), row_labels=rows, column_labels=cols)
    if arr.dtype.kind not in "fc":
        if arr.size:
            leaf.finite_min, leaf.finite_max = float(arr.min()), float(arr.max())
        return leaf
    finite = np.isfinite(arr)
    if arr.size and finite.any():
        vals = arr[finite]
        leaf.finite_min, leaf.finite_max = float(vals.min()), float(vals.max())
    if finite.all():
        return leaf
    nan = np.isnan(arr)
    leaf.n_nan = int(nan.sum())
    leaf.n_posinf = int(np.isposinf(arr).sum())
    leaf.n_neginf = int(np.isneginf(arr).sum())
    flat = np.flatnonzero(~finite.ravel())[:MAX_POSITIONS]
    leaf.positions = [tuple(int(i) for i in np.unravel_index(k, arr.shape)) for k in flat]
    return leaf


def check_finite(obj: Any, name: str = "input", raise_error: bool = True) -> FiniteReport:
    """Check every array in ``obj`` for NaN, +inf and -inf.

    Args:
        obj: a tensor, array, DataFrame/Series, number, or nested dict/list/tuple.
        name: how to call ``obj`` in the report (key paths are appended).
        raise_error: raise :class:`stabilize.NonFiniteError` when anything is
            non-finite (default); otherwise return the report either way.

    Returns:
        A :class:`FiniteReport`; ``report.ok`` is True when everything is finite.

    Example:
        >>> import numpy as np, stabilize
        >>> X = {"input1": np.array([[1.0, np.nan], [np.inf, 2.0]])}
        >>> print(stabilize.check_finite(X, raise_error=False).bad[0].describe())
        input['input1']: shape (2, 2) float64: 1 NaN, 1 +inf, 0 -inf; first at (row 0, col 1), (row 1, col 0); finite range [1, 2]
    """
    leaves = []
    for path, leaf in _walk(obj, name):
        if leaf is None:
            continue
        arr, rows, cols = _to_numpy(leaf, path)
        leaves.append(_inspect(arr, path, rows, cols))
    report = FiniteReport(name, leaves)
    if raise_error and not report.ok:
        raise NonFiniteError(str(report), report)
    return report
