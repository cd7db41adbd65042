"""Safe numerics, written once over backend primitives.

Every op dispatches on the framework of the tensors it is given (numpy inputs
go to the configured backend) and runs the very same formula there, so torch
and TensorFlow agree bit for bit where their primitives do.

The rule for every clamp in this module: the value is clamped, the gradient is
the derivative *at the clamp boundary*, never zero. A zero gradient in the
clamped region is the "fake loss" of the ``log-zero`` scenario
(``tf.clip_by_value(y, 1e-8, 1)`` inside a log): the loss looks finite and
learning silently stops. NaN is never turned into a number: it comes out as
NaN in its own element.

The gradient bound: the local derivative of every safe op has magnitude at
most :func:`grad_bound` ``(dtype) = sqrt(finfo(dtype).max)`` (rounded down),
so any upstream factor up to that size (``5 * loss``, ``loss ** 2``, a loss
scale) keeps the gradient finite. ``safe_log``'s derivative at its value
floor would otherwise be ``1/tiny`` (8.5e37 in float32): ``5 * safe_log(0)``
then has an inf gradient. The value floor and the gradient bound are separate.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .backends.base import ACCUMULATE, FLOAT_INFO
from .clip import _leaves, _rebuild, clip_grads, clip_grads_, global_norm  # noqa: F401 (re-exported)
from .registry import backend_for
from .validate import check_positive_finite, convert, float_dtype

__all__ = [
    "grad_bound",
    "safe_log",
    "safe_div",
    "safe_mse",
    "safe_cross_entropy",
    "clip_grads",
    "clip_grads_",
    "global_norm",
]

_REDUCTIONS = ("mean", "sum", "none")


def _largest_root(name: str) -> float:
    """The largest number of dtype ``name`` whose exact square is at most the dtype's max."""
    info = FLOAT_INFO[name]
    bits = round(-math.log2(info.eps)) + 1  # significand bits, the implicit one included
    mantissa, exponent = math.frexp(math.sqrt(info.max))
    steps = math.floor(mantissa * 2**bits)
    while True:  # exact: Fraction arithmetic, no rounding of the square
        value = math.ldexp(steps / 2**bits, exponent)
        if Fraction(value) ** 2 <= Fraction(info.max):
            return value
        steps -= 1


_GRAD_BOUND = {name: _largest_root(name) for name in FLOAT_INFO}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    return str(name).replace("torch.", "")


def grad_bound(dtype) -> float:
    """The largest local derivative a safe op returns in ``dtype``: ``sqrt(finfo(dtype).max)``.

    Rounded down to a number of the dtype, so that ``bound * bound`` is finite
    in it: 255.875 in float16, 1.84e19 in bfloat16 and float32, 1.34e154 in
    float64. Every safe op caps its local derivative at this magnitude, so an
    upstream gradient up to the same size keeps the product finite.

    Args:
        dtype: a dtype name (``"float32"``) or a numpy, torch or TensorFlow dtype.

    Example:
        >>> from stabilize.ops import grad_bound
        >>> grad_bound("float16"), grad_bound("float32") ** 2 <= 3.4028234663852886e38
        (255.875, True)
    """
    name = _dtype_name(dtype)
    if name not in _GRAD_BOUND:
        raise TypeError(f"grad_bound: {dtype!r} is not a floating dtype; use one of {', '.join(_GRAD_BOUND)}")
    return _GRAD_BOUND[name]


def _capped(B, g, bound: float):
    """``g`` clamped to ``[-bound, bound]``; NaN stays NaN (both comparisons are False)."""
    return B.where(g > bound, bound, B.where(g < -bound, -bound, g))


def _wider(a: str, b: str) -> str:
    return "float64" if "float64" in (a, b) else "float32"


def safe_log(x, eps: float | None = None, *, backend: str | None = None):
    """``log(max(x, floor))`` with a finite, non-zero gradient below the floor.

    Args:
        x: a floating tensor (torch, TF) or array (numpy goes to the configured backend).
        eps: the floor. Defaults to the dtype's smallest normal number
            (6.1e-5 in float16, 1.2e-38 in float32), so it is right in every dtype.
        backend: force a backend by name.

    Returns:
        A tensor of ``x``'s dtype. Below the floor (0, -0, negatives, -inf,
        subnormals) the value is ``log(floor)``. The gradient is
        ``min(1/max(x, floor), grad_bound(dtype))``: ``1/x`` wherever
        ``x >= 1/grad_bound`` (5.4e-20 in float32, 0.0039 in float16), and the
        bound below that, so it is finite, positive (pointing towards larger
        ``x``) and stays finite under any upstream factor up to the bound.
        NaN stays NaN in its element.

    Example:
        >>> import numpy as np, stabilize
        >>> y = stabilize.safe_log(np.array([0.0, 1.0]), backend="numpy")
        >>> bool(np.isfinite(y).all()), float(y[1])
        (True, 0.0)
    """
    B = backend_for(x, backend=backend)
    x = convert(B, x, "safe_log", "x")
    dt = float_dtype(B, x, "safe_log")
    floor = FLOAT_INFO[dt].tiny if eps is None else check_positive_finite("eps", eps, "1e-12", op="safe_log")
    bound = _GRAD_BOUND[dt]

    def forward(x):
        # NaN < floor is False, so NaN passes through to log and stays NaN.
        clamped = B.where(x < floor, floor, x)
        return B.log(clamped), (clamped,)

    def backward(saved, dy):
        (clamped,) = saved
        # 1/clamped is finite (clamped >= floor > 0); capping it keeps dy * local finite.
        return (dy * _capped(B, 1.0 / clamped, bound),)

    return B.custom_grad(forward, backward)(x)


