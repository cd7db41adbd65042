"""The data as ``stabilize.audit`` measures it: a table of dataset rows and named columns.

:func:`as_table` turns what a user trains on (a numpy array, a pandas DataFrame
or Series, a dict of arrays, a torch/TF tensor, a DataLoader or ``tf.data``
sample) into a :class:`Table`: a float64 copy of the values (the caller's data
are never changed), one name and one *kind* per column, and the dataset's row
labels. Every finding then names dataset rows and columns, never a flattened
position inside a batch.

The kind decides what is measured:

* ``float``: a quantity; its scale (mean, standard deviation) is checked;
* ``integer`` (an integer dtype), ``bool``, ``categorical`` (pandas
  ``category``) and ``integer-coded`` (a float column holding a few distinct
  whole numbers: from 2 to ``CATEGORY_LIMIT``, and at most half the rows): ids, token ids, category codes
  and flags. Scaling them is wrong (an embedding or a one-hot encoding is what
  they need), so their scale is not checked. A quantity stored as integers is
  not scale-checked either: cast it to float to have it checked.

It also reads the first batches of a loader in dataset order
(:func:`take_batches`: a shuffled torch ``DataLoader`` is re-read unshuffled, a
``Subset`` keeps its indices into the full dataset) and turns ``train_index``
into row positions (:func:`row_positions`).

Nothing here imports torch or tensorflow: tensors are converted through their
own ``.numpy()``, and torch's loader classes are looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CATEGORY_LIMIT", "Table", "as_table", "ColumnStats", "column_stats", "outlier_rows", "output_table", "Nonfinite", "nonfinite_cells", "is_batches",
           "take_batches", "row_positions"]

CATEGORY_LIMIT = 20  # a float column of at most this many distinct whole numbers holds codes, not a quantity
SCALED_KINDS = ("float",)


@dataclass
class Table:
    """Rows x columns, as float64 (missing values and missing categories are NaN).

    Attributes:
        values: ``(n_rows, n_columns)`` float64, a copy of the caller's data.
        columns: one name per column: a DataFrame's column name, a dict key
            (``key[j]`` or ``key[i, j]`` for wider entries), or ``col j`` /
            ``col [i, j]`` for unnamed arrays (the element index within a row).
        kinds: one of ``float``, ``integer``, ``bool``, ``categorical``,
            ``integer-coded`` per column (see the module docstring).
        rows: the dataset's row labels (a DataFrame's index, a ``Subset``'s
            indices), or None when rows are numbered 0, 1, ...
        named: whether the columns carry user names (quoted in reports).
        float_dtype: per column, whether its dtype is floating point.
        frame: whether the columns are a DataFrame's (every column is a feature).
        structured: whether rows are arrays of 2 or more dimensions (images,
            sequences of vectors): their elements are not separate features.
    """

    values: np.ndarray
    columns: list[str]
    kinds: list[str]
    rows: Any = None
    named: bool = False
    float_dtype: list[bool] | None = None
    frame: bool = False
    structured: bool = False

    @property
    def n_rows(self) -> int:
        return self.values.shape[0]

    @property
    def n_columns(self) -> int:
        return self.values.shape[1]

    def row(self, i: int):
        """The dataset's label of row position ``i`` (a plain int for integer labels)."""
        label = i if self.rows is None else self.rows[i]
        return int(label) if isinstance(label, (int, np.integer)) else label

    def row_text(self, i: int) -> str:
        label = self.row(i)
        return f"row {label}" if isinstance(label, int) else f"row {str(label)!r}"

    def col_text(self, j: int) -> str:
        return f"col {self.columns[j]!r}" if self.named else self.columns[j]

    def scale_checked(self) -> np.ndarray:
        """Which columns are quantities whose scale is checked."""
        return np.array([k in SCALED_KINDS for k in self.kinds], dtype=bool)


def _element_names(prefix: str | None, shape: tuple) -> list[str]:
    """Names of the columns that one row of shape ``shape`` flattens into."""
    if prefix is None:
        if len(shape) <= 1:
            return [f"col {j}" for j in range(int(np.prod(shape)))]
        return [f"col [{', '.join(map(str, ix))}]" for ix in np.ndindex(*shape)]
    if len(shape) == 0:
        return [prefix]
    if len(shape) == 1:
        return [prefix] if shape[0] == 1 else [f"{prefix}[{j}]" for j in range(shape[0])]
    return [f"{prefix}[{', '.join(map(str, ix))}]" for ix in np.ndindex(*shape)]


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf / keras
        x = x.numpy()
    return np.asarray(x)


