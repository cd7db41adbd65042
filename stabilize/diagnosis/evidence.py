"""The facts a diagnosis rests on: the batch, the labels, the run's history,
the optimizer's settings, and the op-level replay of the failing step.

Everything is read once into :class:`Evidence`; the rules (``rules.py``) only
compare its fields. ``shown`` holds what the report prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backends.base import FLOAT_INFO
from .ops import SINGULAR, SOFTMAX, OpEvent

__all__ = ["Evidence", "gather_batch", "gather_ids", "gather_history", "gather_optimizer", "singular_inputs"]


@dataclass
class Evidence:
    shown: dict = field(default_factory=dict)
    X: np.ndarray | None = None
    x_integer: bool = False
    bad_x: bool = False
    bad_y: bool = False
    whole_bad_columns: list = field(default_factory=list)
    labels_out_of_range: int = 0
    trace: dict = field(default_factory=dict)
    fwd: OpEvent | None = None
    bwd: OpEvent | None = None
    loss_finite: bool = True
    pred: np.ndarray | None = None
    pred_grad: np.ndarray | None = None
    lr: float = 0.0
    weight_decay: float = 0.0
    eps: float | None = None
    param_dtype: str = "float32"
    growth: float = 1.0
    update_ratio: float = 0.0
    grad_growth: float = 1.0
    grad_spike: float = 1.0
    recurrent: bool = False
    params_finite: bool = True
    underflow: OpEvent | None = None  # the first half-precision op that flushed values to 0
    seen_ops: list = field(default_factory=list)
    bad_ids: dict = field(default_factory=dict)  # {"values": [...], "rows": [...], "range": n, "where": ...}


def _array(v):
    a = np.asarray(v)
    return a.astype(np.float64) if a.dtype.kind in "fc" or a.dtype.kind == "V" else a


def _columns(x) -> np.ndarray | None:
    if isinstance(x, dict):
        cols = [np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in x.values()]
        return np.concatenate(cols, axis=1)
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1) if x.ndim else None


def gather_batch(E: Evidence, xn, yn, num_classes: int | None) -> None:
    """Non-finite cells, integer (token id) inputs, labels against the number of classes."""
    raw = list(xn.values()) if isinstance(xn, dict) else [xn]
    E.x_integer = all(np.asarray(v).dtype.kind in "iub" for v in raw)
    E.X = _columns(xn)
    yarr = np.asarray(yn)
    E.bad_x = E.X is not None and not bool(np.all(np.isfinite(E.X)))
    E.bad_y = yarr.dtype.kind == "f" and not bool(np.all(np.isfinite(yarr)))
    if E.bad_x:
        bad = ~np.isfinite(E.X)
        E.whole_bad_columns = [int(c) for c in np.flatnonzero(bad.all(axis=0))] if len(E.X) > 1 else []
        E.shown["rows with a non-finite input"] = f"{int(bad.any(axis=1).sum())} of {len(E.X)}"
        if E.whole_bad_columns:
            E.shown["input columns non-finite in every row"] = E.whole_bad_columns
    if num_classes and yarr.size and (yarr.dtype.kind in "iu" or (yarr.dtype.kind == "f" and E.bad_y is False
                                                                   and np.all(yarr == np.round(yarr)) and yarr.ndim == 1)):
        labels = yarr.astype(np.int64)
        out = (labels < 0) | (labels >= num_classes)
        E.labels_out_of_range = int(out.sum())
        E.shown["label range"] = f"[{int(labels.min())}, {int(labels.max())}] for {num_classes} classes"
        if E.labels_out_of_range:
            E.shown["labels outside [0, classes)"] = E.labels_out_of_range
            E.bad_ids = _offending(labels, out, num_classes, "labels")


def _offending(values: np.ndarray, out: np.ndarray, n: int, what: str) -> dict:
    rows = np.flatnonzero(out.reshape(len(out), -1).any(axis=1)) if out.ndim else np.zeros(0, dtype=int)
    found = {"what": what, "values": sorted({int(v) for v in values[out]})[:10], "rows": [int(r) for r in rows[:20]],
             "n_rows": int(rows.size), "range": int(n)}
    return found


def gather_ids(E: Evidence, xn, id_ranges) -> None:
    """Integer inputs against the embeddings' sizes: the ids out of range, their values and rows."""
    if not id_ranges or not E.x_integer:
        return
    size = min(n for _, n in id_ranges) if len(id_ranges) == 1 else max(n for _, n in id_ranges)
    where = next(name for name, n in id_ranges if n == size)
    for part in (list(xn.values()) if isinstance(xn, dict) else [xn]):
        ids = np.asarray(part).astype(np.int64)
        out = (ids < 0) | (ids >= size)
        if ids.size and out.any():
            E.bad_ids = dict(_offending(ids, out, size, "ids"), where=where)
            E.shown["input ids outside the embedding"] = f"{int(out.sum())} ids (values {E.bad_ids['values']}) " \
                                                       f"in rows {E.bad_ids['rows']}; {where} holds {size}"
            return


