"""Replay one failing torch step with every operation checked (diagnosis only).

A ``TorchFunctionMode`` scoped to the replay records each call of the user's
code (``torch.sqrt``, ``Tensor.__truediv__``, ``F.linear``...) with the source
line that made it; a hook on each recorded autograd node then watches the
backward pass. Nothing here is installed outside :func:`trace`: a healthy step
runs with no mode and no hook (tests/test_diagnosis_trace.py counts them).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.overrides import TorchFunctionMode, resolve_name

from .ops import SOFTMAX, OpEvent, canonical, ctc_infeasible, error_frame, leaves, source_line, user_frame

__all__ = ["trace"]


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    return out


def _np(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def _finite(t) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() else True


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


_HALF = (torch.float16, torch.bfloat16)


def _widen(v):
    return v.float() if isinstance(v, torch.Tensor) and v.dtype in _HALF else v


class _Recorder(TorchFunctionMode):
    def __init__(self, paths, stop):
        super().__init__()
        self.paths, self.stage, self.count, self.stop = paths, "model", 0, stop
        self.nodes: dict = {}  # autograd node -> (name, inputs, frame, module, stage)
        self.forward: OpEvent | None = None
        self.underflow: OpEvent | None = None  # the first half-precision op that flushed values to 0
        self.seen: list = []  # canonical op names, in order (capped)
        self.dtypes: set = set()

    def _underflow(self, name, func, args, kwargs, outs, scalars, frame, module):
        """A half-precision op whose result has zeros that float32 does not have: a literal
        (an epsilon) below the dtype's range, or products and squares that underflow."""
        dtype = outs[0].dtype
        tiny = [v for v in scalars if v != 0 and float(torch.tensor(v, dtype=dtype)) == 0.0]
        lost = 0
        if not tiny and not name.endswith("_"):
            try:
                with torch.no_grad():
                    wide = func(*[_widen(a) for a in args], **{k: _widen(v) for k, v in kwargs.items()})
                wide = _tensors(wide, [])
                if len(wide) == len(outs):
                    lost = sum(int(((o == 0) & (w != 0) & torch.isfinite(w)).sum()) for o, w in zip(outs, wide)
                               if isinstance(w, torch.Tensor) and w.shape == o.shape)
            except Exception:  # noqa: BLE001 - only evidence
                return
        if tiny or lost:
            ev = OpEvent(name=name, op=canonical(name), phase="forward", file=frame[0], line=frame[1],
                         function=frame[2], module=module, stage=self.stage, output_dtype=_dtype(outs[0]),
                         source=source_line(frame[0], frame[1]))
            ev.extra["underflow"] = (f"the constant {tiny[0]:g} is 0 in {ev.output_dtype}" if tiny else
                                     f"{lost} value(s) are 0 in {ev.output_dtype} but not in float32")
            self.underflow = ev

    def _module(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            obj = f.f_locals.get("self") if f.f_code.co_name in ("forward", "_call_impl") else None
            if obj is not None and id(obj) in self.paths and self.paths[id(obj)]:
                return self.paths[id(obj)]
            f = f.f_back
        return ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in _tensors(out, []) if t.is_floating_point()]
        if not outs:
            return out
        self.count += 1
        name = resolve_name(func) or getattr(func, "__name__", repr(func))
        ins = _tensors((args, kwargs), [])
        scalars = [float(v) for v in list(args) + list(kwargs.values()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for t in outs:
            self.dtypes.add(_dtype(t))
        frame, module = user_frame(2, self.stop), self._module()
        if len(self.seen) < 10000:
            self.seen.append(canonical(name))
        for t in outs:
            if t.grad_fn is not None:
                self.nodes[t.grad_fn] = (name, ins, scalars, frame, module, self.stage, t)
        if self.forward is None and self.underflow is None and outs[0].dtype in _HALF:
            self._underflow(name, func, args, kwargs, outs, scalars, frame, module)
        if self.forward is None and not all(_finite(t) for t in outs):
            nan_out = any(bool(torch.isnan(t).any()) for t in outs)
            nan_in = any(bool(torch.isnan(t).any()) for t in ins if t.is_floating_point()) or any(v != v for v in scalars)
            inf_in = not all(_finite(t) for t in ins) or any(abs(v) == float("inf") for v in scalars)
            if (nan_out and not nan_in) or not inf_in:
                self.forward = _event(name, "forward", ins, scalars, frame, module, self.stage, outs[0], func, args, kwargs)
        return out


def _event(name, phase, ins, scalars, frame, module, stage, out, func=None, args=(), kwargs=None):
    floats = [t for t in ins if t.is_floating_point()]
    ev = OpEvent(name=name, op=canonical(name), phase=phase, file=frame[0], line=frame[1], function=frame[2],
                 module=module, stage=stage, inputs=[_np(t) for t in floats], dtypes=[_dtype(t) for t in floats],
                 scalars=scalars, masks=[_np(t) for t in ins if t.dtype == torch.bool], output_dtype=_dtype(out),
                 source=source_line(frame[0], frame[1]))
    if ev.op == "ctc_loss" and func is not None:
        _ctc_evidence(ev, args, kwargs)
    if floats and tuple(out.shape) == tuple(floats[0].shape):
        ev.where = ~np.isfinite(_np(out))
    if ev.op in SOFTMAX and out.dim():
        bad = ~np.isfinite(_np(out)).reshape(-1, out.shape[-1])
        ev.bad_rows = int(bad.all(axis=1).sum())
    if ev.op in ("std", "var") and floats and out.numel():
        ev.extra["n"] = floats[0].numel() // out.numel()
    if ev.output_dtype in ("float16", "bfloat16") and floats and func is not None and not name.endswith("_"):
        from ..backends.base import FLOAT_INFO

        ev.extra["largest |input|"] = float(max(np.nanmax(np.abs(a)) if a.size else 0.0 for a in ev.inputs))
        ev.extra["dtype max"] = FLOAT_INFO[ev.output_dtype].max
        wide = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        try:
            with torch.no_grad():
                again = func(*[wide(a) for a in args], **{k: wide(v) for k, v in (kwargs or {}).items()})
            ev.extra["finite in float32"] = all(_finite(t) for t in _tensors(again, []))
        except Exception:  # noqa: BLE001 - the re-run is only extra evidence
            pass
    return ev


def _ctc_evidence(ev, args, kwargs) -> None:
    """Which rows' targets cannot be aligned to their inputs (``F.ctc_loss``'s arguments)."""
    names = ("log_probs", "targets", "input_lengths", "target_lengths", "blank")
    bound = dict(zip(names, args), **kwargs)
    try:
        as_np = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
        ev.extra["infeasible"] = ctc_infeasible(as_np(bound["targets"]), as_np(bound["input_lengths"]),
                                                as_np(bound["target_lengths"]), int(bound.get("blank", 0)))
    except (KeyError, TypeError, ValueError):
        pass


def trace(model, loss_fn, x, y) -> dict:
    """Forward, loss and backward of one batch with every operation checked."""
    paths = {id(m): n for n, m in model.named_modules()} if isinstance(model, torch.nn.Module) else {}
    rec = _Recorder(paths, sys._getframe())
    result: dict = {"error": None, "backward": None, "loss": float("nan"), "pred_leaves": [], "param_grads": []}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if paths else []
    result["param_dtype"] = _dtype(params[0][1]) if params else "float32"
    result["recurrent"] = any(isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase)) for m in model.modules()) if paths else False
    result["id_ranges"] = [(n, m.num_embeddings) for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Embedding)] if paths else []
    handles = []
    try:
        with torch.enable_grad():
            with rec:
                pred = model(x)
                pred_leaves = [(p, t) for p, t in leaves(pred) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                result["pred_leaves"] = [(p, _np(t), _dtype(t)) for p, t in pred_leaves]
                rec.stage = "loss"
                loss = loss_fn(pred, y)
            result["loss"] = float(_np(loss).sum()) if isinstance(loss, torch.Tensor) else float(loss)

            def watch(node, info):
                def hook(grad_inputs, grad_outputs):
                    if result["backward"] is not None:
                        return
                    g_out = [g for g in grad_outputs if g is not None]
                    g_in = [g for g in grad_inputs if g is not None]
                    if all(_finite(g) for g in g_out) and not all(_finite(g) for g in g_in):
                        name, ins, scalars, frame, module, stage, out = info
                        ev = _event(name, "backward", ins, scalars, frame, module, stage, out)
                        bad = next(g for g in g_in if not _finite(g))
                        floats = [t for t in ins if t.is_floating_point()]
                        ev.where = ~np.isfinite(_np(bad)) if floats and tuple(bad.shape) == tuple(floats[0].shape) else None
                        ev.output_nonfinite = not _finite(out)
                        result["backward"] = ev
                return hook

            handles = [node.register_hook(watch(node, info)) for node, info in rec.nodes.items()]
            targets = [t for _, t in pred_leaves if t.requires_grad] + [p for _, p in params]
            if isinstance(loss, torch.Tensor) and loss.requires_grad and targets:
                grads = torch.autograd.grad(loss.sum(), targets, allow_unused=True)
            else:
                grads = [None] * len(targets)
            n = len(targets) - len(params)
            result["pred_grad"] = None if not n or grads[0] is None else _np(grads[0])
            result["param_grads"] = [(name, None if g is None else _np(g)) for (name, _), g in zip(params, grads[n:])]
    except Exception as exc:  # noqa: BLE001 - a replay that raises is evidence, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:400]
        result["error_at"] = error_frame(exc)
    finally:
        for h in handles:
            h.remove()
    result["forward"] = rec.forward
    result["underflow"] = rec.underflow
    result["seen_ops"] = rec.seen
    result["n_ops"] = rec.count
    result["op_dtypes"] = rec.dtypes
    result["params"] = [(n, _np(p)) for n, p in params]
    return result
