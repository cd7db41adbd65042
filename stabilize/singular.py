"""Safe versions of the operations that are singular or undefined at a point.

``sqrt`` and fractional ``pow`` at 0, ``acos``/``asin`` at ±1, a softmax row
whose every entry is masked, a standard deviation over one element: each has a
finite value there but an infinite (or 0/0) derivative, so the loss prints
fine and the gradient is NaN. The diagnosis names these as ``singular-op`` and
``masked-softmax``; these ops are the one-call fixes.

The contract, as for :func:`stabilize.safe_log`:

- the value is exact wherever the plain op is finite, and finite at the
  singular point (``sqrt(0) = 0``, ``acos(1) = 0``, an all-masked row is 0);
- the gradient there is finite and informative: the derivative at the nearest
  point where it exists (the clamp boundary), never a silent zero where the
  true one-sided derivative is not zero;
- every local derivative is at most ``sqrt(finfo(dtype).max)`` in magnitude
  (1.8e19 in float32, 1.3e154 in float64, 256 in float16), so an upstream
  factor up to that size still gives a finite product;
- NaN in stays NaN in its own element (a softmax row holding a kept NaN is NaN,
  as the plain softmax is);
- one formula over backend primitives, so torch and TensorFlow agree at the
  special points.

References: the double-where trick (optax ``safe_norm``; jax issue #1052),
pytorch/pytorch#2421 (``norm`` gradient NaN at 0), pytorch/pytorch#41508
(all ``-inf`` attention rows give NaN).
"""

from __future__ import annotations

import math

from .backends.base import ACCUMULATE, FLOAT_INFO
from .ops import grad_bound
from .names import axis_from
from .registry import backend_for

__all__ = ["safe_sqrt", "safe_norm", "safe_pow", "safe_acos", "safe_asin", "masked_softmax", "safe_var", "safe_std"]


def _grad_bound(dtype: str) -> float:
    """The largest local derivative a safe op may have (:func:`stabilize.ops.grad_bound`)."""
    return grad_bound(dtype)


def _float(B, x, op: str) -> str:
    dt = B.dtype(x)
    if dt not in FLOAT_INFO:
        raise TypeError(f"{op} expects a floating tensor (float16, bfloat16, float32, float64), got {dt}; "
                        f"cast it first, e.g. x.float() or tf.cast(x, 'float32')")
    return dt


def _floor(eps, dtype: str, op: str, derived: float = 0.0) -> float:
    if eps is None:
        return max(FLOAT_INFO[dtype].tiny, derived)
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps!r}")
    return eps


def safe_sqrt(x, eps: float | None = None, *, backend: str | None = None):
    """``sqrt(x)`` with value 0 and a finite, positive gradient at ``x <= 0``.

    The value is ``sqrt(max(x, 0))`` (exact; 0 at 0, -0 and negatives). The
    gradient is ``0.5 / sqrt(max(x, floor))``: exact above the floor (the
    dtype's smallest normal by default), the boundary's derivative below it.
    ``sqrt(d²)`` of a zero distance thus gives the gradient 0, not NaN.

    Example:
        >>> import numpy as np, stabilize
        >>> stabilize.safe_sqrt(np.array([0.0, -1.0, 4.0]), backend="numpy").tolist()
        [0.0, 0.0, 2.0]
    """
    B = backend_for(x, backend=backend)
    x = B.convert(x)
    dt = _float(B, x, "safe_sqrt")
    floor = _floor(eps, dt, "safe_sqrt", (1.0 / _grad_bound(dt)) ** 2)
    tiny = FLOAT_INFO[dt].tiny

    def forward(x):
        # NaN <= 0 is False: NaN passes through. -0 becomes +0. Subnormals count as 0:
        # TensorFlow's CPU kernels flush them, torch's do not.
        value = B.sqrt(B.where(x < tiny, 0.0, x))
        return value, (B.where(x < floor, floor, x),)

    def backward(saved, dy):
        (clamped,) = saved
        return (dy * (0.5 / B.sqrt(clamped)),)

    return B.custom_grad(forward, backward)(x)


def safe_norm(x, axis=None, keepdims: bool = False, *, backend: str | None = None, dim=None, keepdim=None):
    """The Euclidean norm, finite with gradient 0 at the zero vector.

    ``axis``/``keepdims`` (numpy, Keras) and torch's ``dim``/``keepdim`` are the same arguments.

    Accumulates and returns in at least float32 (like :func:`stabilize.safe_mse`),
    computed on ``x / max|x|`` so squares cannot overflow. The gradient is
    ``x / norm``, at most 1 in every element; at ``x = 0`` it is 0 (the
    subgradient), where ``torch.norm`` gives NaN.

    Example:
        >>> import numpy as np, stabilize
        >>> float(stabilize.safe_norm(np.array([3.0, 4.0]), backend="numpy"))
        5.0
    """
    axis, keepdims = axis_from("safe_norm", axis, dim, keepdims, keepdim)
    B = backend_for(x, backend=backend)
    x = B.convert(x)
    acc = ACCUMULATE[_float(B, x, "safe_norm")]
    xa = B.cast(x, acc)
    ok = lambda m: B.isfinite(m) & (m > 0)
    m_k = B.stop_gradient(B.amax(B.abs(xa), axis=axis, keepdims=True))
    m = B.stop_gradient(B.amax(B.abs(xa), axis=axis, keepdims=keepdims))
    q = xa / B.where(ok(m_k), m_k, 1.0)
    return B.where(ok(m), m, 1.0) * safe_sqrt(B.sum(q * q, axis=axis, keepdims=keepdims), backend=B.name)