def _unbroadcast(B, g, shape):
    """Sum a broadcast gradient back down to ``shape``."""
    gshape = B.shape(g)
    while len(gshape) > len(shape):
        g = B.sum(g, axis=0)
        gshape = B.shape(g)
    for axis, (have, want) in enumerate(zip(gshape, shape)):
        if want == 1 and have != 1:
            g = B.sum(g, axis=axis, keepdims=True)
    return g


def safe_div(a, b, eps: float | None = None, *, backend: str | None = None):
    """``a / b`` with ``|b|`` floored at ``eps`` (sign kept; 0 and -0 count as +).

    The default floor is ``sqrt(smallest normal)`` of the dtype, the largest
    floor for which both ``a/b`` and the gradient ``-a/b**2`` stay finite for
    ``|a| <= 1`` in every float dtype, float16 included. Both local
    derivatives, ``1/b`` and ``-a/b**2``, are capped at :func:`grad_bound`.

    Example:
        >>> import numpy as np, stabilize
        >>> float(stabilize.safe_div(np.float64(1.0), np.float64(0.0), eps=1e-3, backend="numpy"))
        1000.0
    """
    B = backend_for(a, b, backend=backend)
    a = convert(B, a, "safe_div", "a")
    dt = float_dtype(B, a, "safe_div")
    b = convert(B, b, "safe_div", "b", dtype=None if B.is_tensor(b) else dt)
    if B.dtype(b) != dt:
        raise TypeError(f"safe_div: a is {dt} but b is {B.dtype(b)}; cast one of them so they match")
    floor = math.sqrt(FLOAT_INFO[dt].tiny) if eps is None else check_positive_finite("eps", eps, "1e-12", op="safe_div")
    bound = _GRAD_BOUND[dt]
    shape_a, shape_b = B.shape(a), B.shape(b)

    def forward(a, b):
        signed_floor = B.where(b < 0, B.full_like(b, -floor), B.full_like(b, floor))
        safe_b = B.where(B.abs(b) < floor, signed_floor, b)
        y = a / safe_b
        return y, (y, safe_b)

    def backward(saved, dy):
        y, safe_b = saved
        da = dy * _capped(B, 1.0 / safe_b, bound)
        db = dy * _capped(B, -y / safe_b, bound)  # -a/b**2; an overflow to inf is capped too
        return _unbroadcast(B, da, shape_a), _unbroadcast(B, db, shape_b)

    return B.custom_grad(forward, backward)(a, b)


