"""The losses the scenarios write by hand, traps included, over backend primitives.

These reproduce the failures faithfully on every backend; they are not
recommendations. The fixes are :func:`stabilize.safe_cross_entropy`,
:func:`stabilize.safe_mse` and the guard of :class:`stabilize.StabilityTrainer`.
"""

from __future__ import annotations

from ..registry import backend_for

__all__ = [
    "naive_mse",
    "naive_log_softmax_cross_entropy",
    "clipped_log_softmax_cross_entropy",
    "masked_relative_error",
    "double_where_relative_error",
    "clip_output_gradient",
]


def _mean(B, x):
    return B.sum(x) / B.numel(x, B.dtype(x))


def naive_mse(pred, target):
    """``mean((pred - target)**2)`` in the input dtype: what most loops write."""
    B = backend_for(pred)
    d = pred - target
    return _mean(B, d * d)


def _softmax(B, z):
    e = B.exp(z - B.stop_gradient(B.amax(z, axis=-1, keepdims=True)))
    return e / B.sum(e, axis=-1, keepdims=True)


def naive_log_softmax_cross_entropy(logits, onehot):
    """``-mean(sum(y * log(softmax(z))))`` (the log-zero scenario): a saturated class gives
    ``log(0) = -inf`` and ``0 * -inf = NaN``."""
    B = backend_for(logits)
    p = _softmax(B, logits)
    return -B.sum(onehot * B.log(p)) / B.rows(logits, B.dtype(logits))


def clipped_log_softmax_cross_entropy(logits, onehot, low: float = 1e-8):
    """Seed 001's first fix, ``log(clip_by_value(p, 1e-8, 1.0))``: finite, but the
    gradient is exactly zero wherever the clip is active (the "fake" loss)."""
    B = backend_for(logits)
    p = _softmax(B, logits)
    clipped = B.where(p < low, B.stop_gradient(B.full_like(p, low)), B.where(p > 1.0, B.full_like(p, 1.0), p))
    return -B.sum(onehot * B.log(clipped)) / B.rows(logits, B.dtype(logits))


def masked_relative_error(pred, target):
    """Seed 003's custom loss: ``where(is_finite(l), l, 0)`` over a relative error.

    A zero target makes ``l`` infinite; the mask hides it from the printed
    loss, but the gradient of the branch not taken is ``0 * inf = NaN``.
    """
    B = backend_for(pred)
    rel = (pred - target) / target
    loss = rel * rel
    return _mean(B, B.where(B.isfinite(loss), loss, B.full_like(loss, 0.0)))


def double_where_relative_error(pred, target):
    """The same loss made safe *before* the bad value appears (the double-where
    trick): the denominator is replaced where the target is 0, so no branch ever
    holds inf."""
    B = backend_for(pred)
    nonzero = target != 0
    safe_target = B.where(nonzero, target, B.full_like(target, 1.0))
    rel = (pred - target) / safe_target
    return _mean(B, B.where(nonzero, rel * rel, B.full_like(rel, 0.0)))


def clip_output_gradient(pred, limit: float = 1.0):
    """Identity forward; the gradient reaching ``pred`` is clipped to ``[-limit, limit]``
    (the numpy-net scenario's ``np.clip(d_output, -1, 1)``)."""
    B = backend_for(pred)

    def forward(x):
        return x * 1.0, ()

    def backward(saved, dy):
        return (B.where(dy > limit, B.full_like(dy, limit), B.where(dy < -limit, B.full_like(dy, -limit), dy)),)

    return B.custom_grad(forward, backward)(pred)