def _kind_of(dtype) -> str | None:
    """The kind of a numpy dtype, or None when it is not numeric."""
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "integer"
    if dtype.kind == "f":
        return "float"
    return None


def _frame_column(series):
    """One pandas column as (float64 values, kind); ``(None, None)`` when it is not numeric."""
    pd = sys.modules["pandas"]
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy().astype(np.float64)
        return np.where(codes < 0, np.nan, codes), "categorical"
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan), "bool"
    if pd.api.types.is_integer_dtype(series.dtype):  # numpy ints and nullable Int64 (pd.NA -> NaN)
        return series.to_numpy(dtype=np.float64, na_value=np.nan), "integer"
    if pd.api.types.is_float_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan), "float"
    return None, None


def _not_numeric(frame, names: list, role: str) -> TypeError:
    first = frame[names[0]].dropna()
    example = f", e.g. {first.iloc[0]!r} at row {first.index[0]!r}" if len(first) else ""
    which = f"column {names[0]!r}" if len(names) == 1 else f"columns {names}"
    return TypeError(f"audit: non-numeric {role} {which} (dtype {frame[names[0]].dtype}{example}); convert "
                     f"{'it' if len(names) == 1 else 'them'} (pd.to_numeric(df[{names[0]!r}], errors='coerce') shows the "
                     "cells that are not numbers), encode categories (df[col].astype('category')), or drop "
                     f"{'it' if len(names) == 1 else 'them'}")


def _integer_coded(values: np.ndarray, kinds: list[str]) -> list[str]:
    """Float columns holding a few distinct whole numbers are codes: mark them ``integer-coded``."""
    n = values.shape[0]
    limit = min(CATEGORY_LIMIT, n // 2)
    out = list(kinds)
    for j in np.flatnonzero([k == "float" for k in kinds]):
        col = values[:, j]
        col = col[np.isfinite(col)]
        if col.size and np.all(col == np.round(col)) and 2 <= np.unique(col).size <= limit:  # constant: not codes
            out[j] = "integer-coded"
    return out


def as_table(X, role: str = "input") -> Table:
    """The data as a :class:`Table` (a copy; ``X`` is not changed).

    Args:
        X: a numpy array (any number of dimensions; row ``i`` is ``X[i]``), a
            pandas DataFrame or Series, a dict of those (the unscaled-inputs scenario's
            ``{'input1': ..., 'input2': ...}``), or a torch/TF tensor.
        role: ``"input"`` or ``"target"``, for the messages.

    Raises:
        TypeError: a column that is neither numeric, boolean nor categorical
            (named in the message), or a dtype that is not numeric.
        ValueError: a scalar, or dict entries with different numbers of rows.

    Example:
        >>> import numpy as np
        >>> t = as_table({"ids": np.array([3, 1, 2]), "x": np.array([0.5, 0.1, 0.2])})
        >>> t.columns, t.kinds
        (['ids', 'x'], ['integer', 'float'])
    """
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(X, pd.Series):
        X = X.to_frame(name=X.name if X.name is not None else ("y" if role == "target" else "x"))
    if pd is not None and isinstance(X, pd.DataFrame):
        pairs = [_frame_column(X.iloc[:, j]) for j in range(X.shape[1])]
        text = [X.columns[j] for j, (v, _) in enumerate(pairs) if v is None]
        if text:
            raise _not_numeric(X, text, role)
        values = np.column_stack([v for v, _ in pairs]) if pairs else np.empty((len(X), 0))
        kinds = _integer_coded(values, [k for _, k in pairs])
        rows = None if isinstance(X.index, pd.RangeIndex) and X.index.start == 0 and X.index.step == 1 else X.index
        return Table(values, [str(c) for c in X.columns], kinds, rows, named=True,
                     float_dtype=[pd.api.types.is_float_dtype(X.iloc[:, j].dtype) for j in range(X.shape[1])], frame=True)
    if isinstance(X, dict):
        parts, names, kinds, floats, structured = [], [], [], [], False
        for key, value in X.items():
            if pd is not None and isinstance(value, (pd.Series, pd.DataFrame)):
                sub = as_table(value, role)
                sub_names = [str(key)] if isinstance(value, pd.Series) else [f"{key}[{c}]" for c in sub.columns]
            else:
                sub = _array_table(_to_numpy(value), role, str(key))
                sub_names = sub.columns
            if parts and sub.n_rows != parts[0].shape[0]:
                raise ValueError(f"audit: {role} {key!r} has {sub.n_rows} rows but the entries before it have {parts[0].shape[0]}")
            parts.append(sub.values)
            names += sub_names
            kinds += sub.kinds
            floats += sub.float_dtype
            structured |= sub.structured
        values = np.concatenate(parts, axis=1) if parts else np.empty((0, 0))
        return Table(values, names, kinds, None, named=True, float_dtype=floats, structured=structured)
    return _array_table(_to_numpy(X), role, None)


def _array_table(arr: np.ndarray, role: str, prefix: str | None) -> Table:
    if arr.ndim == 0:
        raise ValueError(f"audit: the {role}s are a single number, not rows of data")
    kind = _kind_of(arr.dtype)
    if kind is None:
        try:
            arr, kind = arr.astype(np.float64), "float"  # an object array of numbers
        except (TypeError, ValueError):
            raise TypeError(f"audit: the {role}s have dtype {arr.dtype}, which is not numeric; encode them first") from None
    values = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))).astype(np.float64)
    kinds = [kind] * values.shape[1]
    if kind == "float":
        kinds = _integer_coded(values, kinds)
    return Table(values, _element_names(prefix, arr.shape[1:]), kinds, named=prefix is not None,
                 float_dtype=[arr.dtype.kind == "f"] * values.shape[1], structured=arr.ndim >= 3)


