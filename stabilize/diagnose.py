"""Name the cause, the layer and the fix when a training step goes non-finite.

Nothing here runs until a step has failed. Then the failing step is replayed
from its pre-step state with every layer's output and gradient kept (see
``Backend.trace_layers``); always-on per-layer hooks are what make
``torch.autograd.detect_anomaly`` slow. The replay and the history give the
evidence, and the first rule that the evidence meets names the cause:

1. ``dirty-data``: the batch itself holds NaN/Inf.
2. ``log-zero``: predictions finite, loss not (a log or division met 0);
   evidence: the smallest softmax probability or prediction.
3. ``masked-loss``: loss finite, but its gradient w.r.t. the finite
   predictions is not (a ``where`` hid the value but not its gradient).
4. ``unscaled-inputs``: input features with mean or standard deviation beyond
   ``SCALE_LIMIT``, or ranges differing by orders of magnitude (seed 000).
5. ``huge-targets``: targets whose RMS exceeds ``TARGET_LIMIT`` (seed 002).
6. ``high-lr``: the last good update was large next to the weights, or the
   loss grew by orders of magnitude per step.
7. ``exploding-gradients``: anything else that overflowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CAUSES", "ADVICE", "Diagnosis", "diagnose", "SCALE_LIMIT", "TARGET_LIMIT"]

CAUSES = ("dirty-data", "log-zero", "masked-loss", "unscaled-inputs", "huge-targets", "high-lr", "exploding-gradients")
SCALE_LIMIT = 10.0
TARGET_LIMIT = 1e3
UPDATE_RATIO_LIMIT = 0.5
LOSS_GROWTH_LIMIT = 10.0

ADVICE = {
    "dirty-data": "check the data before training: stabilize.check_finite(data) names the cells; "
                  "drop or impute those rows deliberately (stabilize.audit(X, y) lists them)",
    "log-zero": "compute the loss from logits: stabilize.safe_cross_entropy(logits, labels), or "
                "stabilize.safe_log(p) instead of log(p); clip_by_value(p, 1e-8, 1) keeps the loss finite "
                "but zeroes its gradient",
    "masked-loss": "make the loss safe before the bad value appears (the double-where trick: replace the "
                   "denominator/argument where it is invalid, then mask); where(is_finite(l), l, 0) hides the "
                   "value but not its NaN gradient. StabilityTrainer(on_nonfinite='skip') keeps the weights safe meanwhile",
    "unscaled-inputs": "split first, then fit sklearn's StandardScaler on the training split only and transform "
                       "both splits (stabilize.audit(X, train_index=..., scaler=...) checks for leakage)",
    "huge-targets": "scale the targets (StandardScaler on y, inverse-transform predictions), or clip: "
                    "StabilityTrainer(clip_norm=1.0)",
    "high-lr": "lower the learning rate (about 10x), or let the trainer back off: "
               "StabilityTrainer(on_nonfinite='backoff', max_update_ratio=0.5)",
    "exploding-gradients": "clip by global norm: StabilityTrainer(clip_norm=1.0) or stabilize.clip_grads(grads, max_norm=1.0); "
                           "check the initialisation (He/Xavier)",
}


@dataclass
class Diagnosis:
    """Why a step went non-finite.

    Attributes:
        cause: one of ``CAUSES``.
        step, batch_index: where it happened.
        origin: the first layer whose output (forward) or output gradient
            (backward) went non-finite, ``"loss"`` or ``"input batch"``.
        phase: ``"forward"`` or ``"backward"``.
        evidence: the figures that decided it.
        advice: the remedy, naming the stabilize call or setting.
    """

    cause: str
    step: int
    batch_index: int
    origin: str
    phase: str
    evidence: dict = field(default_factory=dict)
    advice: str = ""

    def line(self) -> str:
        return (f"stabilize: step {self.step} went non-finite: cause {self.cause} "
                f"(origin {self.origin}, {self.phase}); fix: {self.advice.split(';')[0]}")

    def __str__(self) -> str:
        lines = [
            f"diagnosis: {self.cause}",
            f"  step {self.step}, batch {self.batch_index}; origin: {self.origin} ({self.phase} pass)",
            "  evidence:",
        ]
        for key, value in self.evidence.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"    {key}: {shown}")
        lines.append(f"  advice: {self.advice}")
        return "\n".join(lines)


def _np(B, t):
    return None if t is None else np.asarray(B.to_numpy(t), dtype=np.float64)


def _finite(a) -> bool:
    return a is None or bool(np.all(np.isfinite(a)))


def _columns(x) -> np.ndarray | None:
    """The batch inputs as a float64 matrix (dict inputs: columns in key order)."""
    if isinstance(x, dict):
        cols = [np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in x.values()]
        return np.concatenate(cols, axis=1)
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1) if x.ndim else None


def _overflowing_update(B, model, trace, lr) -> str:
    """Every gradient element is finite: name the parameter whose update (``w - lr*g``)
    overflows, else the one whose gradient dominates a global norm that overflowed."""
    largest, largest_name = -1.0, "update"
    for (name, g), p in zip(trace["param_grads"], B.parameters(model)):
        if g is None:
            continue
        dtype = np.float64 if B.dtype(p) == "float64" else np.float32
        w, gn = np.asarray(B.to_numpy(p), dtype), np.asarray(B.to_numpy(g), dtype)
        with np.errstate(all="ignore"):
            if not np.all(np.isfinite(w - dtype(lr) * gn)):
                return f"{name} (update overflows)"
        peak = float(np.max(np.abs(gn))) if gn.size else 0.0
        if peak > largest:
            largest, largest_name = peak, name
    return f"{largest_name} (gradient norm overflows, |g| up to {largest:.3g})"


def diagnose(B, model, loss_fn, x, y, *, step: int, batch_index: int, lr: float,
             losses: np.ndarray, grad_norms: np.ndarray, weights_norm: float | None = None) -> Diagnosis:
    """Replay the failing step and apply the rules of the module docstring.

    Args:
        B: the backend; ``model``/``loss_fn``: as trained, holding the pre-step weights.
        x, y: the failing batch as numpy (or tensors).
        step, batch_index, lr: where and at what rate it failed.
        losses, grad_norms: the run's per-step history up to and including this step.
        weights_norm: the global weight norm before the step (for the update ratio).
    """
    to_np = lambda v: {k: _np(B, t) if B.is_tensor(t) else np.asarray(t, np.float64) for k, t in v.items()} if isinstance(v, dict) else (_np(B, v) if B.is_tensor(v) else np.asarray(v, np.float64))
    xn, yn = to_np(x), to_np(y)
    X = _columns(xn)
    ev: dict = {}
    made = lambda cause, origin, phase: Diagnosis(cause, step, batch_index, origin, phase, ev, ADVICE[cause])

    # 1. the data themselves
    bad_x = X is not None and not _finite(X)
    bad_y = np.asarray(yn).dtype.kind == "f" and not _finite(yn)
    if bad_x or bad_y:
        from .finite import check_finite

        report = check_finite({"x": X, "y": np.asarray(yn)}, name="batch", raise_error=False)
        for leaf in report.bad:
            ev[f"{leaf.path} non-finite"] = f"{leaf.n_nan} NaN, {leaf.n_posinf} +inf, {leaf.n_neginf} -inf at {leaf.positions}"
        return made("dirty-data", "input batch", "forward")

    xt = {k: B.convert(v) for k, v in x.items()} if isinstance(x, dict) else x
    trace = B.trace_layers(model, loss_fn, xt, y)
    loss = float(_np(B, trace["loss"]))
    pred = _np(B, trace["pred"])
    pred_grad = _np(B, trace["pred_grad"])
    ev["loss"] = loss
    first_fwd = next((name for name, out in trace["forward"] if not _finite(_np(B, out))), None)
    first_bwd = next((name for name, g in reversed(trace["output_grads"]) if not _finite(_np(B, g))), None)
    bad_params = [name for name, g in trace["param_grads"] if not _finite(_np(B, g))]

    dtype = B.dtype(trace["pred"])
    dtype_max = float(np.finfo(np.float64 if dtype == "float64" else np.float32).max)
    Yf = np.asarray(yn, dtype=np.float64)
    overflow = False
    regression = pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1)
    if _finite(pred) and not np.isfinite(loss) and Yf.shape == pred.shape and regression:
        # A squared error past the dtype's range is an overflow of huge values, not log(0).
        with np.errstate(over="ignore"):
            overflow = bool(np.max((pred - Yf) ** 2) * pred.size > dtype_max) if pred.size else False
        ev["largest |prediction - target|"] = float(np.max(np.abs(pred - Yf))) if pred.size else 0.0

    # 2. the loss turned finite, moderate predictions into a non-finite value
    if _finite(pred) and not np.isfinite(loss) and not overflow:
        ev["predictions finite"] = True
        if pred.ndim == 2 and pred.shape[1] > 1:
            z = pred - pred.max(axis=1, keepdims=True)
            tiny = np.finfo(np.float32 if dtype != "float64" else np.float64).tiny
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            ev["log input minimum (softmax probability)"] = float(p.min())
            ev["probabilities that underflow to 0 in " + dtype] = int((p < tiny).sum())
        else:
            ev["prediction minimum"] = float(pred.min())
        return made("log-zero", "loss", "forward")

    # 3. a finite loss whose gradient is not: the mask hid the value only
    if np.isfinite(loss) and _finite(pred) and not _finite(pred_grad):
        ev["finite loss over non-finite gradients"] = True
        ev["non-finite d loss / d prediction elements"] = int((~np.isfinite(pred_grad)).sum())
        ev["parameters with non-finite gradients"] = len(bad_params)
        return made("masked-loss", "loss", "backward")

    if first_fwd:
        origin, phase = first_fwd, "forward"
    elif overflow:
        origin, phase = "loss (squared error overflows " + dtype + ")", "forward"
    elif first_bwd or bad_params:
        origin, phase = first_bwd or bad_params[0], "backward"
    else:  # every value and gradient finite: the update itself overflowed the weights
        origin, phase = _overflowing_update(B, model, trace, lr), "backward"

    # 4./5. the scale of the data
    if X is not None and X.size:
        mean, std = X.mean(axis=0), X.std(axis=0)
        ev["input feature |mean| max"] = float(np.abs(mean).max())
        ev["input feature std max"] = float(std.max())
        spread = float(std.max() / max(std.min(), 1e-12))
        ev["input std ratio across features"] = spread
    Y = np.asarray(yn, dtype=np.float64)
    target_rms = float(np.sqrt(np.mean(Y**2))) if Y.dtype.kind == "f" and Y.size else 0.0
    ev["target RMS"] = target_rms
    recent = np.asarray(losses[max(0, step - 5) : step + 1], dtype=np.float64)
    finite_recent = recent[np.isfinite(recent) & (recent > 0)]
    growth = float(np.exp(np.mean(np.diff(np.log(finite_recent))))) if finite_recent.size >= 2 else 1.0
    ev["loss growth per step (last steps)"] = growth
    good = np.asarray(grad_norms[:step], dtype=np.float64)
    good = good[np.isfinite(good)]
    if good.size and weights_norm:
        ev["update/weight ratio (last good step)"] = float(lr * good[-1] / weights_norm)
    if good.size >= 2 and good[0] > 0:
        ev["gradient-norm growth since step 0"] = float(good[-1] / good[0])
    ev["learning rate"] = lr

    if X is not None and X.size and (ev["input feature |mean| max"] > SCALE_LIMIT or ev["input feature std max"] > SCALE_LIMIT
                                     or ev["input std ratio across features"] > 100 * SCALE_LIMIT):
        return made("unscaled-inputs", origin, phase)
    if target_rms > TARGET_LIMIT:
        return made("huge-targets", origin, phase)
    if ev.get("update/weight ratio (last good step)", 0.0) > UPDATE_RATIO_LIMIT or growth > LOSS_GROWTH_LIMIT:
        return made("high-lr", origin, phase)
    return made("exploding-gradients", origin, phase)
