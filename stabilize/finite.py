"""``check_finite``: find NaN and Inf values and say exactly where they are.

It accepts torch and TF tensors, Keras variables (``model.weights``), numpy
arrays, pandas DataFrames and Series (NaT in a datetime column counts as NaN),
Python numbers, and nested dict/list/tuple of those (the ``unscaled-inputs``
scenario feeds ``{'input1': ..., 'input2': ...}``). For each offending leaf it
reports the key path, NaN, +inf and -inf counted separately, the first
positions as (row, column), and the finite min and max.

The walk is iterative (any depth) and a structure that contains itself is an
error. Arrays are scanned in chunks of ``CHUNK`` elements, so the extra memory
is a few boolean masks of one chunk, not a copy of the array. A message
lists at most ``MAX_LEAVES_SHOWN`` bad arrays and summarises the rest.

This check copies device tensors to the host, so it is meant for data and for
reports, not for the per-step guard inside a training loop (the trainer keeps
its flag on the device).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import NonFiniteError

__all__ = ["check_finite", "FiniteReport", "LeafReport"]

MAX_POSITIONS = 5
MAX_LEAVES_SHOWN = 20
CHUNK = 1 << 20


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
        bad = self.bad
        lines = [f"non-finite values in {self.name!r} ({len(bad)} of {len(self.leaves)} array(s)):"]
        lines += ["  " + leaf.describe() for leaf in bad[:MAX_LEAVES_SHOWN]]
        if len(bad) > MAX_LEAVES_SHOWN:
            rest = bad[MAX_LEAVES_SHOWN:]
            lines.append(
                f"  ... and {len(rest)} more array(s) with {sum(leaf.n_bad for leaf in rest)} non-finite "
                f"value(s) in all (report.bad lists every one)"
            )
        lines.append(
            "  fix: inspect those rows at their source; drop or impute them before training "
            "(np.nan_to_num hides them: use it only after deciding what they mean)"
        )
        return "\n".join(lines)


def _walk(obj, path):
    """Yield ``(path, leaf)`` depth-first without recursion; a container inside itself is an error."""
    stack = [(path, obj, False)]
    open_ids: list[int] = []  # the containers on the current path
    while stack:
        path, item, closing = stack.pop()
        if closing:
            open_ids.pop()
            continue
        if isinstance(item, (dict, list, tuple)):
            if id(item) in open_ids:
                raise ValueError(f"check_finite: {path} contains itself (a reference cycle); pass the data without the cycle")
            open_ids.append(id(item))
            stack.append((path, item, True))
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            children = [(f"{path}[{k!r}]" if isinstance(item, dict) else f"{path}[{k}]", v) for k, v in pairs]
            stack.extend((p, v, False) for p, v in reversed(children))
        else:
            yield path, item


def _datetime_as_float(arr: np.ndarray) -> np.ndarray:
    """Datetimes/timedeltas as float64 counts, NaT as NaN."""
    out = arr.view("i8").astype(np.float64)
    out[np.isnat(arr)] = np.nan
    return out


def _frame_column(col) -> np.ndarray:
    """One pandas column as float64; datetime and timedelta values as int64 counts, NaT as NaN."""
    if col.dtype.kind in "mM" or hasattr(col.array, "asi8"):  # tz-aware datetimes are not kind "M"
        out = col.array.asi8.astype(np.float64)
        out[col.isna().to_numpy()] = np.nan
        return out
    return col.to_numpy(dtype=np.float64)


def _to_numpy(obj, path):
    """Return ``(array, row_labels, column_labels)`` for a leaf."""
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, pd.DataFrame):
        usable = [c for c in obj.columns if pd.api.types.is_numeric_dtype(obj[c]) or pd.api.types.is_bool_dtype(obj[c])
                  or pd.api.types.is_datetime64_any_dtype(obj[c]) or pd.api.types.is_timedelta64_dtype(obj[c])]
        if len(usable) != obj.shape[1]:
            others = [c for c in obj.columns if c not in usable]
            raise TypeError(
                f"check_finite: {path} has non-numeric columns {others}; select the numeric "
                f"columns first (df.select_dtypes('number'))"
            )
        if all(obj[c].dtype.kind in "fiub" for c in obj.columns):  # one conversion for the usual frame
            return obj.to_numpy(dtype=np.float64), list(obj.index), list(obj.columns)
        return np.column_stack([_frame_column(obj[c]) for c in obj.columns]), list(obj.index), list(obj.columns)
    if pd is not None and isinstance(obj, pd.Series):
        return _frame_column(obj), list(obj.index), None
    if isinstance(obj, (np.ndarray, np.generic, float, int, bool)):
        arr = np.asarray(obj)
        return (_datetime_as_float(arr) if arr.dtype.kind in "mM" else arr), None, None
    from .registry import backend_for

    B = backend_for(obj)
    if B.is_tensor(obj):
        return B.to_numpy(obj), None, None
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):  # Keras 3 variables, array-likes
        return np.asarray(obj), None, None
    raise TypeError(
        f"check_finite: {path} is a {type(obj).__name__}; expected a tensor, an array, "
        f"a pandas object, a number, or a dict/list/tuple of those"
    )


def _inspect(arr: np.ndarray, path: str, rows, cols) -> LeafReport:
    if arr.dtype.kind == "c":
        raise TypeError(f"check_finite: {path} is complex ({arr.dtype}); check x.real and x.imag separately")
    if arr.dtype.kind not in "fbiu":
        raise TypeError(f"check_finite: {path} has dtype {arr.dtype}, which is not numeric")
    leaf = LeafReport(path, tuple(arr.shape), str(arr.dtype), row_labels=rows, column_labels=cols)
    if arr.dtype.kind != "f":
        if arr.size:
            leaf.finite_min, leaf.finite_max = float(arr.min()), float(arr.max())
        return leaf
    flat = arr.reshape(-1)  # a view for contiguous arrays (the usual case); a copy otherwise
    lo, hi, bad_at = np.inf, -np.inf, []
    for start in range(0, flat.size, CHUNK):
        part = flat[start:start + CHUNK]
        finite = np.isfinite(part)  # the one mask per chunk
        if part.size and finite.any():
            lo = min(lo, float(np.min(part, where=finite, initial=np.inf)))
            hi = max(hi, float(np.max(part, where=finite, initial=-np.inf)))
        if finite.all():
            continue
        leaf.n_nan += int(np.count_nonzero(np.isnan(part)))
        leaf.n_posinf += int(np.count_nonzero(part == np.inf))
        leaf.n_neginf += int(np.count_nonzero(part == -np.inf))
        if len(bad_at) < MAX_POSITIONS:
            bad_at += [start + int(i) for i in np.flatnonzero(~finite)[: MAX_POSITIONS - len(bad_at)]]
    if lo <= hi:
        leaf.finite_min, leaf.finite_max = lo, hi
    leaf.positions = [tuple(int(i) for i in np.unravel_index(k, arr.shape)) for k in bad_at]
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
    if obj is None:
        raise TypeError(f"check_finite: {name!r} is None; pass the data to check (an array, a tensor, a DataFrame...)")
    leaves = []
    for path, leaf in _walk(obj, name):
        if leaf is None:
            continue
        arr, rows, cols = _to_numpy(leaf, path)
        leaves.append(_inspect(arr, path, rows, cols))
    if not leaves:
        raise ValueError(f"check_finite: {name!r} holds no arrays or numbers to check (an empty or all-None structure)")
    report = FiniteReport(name, leaves)
    if raise_error and not report.ok:
        raise NonFiniteError(str(report), report)
    return report