@dataclass
class ColumnStats:
    """Per column, over its finite values (NaN where a column has none)."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    n_finite: np.ndarray


def column_stats(values: np.ndarray) -> ColumnStats:
    """Mean, standard deviation, min, max and count of the finite values of each column."""
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, values, 0.0).sum(axis=0) / n
        std = np.sqrt((np.where(finite, values - mean, 0.0) ** 2).sum(axis=0) / n)
    some = n > 0
    lo = np.where(some, np.where(finite, values, np.inf).min(axis=0, initial=np.inf), np.nan)
    hi = np.where(some, np.where(finite, values, -np.inf).max(axis=0, initial=-np.inf), np.nan)
    return ColumnStats(mean, std, lo, hi, n)


def outlier_rows(values: np.ndarray, limit: float, share: float = 0.01) -> np.ndarray:
    """The few rows that alone make columns look unscaled, or an empty array.

    A row is an outlier when, in some column, its magnitude exceeds ``limit`` times that column's
    ``1 - share`` quantile of magnitudes (an image with one corrupted 3e38 sample among pixels in
    [0, 1]). They are returned only when they are at most ``share`` of the rows (at least one) and,
    without them, no column's ``|mean|`` or std exceeds ``limit``: then the rows, not the columns,
    are the problem. Non-finite cells are left to the ``nonfinite`` check.
    """
    n = values.shape[0]
    if n < 3 or values.shape[1] == 0:
        return np.array([], dtype=np.int64)
    mag = np.abs(np.where(np.isfinite(values), values, 0.0))
    typical = np.maximum(np.quantile(mag, 1.0 - share, axis=0), np.finfo(np.float64).tiny)
    rows = np.flatnonzero((mag > limit * typical).any(axis=1))
    if not rows.size or rows.size > max(1, int(share * n)):
        return np.array([], dtype=np.int64)
    rest = column_stats(np.delete(values, rows, axis=0))
    with np.errstate(invalid="ignore"):
        calm = ~((np.abs(rest.mean) > limit) | (rest.std > limit))
    return rows if calm.all() else np.array([], dtype=np.int64)


def output_table(scaler, scaled: np.ndarray, T: Table) -> Table:
    """``scaler.transform(X)`` as a table: its output names (a ColumnTransformer reorders and
    renames columns), each input column keeping its kind (ids stay ids)."""
    names = None
    if hasattr(scaler, "get_feature_names_out"):
        try:
            names = [str(c) for c in scaler.get_feature_names_out()]
        except Exception:  # some transformers cannot name their outputs
            names = None
    if names is None or len(names) != scaled.shape[1]:
        if scaled.shape == T.values.shape:
            return Table(scaled, T.columns, T.kinds, T.rows, named=T.named, float_dtype=T.float_dtype)
        names = [f"col {j}" for j in range(scaled.shape[1])]
    kind = dict(zip(T.columns, T.kinds))
    return Table(scaled, names, [kind.get(c, "float") for c in names], T.rows, named=T.named,
                 float_dtype=[True] * len(names))


@dataclass
class Nonfinite:
    """Where a table is not finite: row positions, per-column counts, the first cells."""

    rows: np.ndarray        # positions of the rows holding a non-finite cell
    per_column: np.ndarray  # non-finite cells per column
    cells: list[tuple[int, int]]
    n_nan: int
    n_posinf: int
    n_neginf: int

    @property
    def n_cells(self) -> int:
        return self.n_nan + self.n_posinf + self.n_neginf


def nonfinite_cells(values: np.ndarray, max_cells: int = 5) -> Nonfinite | None:
    """The non-finite cells of ``values``, or None when every cell is finite."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    r, c = np.nonzero(bad)  # row-major: the first cells of the first rows
    return Nonfinite(np.flatnonzero(bad.any(axis=1)), bad.sum(axis=0), list(zip(r[:max_cells].tolist(), c[:max_cells].tolist())),
                     int(np.isnan(values).sum()), int(np.isposinf(values).sum()), int(np.isneginf(values).sum()))