def gather_history(E: Evidence, step, lr, losses, grad_norms, weights_norm) -> None:
    recent = np.asarray(losses[max(0, step - 5): step + 1], dtype=np.float64)
    ok = recent[np.isfinite(recent) & (recent > 0)]
    E.growth = float(np.exp(np.mean(np.diff(np.log(ok))))) if ok.size >= 2 else 1.0
    E.shown["loss growth per step (last steps)"] = E.growth
    good = np.asarray(grad_norms[:step], dtype=np.float64)
    good = good[np.isfinite(good)]
    if good.size and weights_norm:
        E.update_ratio = float(lr * good[-1] / weights_norm)
        E.shown["update/weight ratio (last good step)"] = E.update_ratio
    if good.size >= 2 and good[0] > 0:
        E.grad_growth = float(good[-1] / good[0])
        E.shown["gradient-norm growth since step 0"] = E.grad_growth
        E.grad_spike = float(good.max() / max(np.median(good), 1e-300))
        E.shown["largest gradient norm / median"] = E.grad_spike
    E.lr = float(lr)
    E.shown["learning rate"] = E.lr


def gather_optimizer(E: Evidence, optimizer, weight_decay, eps) -> None:
    """Weight decay and epsilon from the arguments, else from a torch or Keras optimizer."""
    if optimizer is not None:
        groups = getattr(optimizer, "param_groups", None)
        if groups:  # torch
            weight_decay = groups[0].get("weight_decay", 0.0) if weight_decay is None else weight_decay
            eps = groups[0].get("eps") if eps is None else eps
        else:  # keras
            wd = getattr(optimizer, "weight_decay", None)
            weight_decay = (float(wd) if wd is not None else 0.0) if weight_decay is None else weight_decay
            eps = getattr(optimizer, "epsilon", None) if eps is None else eps
    E.weight_decay = float(weight_decay or 0.0)
    E.eps = None if eps is None else float(eps)
    if E.weight_decay:
        E.shown["weight decay"] = E.weight_decay
        E.shown["lr * weight decay"] = E.lr * E.weight_decay
    if E.eps is not None:
        E.shown["optimizer epsilon"] = E.eps


def singular_inputs(ev: OpEvent) -> bool:
    """Were the op's offending inputs at its singular or out-of-domain points?"""
    if ev is None or ev.op not in SINGULAR or not ev.inputs:
        return False
    x = ev.offending()
    p = ev.scalars[-1] if ev.scalars else None
    if ev.op == "div":
        den = ev.inputs[1] if len(ev.inputs) > 1 else (np.asarray(ev.scalars[-1:]) if ev.scalars else x)
        return bool(np.any(den == 0)) or (ev.name.endswith("reciprocal") and bool(np.any(x == 0)))
    if ev.op in ("acos", "asin", "atanh"):
        return bool(np.any(np.abs(x) >= 1))
    if ev.op in ("std", "var"):
        return ev.extra.get("n", 2) <= 1 or bool(np.any(np.ptp(ev.inputs[0]) == 0)) if ev.inputs[0].size else True
    if ev.op == "pow":
        if p is None:
            return bool(np.any(x <= 0))
        return (p < 1 and bool(np.any(x == 0))) or (p != int(p) and bool(np.any(x < 0)))
    return bool(np.any(x <= 0)) if ev.op != "log1p" else bool(np.any(x <= -1))


def is_overflow(ev: OpEvent) -> bool:
    """An op whose output went to ±inf from finite, moderate-domain inputs (not a singular point)."""
    if ev is None or (ev.output_nonfinite and ev.phase == "backward") or ev.op in SOFTMAX:
        return False
    if singular_inputs(ev):
        return False
    return all(bool(np.all(np.isfinite(a))) for a in ev.inputs)


def half(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16")


def eps_underflows(eps: float | None, dtype: str) -> bool:
    """Adam's epsilon below the dtype's smallest normal is 0 in practice (flushed or rounded)."""
    return eps is not None and half(dtype) and eps < FLOAT_INFO[dtype].tiny
