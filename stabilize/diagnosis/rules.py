"""The causes, in the order they are tried: each a definition, the evidence that
decides it and a fix that is never harmful.

The first rule whose ``applies`` holds names the cause; ``unknown`` closes the
list, so a failure that fits nothing is reported with its evidence rather than
given a confident wrong name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .evidence import Evidence, eps_underflows, half, is_overflow, singular_inputs
from .ops import EXPS, LOGS, MEAN_LOSSES, SOFTMAX

__all__ = ["Rule", "RULES", "CAUSES", "ADVICE", "SCALE_LIMIT", "TARGET_LIMIT", "RATE_CAUSES", "half_first"]

SCALE_LIMIT = 10.0
# Causes a smaller learning rate (a back-off, a rollback) can cure; for the others it only burns compute.
RATE_CAUSES = frozenset({"high-lr", "exploding-gradients", "rnn-exploding", "unscaled-inputs", "huge-targets",
                         "weight-decay", "unknown"})
TARGET_LIMIT = 1e3
UPDATE_RATIO_LIMIT = 0.5
LOSS_GROWTH_LIMIT = 10.0
SPIKE_LIMIT = 10.0

SAFE_CALL = {
    "sqrt": "stabilize.safe_sqrt(x) (for a distance: stabilize.safe_norm(a - b, axis=-1))",
    "norm": "stabilize.safe_norm(v, axis=-1)",
    "pow": "stabilize.safe_pow(x, p)",
    "rsqrt": "stabilize.safe_pow(x, -0.5)",
    "acos": "stabilize.safe_acos(x)",
    "asin": "stabilize.safe_asin(x)",
    "div": "stabilize.safe_div(a, b)",
    "std": "stabilize.safe_std(x, axis=..., ddof=...)",
    "var": "stabilize.safe_var(x, axis=..., ddof=...)",
    "log": "stabilize.safe_log(x)",
    "log1p": "stabilize.safe_log(1 + x)",
    "atanh": "clamp x to (-1 + eps, 1 - eps) before atanh",
}

ADVICE = {
    "dirty-data": "check the data before training: stabilize.check_finite(data) names the cells; "
                  "drop or impute those rows deliberately (stabilize.audit(X, y) lists them)",
    "bad-labels": "labels must be integers in [0, num_classes): remap them (1-based ids: y - 1; a 'void' "
                  "label such as 255: CrossEntropyLoss(ignore_index=255), or mask it out in Keras), "
                  "and set num_classes to the real count",
    "ctc-infeasible": "some targets cannot be aligned to their inputs (CTC needs one frame per symbol and a blank "
                      "between two equal symbols): filter utterances too short for their transcript, give the model "
                      "a longer output (less subsampling or pooling), or CTCLoss(zero_infinity=True) so that those "
                      "samples count 0; clipping, scaling or a smaller rate do not help",
    "exp-overflow": "bound what goes into exp: clamp a log-variance (logvar.clamp(-30, 20)), bound a flow's "
                    "log-scale (tanh(s) * scale, as RealNVP), or parameterise a scale with softplus; exp overflows "
                    "float32 above 88.7 (float16 above 11)",
    "empty-mean": "a mean over no element: every target is ignored (padding), or a row has no valid entry (an "
                  "anchor with no positive); divide by max(count, 1) so that such a row counts 0, or leave batches "
                  "with no valid target out (cross_entropy with ignore_index is NaN when every target is ignored)",
    "masked-softmax": "use stabilize.masked_softmax(scores, mask): a row with every key masked gives zeros, "
                      "not NaN; or make sure every query keeps one valid key",
    "low-precision": "keep that computation in float32: torch.autocast / keras mixed_float16 keep reductions "
                     "and losses in float32 (cast with .float() before a sum; stabilize.safe_mse accumulates in "
                     "float32); scale the loss with GradScaler / LossScaleOptimizer",
    "log-zero": "compute the loss from logits: stabilize.safe_cross_entropy(logits, labels), or "
                "stabilize.safe_log(p) instead of log(p); clip_by_value(p, 1e-8, 1) keeps the loss finite "
                "but zeroes its gradient",
    "masked-loss": "make the loss safe before the bad value appears (the double-where trick: replace the "
                   "denominator/argument where it is invalid, then mask); where(is_finite(l), l, 0) hides the "
                   "value but not its NaN gradient. StabilityTrainer(on_nonfinite='skip') keeps the weights safe meanwhile",
    "singular-op": "replace the op by its safe version (stabilize.safe_sqrt, safe_norm, safe_pow, safe_acos, "
                   "safe_asin, safe_div, safe_std/safe_var): same value, finite gradient at the singular point",
    "weight-decay": "lower weight_decay so that lr * weight_decay is well below 1 (SGD: 1e-4..5e-4; AdamW: "
                    "0.01..0.1): above 2 every step multiplies the weights by |1 - lr*wd| > 1",
    "rnn-exploding": "clip the gradients by global norm: StabilityTrainer(clip_norm=0.25..1.0) or "
                     "stabilize.clip_grads(grads, max_norm=1.0) before the step (Keras: clipnorm=1.0); "
                     "truncate backpropagation through time; prefer LSTM/GRU cells",
    "unscaled-inputs": "split first, then fit sklearn's StandardScaler on the training split only and transform "
                       "both splits (stabilize.audit(X, train_index=..., scaler=...) checks for leakage)",
    "huge-targets": "scale the targets (StandardScaler on y, inverse-transform predictions), or clip: "
                    "StabilityTrainer(clip_norm=1.0)",
    "high-lr": "lower the learning rate (about 10x), or let the trainer back off: "
               "StabilityTrainer(on_nonfinite='backoff', max_update_ratio=0.5)",
    "exploding-gradients": "clip by global norm: StabilityTrainer(clip_norm=1.0) or stabilize.clip_grads(grads, max_norm=1.0); "
                           "check the initialisation (He/Xavier)",
    "unknown": "no rule fits the evidence: look at the origin op and the figures below; meanwhile "
               "StabilityTrainer(on_nonfinite='skip') keeps the weights safe",
}


@dataclass(frozen=True)
class Rule:
    """``name``: the cause; ``definition``: what it means; ``applies``: the deciding evidence."""

    name: str
    definition: str
    applies: Callable[[Evidence], bool]


def _events(E):
    return [e for e in (E.fwd, E.bwd) if e is not None]


def _label_error(E) -> bool:
    err = (E.trace.get("error") or "").lower()
    return any(k in err for k in ("out of bounds", "label value", "valid range", "expected scalar type long",
                                  "labels must be", "indices[", "index out of range", "is not in [",
                                  "device-side assert"))


def _bad_labels(E) -> bool:
    """Labels or ids out of range, when the step raised or no op explains the failure otherwise
    (a label range guessed from the output's width means nothing if a singular op failed first)."""
    if _label_error(E):
        return True
    unexplained = E.fwd is None or E.fwd.op in MEAN_LOSSES or E.fwd.op in ("gather", "one_hot", "embedding")
    return bool(E.bad_ids) and (bool(E.trace.get("error")) or unexplained)


def _ctc(E) -> bool:
    return any(ev.op == "ctc_loss" for ev in _events(E))


def _empty_mean(E) -> bool:
    """0/0 where the denominator counts elements (whole numbers, some of them not 0), or a scalar 0/0;
    or a cross-entropy mean that is NaN from finite inputs (every target ignored)."""
    ev = E.fwd
    if ev is None:
        return False
    if ev.op in MEAN_LOSSES:
        return True  # finite logits, NaN mean: nothing was averaged
    if ev.op != "div" or len(ev.inputs) < 2 or ev.inputs[0].shape != ev.inputs[1].shape:
        return False
    num, den = ev.inputs
    hole = (den == 0) & (num == 0)
    if not hole.any():
        return False
    whole = bool(np.all(den == np.round(den)) and np.all(den >= 0))
    return (den.size == 1) or (whole and bool(np.any(den > 0)))


def _scaled(E) -> bool:
    if E.X is None or not E.X.size or E.x_integer:
        return False  # integer inputs are ids (tokens, categories), not features to scale
    mean, std = np.abs(E.X.mean(axis=0)), E.X.std(axis=0)
    E.shown["input feature |mean| max"] = float(mean.max())
    E.shown["input feature std max"] = float(std.max())
    E.shown["input std ratio across features"] = float(std.max() / max(std.min(), 1e-12))
    return bool(mean.max() > SCALE_LIMIT or std.max() > SCALE_LIMIT
                or E.shown["input std ratio across features"] > 100 * SCALE_LIMIT)


def half_first(E) -> bool:
    """The first non-finite value was made in float16/bfloat16 by an over- or underflow: an op that
    overflows where float32 does not, a constant that overflowed, or a singular point (x/0, sqrt(0))
    reached because an earlier half-precision op flushed values to 0."""
    ev = E.fwd if E.fwd is not None else E.bwd
    if ev is None or not half(ev.output_dtype):
        return False
    if ev.extra.get("overflowed constant"):
        return True
    if is_overflow(ev) and ev.extra.get("finite in float32", True):
        return True
    return E.underflow is not None and singular_inputs(ev)


def _low_precision(E) -> bool:
    if half_first(E):
        return True
    for ev in _events(E):
        if half(ev.output_dtype) and is_overflow(ev) and ev.extra.get("finite in float32", True):
            return True
    no_op = E.fwd is None and E.bwd is None and E.loss_finite
    if not E.params_finite:  # an unchecked update already broke the weights: the epsilon is the suspect
        return eps_underflows(E.eps, E.param_dtype)
    return no_op and (eps_underflows(E.eps, E.param_dtype) or half(E.param_dtype))


def _exp_overflow(E) -> bool:
    ev = E.fwd
    return ev is not None and ev.op in EXPS and is_overflow(ev)


def _log_zero(E) -> bool:
    ev = E.fwd
    if ev is not None:
        return ev.op in LOGS and not E.loss_finite and bool(np.any(ev.offending() == 0))
    # Without op tracing (a backend that has none): predictions finite, loss not.
    return not E.trace.get("n_ops") and not E.loss_finite and E.pred is not None \
        and bool(np.all(np.isfinite(E.pred))) and not E.trace.get("error")


def _masked_loss(E) -> bool:
    if E.loss_finite and E.fwd is not None:
        return True  # a non-finite value was made, then hidden from the loss but not from its gradient
    return E.loss_finite and E.fwd is None and E.bwd is None and E.pred_grad is not None \
        and not bool(np.all(np.isfinite(E.pred_grad)))


def _singular(E) -> bool:
    return (E.fwd is not None and singular_inputs(E.fwd)) or \
        (E.fwd is None and E.bwd is not None and singular_inputs(E.bwd) and not E.bwd.output_nonfinite)


def _rnn(E) -> bool:
    """Recurrent, and the gradients (or the unrolled activations) blew up; a loss that grew
    steadily by orders of magnitude while the gradient norm did not spike is a rate problem."""
    if not E.recurrent:
        return False
    exploded = E.grad_spike >= SPIKE_LIMIT or E.grad_growth >= SPIKE_LIMIT or any(is_overflow(ev) for ev in _events(E))
    steady = E.growth > LOSS_GROWTH_LIMIT and E.grad_spike < SPIKE_LIMIT and E.grad_growth < SPIKE_LIMIT
    return exploded and not steady


def _target_rms(E) -> bool:
    return E.shown.get("target RMS", 0.0) > TARGET_LIMIT


def _exploding(E) -> bool:
    return E.grad_growth >= SPIKE_LIMIT or any(is_overflow(ev) for ev in _events(E)) \
        or "update overflows" in E.shown.get("overflowing update", "")


RULES = [
    Rule("dirty-data", "the batch itself holds NaN/Inf", lambda E: E.bad_x or E.bad_y),
    Rule("bad-labels", "class labels or input ids outside [0, n) or of a type the loss cannot index with",
         _bad_labels),
    Rule("ctc-infeasible", "a CTC target longer than its input allows (repeats need a blank between them): "
         "no alignment exists, the loss is inf", _ctc),
    Rule("low-precision", "float16/bfloat16 over- or underflow first (an op, a reduction, a constant, an epsilon "
         "that is 0 in the dtype) or an optimizer epsilon that underflows in the parameters' dtype", _low_precision),
    Rule("masked-softmax", "a softmax/attention row with every entry masked (-inf): 0/0 = NaN",
         lambda E: any(ev.op in SOFTMAX and ev.bad_rows > 0 for ev in _events(E))),
    Rule("empty-mean", "a mean over no element: 0/0 where the denominator counts the valid entries",
         _empty_mean),
    Rule("log-zero", "a log met an exact 0 (an underflowed probability)", _log_zero),
    Rule("masked-loss", "the loss is finite but a value hidden by a mask was not, so its gradient is NaN",
         _masked_loss),
    Rule("singular-op", "an op at its singular or out-of-domain point: sqrt/pow(p<1) at 0, acos/asin at ±1, "
         "log or fractional pow of a negative, division by 0, std/var over one element", _singular),
    Rule("weight-decay", "lr * weight_decay > 2: every step multiplies the weights by |1 - lr*wd| > 1",
         lambda E: E.lr * E.weight_decay > 2.0),
    Rule("rnn-exploding", "a recurrent network whose gradient norm spiked (backpropagation through time)", _rnn),
    Rule("unscaled-inputs", "input features with mean or std beyond SCALE_LIMIT, or ranges orders apart", _scaled),
    Rule("huge-targets", "targets whose RMS exceeds TARGET_LIMIT", _target_rms),
    Rule("high-lr", "the last good update was large next to the weights, or the loss grew by orders of "
         "magnitude per step", lambda E: E.update_ratio > UPDATE_RATIO_LIMIT or E.growth > LOSS_GROWTH_LIMIT),
    Rule("exp-overflow", "exp of an unbounded value (a log-variance, a flow's log-scale) overflowed", _exp_overflow),
    Rule("exploding-gradients", "values or gradients overflowed with no cause above: the gradient norm grew",
         _exploding),
    Rule("unknown", "no rule fits; the evidence is shown", lambda E: True),
]
CAUSES = tuple(r.name for r in RULES)
