"""``diagnose``: replay the failing step with every op checked, gather the
evidence, and let the first rule that fits name the cause.

Nothing here runs until a step has failed: the op tracing (``trace_torch``,
``trace_tf``) is installed for the replay only and removed before returning.
"""

from __future__ import annotations

import os

import numpy as np

from ..backends.base import FLOAT_INFO
from .ops import OpEvent, source_line
from .evidence import Evidence, gather_batch, gather_history, gather_ids, gather_optimizer
from .report import Diagnosis
from .rules import ADVICE, RULES, SAFE_CALL, half_first

__all__ = ["diagnose"]


def _to_np(B, v):
    if isinstance(v, dict):
        return {k: _to_np(B, t) for k, t in v.items()}
    a = B.to_numpy(v) if B.is_tensor(v) else np.asarray(v)
    return np.asarray(a)


def _trace(B, model, loss_fn, x, y) -> dict:
    if B.name == "torch":
        from .trace_torch import trace
    elif B.name == "tensorflow":
        from .trace_tf import trace
    else:
        return dict(_EMPTY, error=f"no op tracing for the {B.name} backend")
    xt = {k: B.convert(v) for k, v in x.items()} if isinstance(x, dict) else B.convert(x)
    return trace(model, loss_fn, xt, B.convert(y))


_EMPTY = {"error": None, "loss": float("nan"), "pred_leaves": [], "param_grads": [], "params": [],
          "forward": None, "backward": None, "n_ops": 0}


def _num_classes(trace, num_classes):
    if num_classes:
        return int(num_classes)
    for _, leaf, _ in trace.get("pred_leaves", []):
        if leaf.ndim >= 2 and leaf.shape[-1] > 1:
            return int(leaf.shape[-1])
    return None


def _overflowing_update(E: Evidence) -> str:
    """Every gradient is finite: the parameter whose update ``w - lr*g`` overflows, else the largest gradient."""
    largest, name_at = -1.0, "update"
    for (name, g), (_, w) in zip(E.trace.get("param_grads", []), E.trace.get("params", [])):
        if g is None:
            continue
        dtype = np.float64 if E.param_dtype == "float64" else np.float32
        with np.errstate(all="ignore"):
            if not np.all(np.isfinite(dtype(w) - dtype(E.lr) * dtype(g))):
                return f"{name} (update overflows)"
        peak = float(np.max(np.abs(g))) if g.size else 0.0
        if peak > largest:
            largest, name_at = peak, name
    return f"{name_at} (gradient norm overflows, |g| up to {largest:.3g})"


def _at(ev) -> str:
    return f" at {os.path.basename(ev.file)}:{ev.line}" if ev is not None and ev.file else ""


def _advice(cause: str, E: Evidence, ev) -> str:
    base = ADVICE[cause]
    where = _at(ev)
    if cause == "bad-labels" and E.bad_ids:
        b = E.bad_ids
        what = "input ids" if b["what"] == "ids" else "labels"
        into = f" ({b['where']} holds {b['range']})" if b.get("where") else ""
        return (f"{what} {b['values']} in rows {b['rows']}{' ...' if b['n_rows'] > len(b['rows']) else ''} are "
                f"outside [0, {b['range']}){into}; " + (base if what == "labels" else
                "map unknown tokens to an <unk> id, or enlarge the embedding to the tokenizer's vocabulary "
                "(model.resize_token_embeddings(len(tokenizer)))"))
    if cause == "ctc-infeasible" and ev is not None and ev.extra.get("infeasible"):
        return f"{ev.name}{where}: {ev.detail()}; " + base
    if cause == "low-precision" and half_first(E) and E.underflow is not None and ev is not None \
            and not ev.extra.get("overflowed constant"):
        u = E.underflow
        return (f"{u.name}{_at(u)} underflows first ({u.extra['underflow']}), then {ev.name}{where} meets "
                f"{ev.detail()}: compute that part in float32 (.float() / tf.cast(x, 'float32'), then cast back), "
                f"or use an epsilon {ev.output_dtype} holds (>= 1e-4); stabilize.safe_div would hide a precision "
                f"loss, not cure it")
    if cause == "low-precision" and ev is not None and ev.extra.get("overflowed constant"):
        return (f"{ev.name}{where} takes a constant that is ±inf in {ev.output_dtype} (a mask value such as -1e10 "
                f"or -1e9; float16 holds up to 65504): use -1e4 or torch.finfo(dtype).min once, a boolean mask "
                f"(stabilize.masked_softmax), or compute the masked softmax in float32")
    if cause == "log-zero" and _after_sigmoid(E):
        return (f"{ev.name if ev is not None else 'log'}{where} takes the log of a sigmoid that saturated to "
                f"exactly 0 or 1: compute the loss from the logits: torch F.binary_cross_entropy_with_logits / "
                f"F.logsigmoid, Keras tf.nn.sigmoid_cross_entropy_with_logits / BinaryCrossentropy(from_logits=True)")
    if cause in ("empty-mean", "exp-overflow") and ev is not None:
        return f"{ev.name}{where} ({ev.detail()}); " + base
    if cause == "singular-op" and ev is not None and ev.op in SAFE_CALL:
        return f"use {SAFE_CALL[ev.op]} instead of {ev.name}{where}; " + base
    if cause == "log-zero" and E.pred is not None and (E.pred.ndim == 1 or E.pred.shape[-1] == 1):
        return (f"one output per sample is the binary case{where}: compute the loss from the logits, "
                "torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) (Keras: "
                "keras.losses.BinaryCrossentropy(from_logits=True)), not log(sigmoid(z)); a clip of the "
                "probability keeps the loss finite but zeroes its gradient")
    if cause == "masked-softmax" and ev is not None:
        return f"{ev.name}{where} has rows with every entry masked; " + base
    if cause == "low-precision" and ev is None and E.eps is not None:
        tiny = FLOAT_INFO[E.param_dtype].tiny
        return (f"the optimizer epsilon {E.eps:g} is below the smallest normal {E.param_dtype} ({tiny:.3g}) and "
                f"acts as 0, so m/(sqrt(v)+eps) divides by 0: use eps >= 1e-4 with {E.param_dtype} parameters, "
                f"or keep float32 master weights (torch.autocast + GradScaler, keras mixed_float16)")
    if cause == "low-precision" and ev is not None:
        return f"{ev.name}{where} overflows {ev.output_dtype}; " + base
    if cause == "dirty-data" and E.whole_bad_columns:
        return (f"input column(s) {E.whole_bad_columns} are non-finite in every row: a constant column scaled "
                f"by min-max (max - min = 0) or by its std gives 0/0; fix or drop that column (sklearn's "
                f"MinMaxScaler/StandardScaler keep constant columns finite), do not drop rows; "
                f"stabilize.check_finite(data) names the cells")
    if cause == "weight-decay":
        return f"lr * weight_decay = {E.lr * E.weight_decay:g}; " + base
    return base


