"""Batches for ``StabilityTrainer``: arrays, dicts of arrays, or any iterable of ``(x, y)``.

Array data are sliced by a numpy permutation under the fit's seed, so every
backend sees the same batches; rows a rollback left out are dropped wherever
shuffling puts them. Batches of a dataset (a DataLoader, a ``tf.data.Dataset``)
are named by their ``(epoch, position)``.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from .validate import check_count, check_nonempty

__all__ = ["Batch", "batches", "check_arrays", "rows_of", "nonfinite_rows", "batch_finite"]


class Batch(NamedTuple):
    position: int  # the batch's index within its epoch
    x: Any
    y: Any
    rows: np.ndarray | None  # sample indices, for array data


def rows_of(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _check_array(name: str, value) -> None:
    """One array of a fit: rows first, numbers only (strings and 0-d values refused, saying what to do)."""
    if np.ndim(value) == 0:
        raise TypeError(f"fit: {name} must hold one row per sample, got a 0-d {type(value).__name__} ({value!r:.40}); "
                        f"for one sample pass a batch of one, e.g. np.array([[...]])")
    kind = np.asarray(value).dtype.kind if isinstance(value, (np.ndarray, list, tuple)) else ""
    if kind in "USO" and kind:
        what = ("labels: encode them as integer ids first, e.g. classes, y = np.unique(y, return_inverse=True)"
                if name == "y" else "features: encode them as numbers first (ids for an embedding, or one-hot)")
        raise TypeError(f"fit: {name} holds {'strings' if kind in 'US' else 'Python objects'} "
                        f"({np.asarray(value).dtype}), not numbers; {what}")


def check_arrays(x, y, batch_size, epochs, features: int | None = None) -> None:
    """Clear errors for inputs a fit cannot use; ``features``: what the model's first layer takes."""
    check_count("batch_size", batch_size, 1, "a batch holds at least one row")
    check_count("epochs", epochs, 1, "no step would run")
    if y is None:
        return
    _check_array("y", y)
    n = len(y)
    check_nonempty("y", n)
    columns = x.items() if isinstance(x, dict) else [("x", x)]
    for key, value in columns:
        _check_array(key if isinstance(x, dict) else "x", value)
        if len(value) != n:
            raise ValueError(f"inputs {key!r} have {len(value)} rows but the targets have {n}")
    if features is not None and not isinstance(x, dict) and np.ndim(x) == 2 and np.shape(x)[1] != features:
        raise ValueError(f"fit: x has {np.shape(x)[1]} features (columns) but the model's first layer takes "
                         f"{features}; pass the columns the model was built for, or build it for "
                         f"{np.shape(x)[1]} inputs")


def batches(x, y, *, batch_size, shuffle, rng, epoch, skip_rows, skip_positions, drop_last=False,
            whole=False) -> Iterator[Batch]:
    """Yield the batches of one epoch, leaving out what a rollback implicated.

    ``whole``: the model's batch is not a set of independent rows (a full-graph GNN): a batch that
    holds a left-out row is left out whole, never trimmed.
    """
    if y is None:  # a DataLoader, a tf.data.Dataset, or any iterable of (x, y)
        for i, item in enumerate(x):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError("a dataset must yield (inputs, targets) pairs")
            if (epoch, i) not in skip_positions:
                yield Batch(i, item[0], item[1], None)
        return
    n = len(y)
    order = rng.permutation(n) if shuffle else np.arange(n)
    skipped = np.fromiter(skip_rows, dtype=np.int64) if skip_rows else None
    if skip_rows and not whole:
        order = order[~np.isin(order, skipped)]
    if skip_rows and (order.size == 0 or (whole and all(np.isin(order[i : i + batch_size], skipped).any()
                                                        for i in range(0, len(order), batch_size)))):
        raise ValueError("every row has been left out after rollbacks (rows with non-finite values" +
                         (", and the batches that hold them: the model's rows depend on each other" if whole else "") +
                         "): the data cannot be trained on as they are (check them with stabilize.audit / "
                         "stabilize.check_finite)")
    x_arr = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
    y_arr = np.asarray(y)
    in_order = not shuffle and not skip_rows  # batches are then views of the arrays, not copies
    for i, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        if whole and skip_rows and np.isin(idx, skipped).any():
            continue
        take = slice(start, start + len(idx)) if in_order else idx
        xb = {k: v[take] for k, v in x_arr.items()} if isinstance(x_arr, dict) else x_arr[take]
        yield Batch(i, xb, y_arr[take], idx)


def nonfinite_rows(xb, yb) -> np.ndarray:
    """A mask of the batch's rows whose inputs or targets hold a non-finite value (host arrays)."""
    parts = list(xb.values()) if isinstance(xb, dict) else [xb]
    mask = np.zeros(len(np.asarray(yb)), dtype=bool)
    for part in parts + [yb]:
        a = np.asarray(part)
        if a.dtype.kind in "fc" and a.ndim:
            mask |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return mask


def batch_finite(B, *trees) -> bool:
    """Whether every floating value of a batch (tensors, arrays, nested dicts/lists) is finite:
    one read, made only after a step has failed."""
    from .ops import _leaves

    tensors = []
    for tree in trees:
        for _, leaf in _leaves(tree):
            t = leaf if B.is_tensor(leaf) else B.convert(np.asarray(leaf)) if np.asarray(leaf).dtype.kind == "f" else None
            if t is not None and B.dtype(t) in ("float16", "bfloat16", "float32", "float64"):
                tensors.append(t)
    return not tensors or bool(B.read(B.stack([B.all_finite(tensors)], "float64"))[0])