def safe_mse(pred, target, reduction: str = "mean", *, backend: str | None = None):
    """Mean squared error that stays finite wherever the true result is representable.

    It accumulates in at least float32 and returns in that dtype (float16 and
    bfloat16 inputs give a float32 loss: a float16 square overflows past 256).
    The sum of squares is computed on ``d / max|d|`` and rescaled, so it does
    not overflow before the mean is taken. The gradient is
    ``2 (pred - target) / n`` (``2 (pred - target)`` for ``"sum"``), its
    magnitude capped at :func:`grad_bound` of the accumulation dtype, then
    cast back to each input's dtype. Empty inputs: ``"sum"`` gives 0,
    ``"none"`` an empty tensor, and ``"mean"`` raises ``ValueError`` (the mean
    of nothing is undefined; torch and numpy return NaN).

    Args:
        pred, target: tensors of the same shape. Shapes must match exactly:
            silently broadcasting ``(N, 1)`` against ``(N,)`` is a classic bug.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import numpy as np, stabilize
        >>> p = np.array([300.0, 0.0], dtype=np.float16)
        >>> float(stabilize.safe_mse(p, np.zeros(2, np.float16), backend="numpy"))
        45000.0
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"safe_mse: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    B = backend_for(pred, target, backend=backend)
    pred = convert(B, pred, "safe_mse", "pred")
    dt_p = float_dtype(B, pred, "safe_mse")
    target = convert(B, target, "safe_mse", "target", dtype=None if B.is_tensor(target) else dt_p)
    dt_t = float_dtype(B, target, "safe_mse")
    if B.shape(pred) != B.shape(target):
        raise ValueError(
            f"safe_mse: pred has shape {B.shape(pred)} but target has shape {B.shape(target)}; "
            f"reshape one of them (e.g. target.reshape(pred.shape)) so they match exactly, or check that the "
            f"model's output has one column per target column"
        )
    acc = _wider(ACCUMULATE[dt_p], ACCUMULATE[dt_t])
    n = B.numel(pred, acc)
    bound = _GRAD_BOUND[acc]
    if reduction == "mean" and isinstance(n, int) and n == 0:
        raise ValueError(
            f"safe_mse: pred and target are empty (shape {B.shape(pred)}), and the mean of no "
            f"elements is undefined; check where the empty batch comes from, or pass "
            f"reduction='sum' (0 for empty input)"
        )

    def forward(p, t):
        d = B.cast(p, acc) - B.cast(t, acc)
        if reduction == "none":
            return d * d, (d,)
        if isinstance(n, int) and n == 0:
            return B.sum(d), (d,)  # "sum" of nothing: 0
        m = B.amax(B.abs(d))
        scale = B.where(B.isfinite(m) & (m > 0), m, B.full_like(m, 1.0))
        q = d / scale
        total = B.sum(q * q)
        root = scale * B.sqrt(total / n if reduction == "mean" else total)
        return root * root, (d,)

    def backward(saved, dy):
        (d,) = saved
        local = (2.0 / n if reduction == "mean" else 2.0) * d
        g = _capped(B, local, bound) * B.cast(dy, acc)
        return B.cast(g, dt_p), B.cast(-g, dt_t)

    return B.custom_grad(forward, backward)(pred, target)


# Keras calls a loss as loss(y_true, y_pred) and passes sparse labels as floats: the usual cause of the two
# shape errors below when a stabilize loss is given to model.compile directly.
_ORDER = ("; stabilize losses take (logits, labels), torch's order, but Keras calls loss(y_true, y_pred) "
          "with float labels: compile with loss=stabilize.keras_loss('cross_entropy')")


def safe_cross_entropy(logits, labels, reduction: str = "mean", *, backend: str | None = None):
    """Softmax cross-entropy computed from logits: the real fix for ``log(softmax(z))``.

    ``log_softmax(z) = z - m - log(sum(exp(z - m)))`` with ``m = max(z)`` never
    evaluates ``log(0)`` for finite logits; its gradient ``softmax(z) - y`` is
    finite. A ``-inf`` logit (a masked class) is allowed where its label is 0.

    Args:
        logits: ``(N, C)`` floating tensor.
        labels: sparse integer class ids of shape ``(N,)``, or one-hot /
            probability targets of shape ``(N, C)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> import numpy as np, stabilize
        >>> z = np.array([[1000.0, 0.0]])
        >>> float(stabilize.safe_cross_entropy(z, np.array([1]), backend="numpy"))
        1000.0
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"safe_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    B = backend_for(logits, labels, backend=backend)
    logits = convert(B, logits, "safe_cross_entropy", "logits")
    dt = float_dtype(B, logits, "safe_cross_entropy")
    shape = B.shape(logits)
    if len(shape) != 2 or shape[1] is None:
        raise ValueError(f"safe_cross_entropy: logits must be (N, C) with C known, got shape {shape}{_ORDER}")
    acc = ACCUMULATE[dt]
    labels = convert(B, labels, "safe_cross_entropy", "labels")
    lshape = B.shape(labels)
    if len(lshape) == 1 and not B.dtype(labels).startswith(("float", "bfloat")):
        y = B.one_hot(labels, shape[1], acc)
    elif len(lshape) == 2 and lshape[1] == shape[1]:
        y = B.cast(labels, acc)
    else:
        raise ValueError(
            f"safe_cross_entropy: labels must be integer ids of shape {shape[:1]} or "
            f"one-hot/probabilities of shape {shape}; got {B.dtype(labels)} of shape {lshape}{_ORDER}"
        )
    z = B.cast(logits, acc)
    m = B.stop_gradient(B.amax(z, axis=-1, keepdims=True))
    shifted = z - m
    log_probs = shifted - B.log(B.sum(B.exp(shifted), axis=-1, keepdims=True))
    # 0 * -inf would be NaN for a masked (-inf) class whose label is 0.
    per_class = B.where(y != 0, y * log_probs, 0.0)
    losses = -B.sum(per_class, axis=-1)
    if reduction == "none":
        return losses
    total = B.sum(losses)
    return total / B.rows(logits, acc) if reduction == "mean" else total