def _after_sigmoid(E: Evidence) -> bool:
    """Was the log's input (the first log in the replay) preceded by a sigmoid?"""
    ops = E.seen_ops
    first_log = next((i for i, op in enumerate(ops) if op in ("log", "log1p")), None)
    return first_log is not None and "sigmoid" in ops[:first_log]


def _pick(cause: str, E: Evidence):
    from .evidence import singular_inputs
    from .ops import SOFTMAX

    events = [e for e in (E.fwd, E.bwd) if e is not None]
    if cause in ("dirty-data", "weight-decay", "high-lr", "unscaled-inputs", "huge-targets") and not events:
        return None
    if cause == "masked-softmax":
        return next(e for e in events if e.op in SOFTMAX)
    if cause == "ctc-infeasible":
        return next(e for e in events if e.op == "ctc_loss")
    if cause == "low-precision" and half_first(E):
        return E.fwd if E.fwd is not None else E.bwd
    if cause == "singular-op":
        return E.fwd if E.fwd is not None and singular_inputs(E.fwd) else E.bwd
    if cause == "masked-loss":
        return E.bwd or E.fwd
    return events[0] if events else None


def diagnose(B, model, loss_fn, x, y, *, step: int, batch_index: int, lr: float, losses, grad_norms,
             weights_norm: float | None = None, optimizer=None, weight_decay: float | None = None,
             eps: float | None = None, num_classes: int | None = None) -> Diagnosis:
    """Replay the failing step and name its cause (see ``stabilize.diagnosis.rules``).

    Args:
        B: the backend; ``model``/``loss_fn``: as trained, holding the pre-step weights.
        x, y: the failing batch (numpy or tensors; ``model(x)`` may return a tensor,
            tuple, list, dict, dataclass or ``ModelOutput``).
        step, batch_index, lr: where and at what rate it failed.
        losses, grad_norms: the run's per-step history up to and including this step.
        weights_norm: the global weight norm before the step (for the update ratio).
        optimizer: the torch or Keras optimizer (its weight decay and epsilon are read).
        weight_decay, eps: the same, given directly (they win over ``optimizer``).
        num_classes: for classification labels (default: the output's last dimension).

    Returns:
        A :class:`Diagnosis`. It never raises for a failure of the user's code: a
        replay that raises is reported with the error as evidence.
    """
    E = Evidence()
    xn, yn = _to_np(B, x), _to_np(B, y)
    gather_batch(E, xn, yn, num_classes)
    dirty = E.bad_x or E.bad_y
    E.trace = trace = _EMPTY if dirty else _trace(B, model, loss_fn, x, y)
    if not dirty:
        gather_batch(E, xn, yn, _num_classes(trace, num_classes))
    E.fwd, E.bwd = trace.get("forward"), trace.get("backward")
    E.underflow, E.seen_ops = trace.get("underflow"), trace.get("seen_ops", [])
    broken = [n for n, w in trace.get("params", []) if not np.all(np.isfinite(w))]
    E.params_finite = not broken
    if broken:  # an update was applied before it could be checked (a native optimizer, no snapshot)
        E.shown["parameters already non-finite at the replay"] = broken[:5]
    gather_ids(E, xn, trace.get("id_ranges"))
    if E.underflow is not None:
        E.shown["first half-precision underflow"] = f"{E.underflow.line_text()}: {E.underflow.extra['underflow']}"
    E.loss_finite = bool(np.isfinite(trace["loss"]))
    E.param_dtype = trace.get("param_dtype", "float32")
    E.recurrent = bool(trace.get("recurrent"))
    leaves_ = trace.get("pred_leaves", [])
    first_bad = next((p for p, a, _ in leaves_ if not np.all(np.isfinite(a))), None)
    E.pred = leaves_[0][1] if leaves_ else None
    E.pred_grad = trace.get("pred_grad")
    E.shown["loss"] = float(trace["loss"])
    if trace.get("error"):
        E.shown["replay raised"] = trace["error"]
    if first_bad is not None:
        E.shown["first non-finite model output"] = first_bad
    if E.fwd is not None:
        E.shown["first non-finite op (forward)"] = E.fwd.line_text()
    if E.bwd is not None:
        E.shown["first non-finite op (backward)"] = E.bwd.line_text()
    E.shown["ops traced"] = trace.get("n_ops", 0)
    yarr = np.asarray(yn)
    if yarr.dtype.kind == "f" and yarr.size and np.all(np.isfinite(yarr)):
        E.shown["target RMS"] = float(np.sqrt(np.mean(yarr.astype(np.float64) ** 2)))
    gather_history(E, step, lr, losses, grad_norms, weights_norm)
    gather_optimizer(E, optimizer, weight_decay, eps)
    if E.fwd is None and E.bwd is None and E.loss_finite and not trace.get("error"):
        E.shown["overflowing update"] = _overflowing_update(E)
    if E.recurrent:
        E.shown["recurrent layers"] = True
    if E.x_integer:
        E.shown["integer inputs (ids, not scaled features)"] = True

    rule = next(r for r in RULES if r.applies(E))
    ev = _pick(rule.name, E)
    if ev is None and trace.get("error_at"):  # the step raised: where, in the user's code
        file, line, function = trace["error_at"]
        kind = trace["error"].split(":", 1)[0]
        ev = OpEvent(name=kind, op="raise", phase="forward", file=file, line=line, function=function,
                     stage="loss" if function and "loss" in function else "model", source=source_line(file, line))
        ev.extra["error"] = trace["error"]
    if rule.name == "dirty-data":
        origin, phase = "input batch", "forward"
    elif ev is not None:
        origin = ev.module or ("loss" if ev.stage == "loss" else "model")
        phase = "backward" if rule.name == "masked-loss" else ev.phase
    elif rule.name == "low-precision":
        origin, phase = f"optimizer update ({E.param_dtype} parameters, epsilon {E.eps})", "backward"
        E.shown.pop("overflowing update", None)  # every gradient is finite and small: the division is the fault
    elif rule.name == "bad-labels" and E.bad_ids.get("what") == "ids":
        origin, phase = f"embedding {E.bad_ids.get('where', '')!r} (input ids)", "forward"
    elif "overflowing update" in E.shown:
        origin, phase = E.shown["overflowing update"], "backward"
    else:
        origin, phase = ("loss", "forward") if not E.loss_finite else ("loss", "backward")
    if rule.name == "dirty-data":
        _dirty_cells(E, xn, yn)
    elif rule.name == "log-zero":
        _log_inputs(E)
    elif rule.name == "masked-loss":
        E.shown["finite loss over non-finite gradients"] = True
        if E.pred_grad is not None:
            E.shown["non-finite d loss / d prediction elements"] = int((~np.isfinite(E.pred_grad)).sum())
        E.shown["parameters with non-finite gradients"] = sum(
            1 for _, g in trace.get("param_grads", []) if g is not None and not np.all(np.isfinite(g)))
    return Diagnosis(rule.name, step, batch_index, origin, phase, E.shown, _advice(rule.name, E, ev),
                     ev if rule.name != "dirty-data" else None)


def _log_inputs(E: Evidence) -> None:
    """The smallest softmax probability (or prediction) that the log met."""
    pred = E.pred
    if pred is None or not np.all(np.isfinite(pred)):
        return
    E.shown["predictions finite"] = True
    if pred.ndim == 2 and pred.shape[1] > 1:
        z = pred - pred.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        dtype = E.fwd.output_dtype if E.fwd is not None else "float32"
        E.shown["log input minimum (softmax probability)"] = float(p.min())
        E.shown["probabilities that underflow to 0 in " + dtype] = int((p < FLOAT_INFO.get(dtype, FLOAT_INFO["float32"]).tiny).sum())
    else:
        E.shown["prediction minimum"] = float(pred.min())


def _dirty_cells(E: Evidence, xn, yn) -> None:
    from ..finite import check_finite

    report = check_finite({"x": E.X, "y": np.asarray(yn)}, name="batch", raise_error=False)
    for leaf in report.bad:
        E.shown[f"{leaf.path} non-finite"] = f"{leaf.n_nan} NaN, {leaf.n_posinf} +inf, {leaf.n_neginf} -inf at {leaf.positions}"
