"""Replay one failing TensorFlow/Keras step eagerly with every operation checked.

An op callback (the mechanism of ``tf.debugging.enable_check_numerics``)
records each eager op of the model and the loss with the user's source line.
For the backward pass the gradient registry is wrapped, for the replay only,
so that each op's gradient function reports whether it turned finite incoming
gradients into non-finite input gradients. Both are removed before
:func:`trace` returns; a healthy step runs with neither.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_callbacks
from tensorflow.python.framework import ops as tf_ops

from .ops import SOFTMAX, OpEvent, canonical, error_frame, leaves, source_line, user_frame

__all__ = ["trace"]


def _np(t) -> np.ndarray:
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    return a.astype(np.float64) if a.dtype.kind == "f" or "float" in str(a.dtype) else a


def _is_float(t) -> bool:
    return getattr(t, "dtype", None) is not None and tf.as_dtype(t.dtype).is_floating


def _finite(t) -> bool:
    return bool(np.all(np.isfinite(_np(t)))) if _is_float(t) else True


def _layer_path() -> str:
    names, f = [], sys._getframe(3)
    while f is not None:
        obj = f.f_locals.get("self") if f.f_code.co_name == "__call__" else None
        if obj is not None and any(c.__name__ == "Layer" and c.__module__.startswith("keras") for c in type(obj).__mro__):
            if not names or names[-1] != obj.name:
                names.append(obj.name)
        f = f.f_back
    return "/".join(reversed(names[:-1] if len(names) > 1 else names))


_HALF = ("float16", "bfloat16")
_ADDS = ("Add", "AddV2", "Sub", "Maximum")
_PRODUCTS = {"Mul": lambda a, b: a * b, "Square": lambda a: a * a}


def _underflow(op_type, inputs, outs) -> str | None:
    """Why a half-precision op's result holds zeros float32 would not: a constant that is 0 in
    the dtype (an epsilon added or taken the maximum with), or products and squares below its range."""
    floats = [_np(t) for t in inputs if _is_float(t)]
    if op_type in _ADDS and len(floats) == 2 and any(a.size == 1 and float(a.ravel()[0]) == 0.0 for a in floats) \
            and not all(a.size == 1 for a in floats):
        return "a constant that is 0 in this dtype (an epsilon below its range?)"
    if op_type in _PRODUCTS and len(floats) == len(inputs):
        with np.errstate(all="ignore"):
            exact = _PRODUCTS[op_type](*floats)
        lost = int(np.sum((_np(outs[0]) == 0) & (exact != 0)))
        return f"{lost} value(s) are 0 in this dtype but not in float32" if lost else None
    return None


class _Recorder:
    def __init__(self, stop=None):
        self.on, self.busy, self.stage, self.count, self.stop = True, False, "model", 0, stop
        self.by_output: dict = {}
        self.by_inputs: dict = {}
        self.forward: OpEvent | None = None
        self.backward: OpEvent | None = None
        self.underflow: OpEvent | None = None
        self.seen: list = []
        self.dtypes: set = set()

    def callback(self, op_type, inputs, attrs, outputs, op_name=None, graph=None):
        if not self.on or self.busy or graph is not None:
            return None
        self.busy = True
        try:
            op_type = op_type.decode() if isinstance(op_type, bytes) else op_type
            outs = [t for t in outputs if _is_float(t)]
            if outs:
                self.count += 1
                for t in outs:
                    self.dtypes.add(tf.as_dtype(t.dtype).name)
                if len(self.seen) < 10000:
                    self.seen.append(canonical(op_type))
                info = (op_type, list(inputs), user_frame(2, self.stop), _layer_path(), self.stage, outs[0])
                if self.forward is None and self.underflow is None and tf.as_dtype(outs[0].dtype).name in _HALF:
                    why = _underflow(op_type, inputs, outs)
                    if why:
                        self.underflow = _event(info, "forward")
                        self.underflow.extra["underflow"] = why.replace("this dtype", self.underflow.output_dtype)
                for t in outputs:
                    self.by_output[getattr(t, "_id", id(t))] = info
                self.by_inputs[(op_type, tuple(getattr(t, "_id", id(t)) for t in inputs))] = info
                if self.forward is None and not all(_finite(t) for t in outs):
                    nan_out = any(np.isnan(_np(t)).any() for t in outs)
                    nan_in = any(np.isnan(_np(t)).any() for t in inputs if _is_float(t))
                    if (nan_out and not nan_in) or all(_finite(t) for t in inputs):
                        self.forward = _event(info, "forward")
        finally:
            self.busy = False
        return None

    def find(self, op):
        for t in op.outputs or ():
            info = self.by_output.get(getattr(t, "_id", id(t)))
            if info is not None:
                return info
        if op.inputs is not None:
            return self.by_inputs.get((op.type, tuple(getattr(t, "_id", id(t)) for t in op.inputs)))
        return None


def _event(info, phase) -> OpEvent:
    op_type, ins, frame, module, stage, out = info
    floats = [t for t in ins if _is_float(t)]
    ev = OpEvent(name=f"tf.{op_type}", op=canonical(op_type), phase=phase, file=frame[0], line=frame[1],
                 function=frame[2], module=module, stage=stage, inputs=[_np(t) for t in floats],
                 dtypes=[tf.as_dtype(t.dtype).name for t in floats],
                 masks=[_np(t) for t in ins if getattr(t, "dtype", None) == tf.bool],
                 output_dtype=tf.as_dtype(out.dtype).name, source=source_line(frame[0], frame[1]))
    if ev.output_dtype in ("float16", "bfloat16") and any(a.size == 1 and np.isinf(a).all() for a in ev.inputs):
        ev.extra["overflowed constant"] = True  # a Python number converted to the dtype became ±inf
    if op_type == "Pow" and len(floats) == 2 and floats[1].shape.num_elements() == 1:
        ev.scalars = [float(_np(floats[1]).ravel()[0])]
        ev.inputs, ev.dtypes = ev.inputs[:1], ev.dtypes[:1]
    out_np = _np(out)
    if floats and out_np.shape == ev.inputs[0].shape:
        ev.where = ~np.isfinite(out_np)
    if ev.op in SOFTMAX and out_np.ndim:
        ev.bad_rows = int((~np.isfinite(out_np)).reshape(-1, out_np.shape[-1]).all(axis=1).sum())
    if ev.output_dtype in ("float16", "bfloat16") and ev.inputs:
        from ..backends.base import FLOAT_INFO

        ev.extra["largest |input|"] = float(max(np.nanmax(np.abs(a)) if a.size else 0.0 for a in ev.inputs))
        ev.extra["dtype max"] = FLOAT_INFO[ev.output_dtype].max
    return ev


class _Registry:
    """The gradient registry, each gradient function checked (see the module docstring)."""

    def __init__(self, inner, rec):
        self.inner, self.rec = inner, rec

    def lookup(self, name):
        fn = self.inner.lookup(name)
        if fn is None:
            return None
        rec = self.rec

        def checked(op, *grads):
            result = fn(op, *grads)
            if rec.backward is None:
                outs = result if isinstance(result, (list, tuple)) else [result]
                outs = [getattr(g, "values", g) for g in outs if g is not None]
                if all(_finite(g) for g in grads if g is not None) and not all(_finite(g) for g in outs):
                    info = rec.find(op)
                    if info is not None:
                        ev = _event(info, "backward")
                        bad = next(g for g in outs if not _finite(g))
                        ev.where = ~np.isfinite(_np(bad)) if ev.inputs and tuple(bad.shape) == ev.inputs[0].shape else None
                        ev.output_nonfinite = not _finite(info[5])
                        rec.backward = ev
            return result

        return checked

    def __getattr__(self, item):
        return getattr(self.inner, item)


def trace(model, loss_fn, x, y) -> dict:
    """Forward, loss and backward of one batch, eagerly, with every operation checked."""
    rec = _Recorder(sys._getframe())
    variables = list(getattr(model, "trainable_variables", []))
    params = [getattr(v, "value", v) for v in variables]
    names = [getattr(v, "path", None) or v.name for v in variables]
    result: dict = {"error": None, "loss": float("nan"), "pred_leaves": [], "param_grads": [], "pred_grad": None}
    result["param_dtype"] = tf.as_dtype(params[0].dtype).name if params else "float32"
    kinds = {type(layer).__name__ for layer in _all_layers(model)}
    result["recurrent"] = bool(kinds & {"SimpleRNN", "LSTM", "GRU", "RNN", "Bidirectional", "SimpleRNNCell", "LSTMCell", "GRUCell"})
    result["id_ranges"] = [(layer.name, int(layer.input_dim)) for layer in _all_layers(model)
                           if type(layer).__name__ == "Embedding"]
    registry = tf_ops._gradient_registry
    op_callbacks.add_op_callback(rec.callback)
    try:
        with tf.GradientTape() as tape:
            pred = model(x)
            pred_leaves = [(p, t) for p, t in leaves(pred) if tf.is_tensor(t) and _is_float(t)]
            result["pred_leaves"] = [(p, _np(t), tf.as_dtype(t.dtype).name) for p, t in pred_leaves]
            rec.stage = "loss"
            loss = loss_fn(pred, y)
        rec.on = False
        op_callbacks.remove_op_callback(rec.callback)
        result["loss"] = float(np.sum(_np(loss)))
        tf_ops._gradient_registry = _Registry(registry, rec)
        grads = tape.gradient(loss, [t for _, t in pred_leaves] + params)
        n = len(pred_leaves)
        result["pred_grad"] = _np(grads[0]) if n and grads[0] is not None else None
        result["param_grads"] = [(nm, None if g is None else _np(tf.convert_to_tensor(g))) for nm, g in zip(names, grads[n:])]
    except Exception as exc:  # noqa: BLE001 - a replay that raises is evidence, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:400]
        result["error_at"] = error_frame(exc)
    finally:
        tf_ops._gradient_registry = registry
        rec.on = False
        try:
            op_callbacks.remove_op_callback(rec.callback)
        except (KeyError, ValueError):
            pass
    result["forward"], result["backward"] = rec.forward, rec.backward
    result["underflow"], result["seen_ops"] = rec.underflow, rec.seen
    result["n_ops"], result["op_dtypes"] = rec.count, rec.dtypes
    result["params"] = [(nm, _np(p)) for nm, p in zip(names, params)]
    return result


def _all_layers(model):
    seen, stack = [], [model]
    while stack:
        layer = stack.pop()
        if any(layer is s for s in seen):
            continue
        seen.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
        for attr in ("layer", "forward_layer", "cell"):
            inner = getattr(layer, attr, None)
            if inner is not None and hasattr(inner, "name"):
                stack.append(inner)
    return seen