# -- rows as the dataset numbers them ----------------------------------------------------
def is_batches(X, y) -> bool:
    """Whether ``X`` is a loader or iterable of ``(x, y)`` batches rather than data."""
    return (y is None and hasattr(X, "__iter__") and not hasattr(X, "shape")
            and not isinstance(X, (np.ndarray, dict, list, tuple, str, bytes)))


def _in_dataset_order(loader):
    """A torch DataLoader over a map-style dataset is re-read unshuffled, so that row i is
    dataset item i (a ``Subset``'s rows are its indices into the full dataset)."""
    torch = sys.modules.get("torch")
    ds = getattr(loader, "dataset", None)
    if (torch is None or not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_size is None
            or isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__")):
        return loader, None
    ordered = torch.utils.data.DataLoader(ds, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)
    return ordered, ([int(i) for i in ds.indices] if isinstance(ds, torch.utils.data.Subset) else None)


def take_batches(dataset, max_batches: int):
    """Concatenate the first batches of a DataLoader / tf.data.Dataset / iterable of (x, y)."""
    dataset, labels = _in_dataset_order(dataset)
    xs, ys = [], []
    for i, item in enumerate(dataset):
        if i >= max_batches:
            break
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError("audit: a dataset must yield (inputs, targets) pairs")
        xs.append(item[0])
        ys.append(item[1])
    if not xs:
        raise ValueError("audit: the dataset yielded no batches: there is nothing to audit")
    as_np = lambda t: np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t.numpy() if hasattr(t, "numpy") else t)
    if isinstance(xs[0], dict):
        x = {k: np.concatenate([as_np(b[k]) for b in xs]) for k in xs[0]}
    else:
        x = np.concatenate([as_np(b) for b in xs])
    y = np.concatenate([as_np(b) for b in ys])
    return x, y, (labels[: len(y)] if labels is not None else None)


def row_positions(train_index, T: Table) -> np.ndarray:
    """The positions of the rows ``train_index`` names: positions, a boolean mask, or
    (for a DataFrame) its index labels as a pandas Index."""
    pd = sys.modules.get("pandas")
    n = T.n_rows
    if pd is not None and isinstance(train_index, pd.Index) and T.rows is not None and hasattr(T.rows, "get_indexer"):
        pos = T.rows.get_indexer(train_index)
        if (pos < 0).any():
            raise ValueError(f"audit: train_index labels {list(train_index[pos < 0][:5])} are not in X's index")
        return pos
    idx = np.asarray(train_index)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"audit: a boolean train_index needs one entry per row ({n}), got shape {idx.shape}")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise TypeError(f"audit: train_index must be row positions (integers) or a boolean mask, got {idx.dtype} "
                        f"of shape {idx.shape}")
    if not idx.size:
        raise ValueError("audit: train_index is empty; pass the positions of the training rows")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"audit: train_index holds row {int(idx.min() if idx.min() < 0 else idx.max())} but X has "
                         f"{n} rows; pass positions 0..{n - 1} (or, for a DataFrame, its index labels as a pandas Index)")
    return idx