def _pow_floor(p: float, dtype: str) -> float:
    g = _grad_bound(dtype) / 2  # half: the floor is rounded into the dtype
    need = FLOAT_INFO[dtype].tiny
    if p < 1:  # |p| f^(p-1) <= g
        need = max(need, (abs(p) / g) ** (1.0 / (1.0 - p)))
    if p < 0:  # f^p <= g
        need = max(need, g ** (1.0 / p))
    return need


def safe_pow(x, p: float, eps: float | None = None, *, backend: str | None = None):
    """``x ** p`` for a Python number ``p``, finite with a finite gradient everywhere.

    - integer ``p >= 0``: the plain power (no singular point);
    - integer ``p < 0``: ``|x|`` is floored at ``eps`` keeping its sign (0 counts as +);
    - fractional ``p`` (domain ``x >= 0``): for ``p > 0`` the value is
      ``max(x, 0) ** p`` (0 at and below 0) and the gradient ``p * max(x, floor)**(p-1)``;
      for ``p < 0`` both use ``max(x, floor)``. A negative base never gives NaN.

    The default floor keeps the value and the local derivative within
    ``sqrt(finfo(dtype).max)``.

    Example:
        >>> import numpy as np, stabilize
        >>> stabilize.safe_pow(np.array([-8.0, 0.0, 4.0]), 0.5, backend="numpy").tolist()
        [0.0, 0.0, 2.0]
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise TypeError(f"safe_pow: p must be a finite Python number, got {p!r}; for a tensor exponent "
                        f"use exp(p * safe_log(x))")
    B = backend_for(x, backend=backend)
    x = B.convert(x)
    dt = _float(B, x, "safe_pow")
    p = float(p)
    if p == 0:
        return B.where(B.isnan(x), x, B.full_like(x, 1.0))  # NaN**0 is 1 in IEEE; keep the NaN
    if p.is_integer() and p > 0:
        return x ** p
    floor = _floor(eps, dt, "safe_pow", _pow_floor(p, dt))
    tiny, acc = FLOAT_INFO[dt].tiny, ACCUMULATE[dt]
    # At the floor, value and slope are Python constants: torch and TF round pow differently
    # by an ulp, constants round the same. Elsewhere powers are taken in at least float32.
    v_floor, d_floor = floor**p, p * floor ** (p - 1.0)
    power = lambda base, q: B.cast(B.cast(base, acc) ** q, dt)

    def forward(x):
        if p.is_integer():  # negative integer power: a pole at 0 only
            neg, at_floor = x < 0, B.abs(x) < floor
            pick = lambda a, b: B.where(neg, B.full_like(x, a), B.full_like(x, b))
            c = B.where(at_floor, pick(-floor, floor), x)
            odd = int(p) % 2 != 0
            value = B.where(at_floor, pick(-v_floor if odd else v_floor, v_floor), power(c, p))
            slope = B.where(at_floor, pick(d_floor if odd else -d_floor, d_floor), p * power(c, p - 1.0))
            return value, (slope,)
        at_floor = x < floor
        c = B.where(at_floor, floor, x)
        value = power(B.where(x < tiny, 0.0, x), p) if p > 0 else B.where(at_floor, v_floor, power(c, p))
        return value, (B.where(at_floor, d_floor, p * power(c, p - 1.0)),)

    def backward(saved, dy):
        (slope,) = saved
        return (dy * slope,)

    return B.custom_grad(forward, backward)(x)


def _arc(B, x, op: str):
    dt = _float(B, x, op)
    edge = 1.0 - FLOAT_INFO[dt].eps / 2  # the largest number below 1 in this dtype
    value_in = B.where(x > 1, 1.0, B.where(x < -1, -1.0, x))
    grad_in = B.where(x > edge, edge, B.where(x < -edge, -edge, x))
    return value_in, grad_in


def safe_acos(x, *, backend: str | None = None):
    """``acos(x)`` clamped to ``[-1, 1]``, with a finite gradient at and beyond ±1.

    The gradient ``-1/sqrt(1 - x²)`` is taken at the nearest number strictly
    inside (``±(1 - eps/2)``): about -2900 in float32, -32 in float16. The
    angle between two equal unit vectors thus trains instead of giving NaN.

    Example:
        >>> import numpy as np, stabilize
        >>> stabilize.safe_acos(np.array([1.0, 1.5, -1.0]), backend="numpy").round(4).tolist()
        [0.0, 0.0, 3.1416]
    """
    B = backend_for(x, backend=backend)
    x = B.convert(x)

    def forward(x):
        value_in, grad_in = _arc(B, x, "safe_acos")
        return B.acos(value_in), (grad_in,)

    def backward(saved, dy):
        (c,) = saved
        return (-dy / B.sqrt((1.0 - c) * (1.0 + c)),)

    return B.custom_grad(forward, backward)(x)


def safe_asin(x, *, backend: str | None = None):
    """``asin(x)`` clamped to ``[-1, 1]``, with a finite gradient at and beyond ±1 (see :func:`safe_acos`).

    Example:
        >>> import numpy as np, stabilize
        >>> stabilize.safe_asin(np.array([-2.0, 0.0]), backend="numpy").round(4).tolist()
        [-1.5708, 0.0]
    """
    B = backend_for(x, backend=backend)
    x = B.convert(x)

    def forward(x):
        value_in, grad_in = _arc(B, x, "safe_asin")
        return B.asin(value_in), (grad_in,)

    def backward(saved, dy):
        (c,) = saved
        return (dy / B.sqrt((1.0 - c) * (1.0 + c)),)

    return B.custom_grad(forward, backward)(x)


def masked_softmax(logits, mask=None, axis: int | None = None, *, backend: str | None = None, dim=None):
    """Softmax over the entries where ``mask`` is True; a row with none gives zeros, not NaN.

    Args:
        logits: a floating tensor.
        mask: a boolean tensor broadcastable to ``logits`` (True = attend), or
            None to mask the ``-inf`` entries (the ``masked_fill(-inf)`` idiom).
        axis: the softmax axis (default -1); ``dim`` is torch's name for it.

    A fully masked row (a padded sequence, a query with no valid key) has
    output 0 and gradient 0. Masked entries are never read, so garbage there
    does not matter; a NaN among the kept entries makes its row NaN, as in the
    plain softmax. Computed in at least float32, returned in the logits' dtype.

    Example:
        >>> import numpy as np, stabilize
        >>> z = np.array([[0.0, 0.0], [-np.inf, -np.inf]])
        >>> stabilize.masked_softmax(z, backend="numpy").tolist()
        [[0.5, 0.5], [0.0, 0.0]]
    """
    axis = axis_from("masked_softmax", axis, dim)[0]
    axis = -1 if axis is None else axis
    B = backend_for(logits, backend=backend)
    logits = B.convert(logits)
    dt = _float(B, logits, "masked_softmax")
    z = B.cast(logits, ACCUMULATE[dt])
    if mask is None:
        mask = (z > float("-inf")) | B.isnan(z)
    else:
        mask = B.convert(mask)
    m = B.stop_gradient(B.amax(B.where(mask, z, float("-inf")), axis=axis, keepdims=True))
    m = B.where(B.isfinite(m), m, 0.0)
    e = B.where(mask, B.exp(B.where(mask, z - m, 0.0)), 0.0)
    s = B.sum(e, axis=axis, keepdims=True)
    return B.cast(e / B.where(s == 0, 1.0, s), dt)  # NaN == 0 is False: a NaN row stays NaN


def safe_var(x, axis=None, ddof: int = 0, keepdims: bool = False, *, backend: str | None = None, dim=None,
             keepdim=None):
    """The variance with divisor ``max(n - ddof, 1)``: 0, not NaN, for one element.

    ``dim``/``keepdim`` are torch's names for ``axis``/``keepdims``.

    ``torch.var``/``torch.std`` default to ``ddof=1``, which divides by 0 for
    a last batch of one sample. Accumulates and returns in at least float32.
    An empty reduction is still NaN, as in numpy.

    Example:
        >>> import numpy as np, stabilize
        >>> float(stabilize.safe_var(np.array([3.0]), ddof=1, backend="numpy"))
        0.0
    """
    axis, keepdims = axis_from("safe_var", axis, dim, keepdims, keepdim)
    B = backend_for(x, backend=backend)
    x = B.convert(x)
    xa = B.cast(x, ACCUMULATE[_float(B, x, "safe_var")])
    ones = B.full_like(xa, 1.0)
    mean = B.sum(xa, axis=axis, keepdims=True) / B.sum(ones, axis=axis, keepdims=True)
    d = xa - mean
    n = B.sum(ones, axis=axis, keepdims=keepdims)
    denom = B.where(n - ddof >= 1, n - ddof, B.where(n > 0, B.full_like(n, 1.0), n))
    return B.sum(d * d, axis=axis, keepdims=keepdims) / denom


def safe_std(x, axis=None, ddof: int = 0, keepdims: bool = False, *, backend: str | None = None, dim=None,
             keepdim=None):
    """``safe_sqrt(safe_var(x))``: 0 with gradient 0 over one element or constant values.

    ``torch.std`` of constant values has a finite value but a 0/0 gradient;
    here every local derivative stays within ``1/sqrt(n - ddof)``.

    Example:
        >>> import numpy as np, stabilize
        >>> float(stabilize.safe_std(np.array([1.0, 3.0]), backend="numpy"))
        1.0
    """
    axis, keepdims = axis_from("safe_std", axis, dim, keepdims, keepdim)
    return safe_sqrt(safe_var(x, axis=axis, ddof=ddof, keepdims=keepdims, backend=backend), backend=backend)
