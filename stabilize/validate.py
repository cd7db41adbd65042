"""Argument checks shared by every public entry point.

Each check either returns the value (as the type the caller needs) or raises
one error that says what was received, what is allowed and what to pass
instead. Nothing the user gave is converted silently: ``"1.0"`` is rejected,
not parsed, and ``True`` is not a number here.

Example:
    >>> from stabilize.validate import check_positive_finite
    >>> check_positive_finite("clip_norm", 1)
    1.0
    >>> check_positive_finite("clip_norm", "1.0")
    Traceback (most recent call last):
    ...
    TypeError: clip_norm must be a positive finite number, got the str '1.0'; pass a number, e.g. clip_norm=1.0
"""

from __future__ import annotations

import math
import numbers

from .backends.base import FLOAT_INFO

__all__ = [
    "check_positive_finite",
    "check_positive",
    "check_count",
    "check_nonempty",
    "check_optimizer",
    "check_path",
    "float_dtype",
    "convert",
]


def _shown(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"the {type(value).__name__} {text}"


def _number(name: str, value, what: str, example: str, op: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        size = getattr(value, "size", getattr(value, "numel", lambda: None))
        size = size() if callable(size) else size
        if size == 1 and not isinstance(value, (str, bytes, bool)):  # a 0-d array or tensor
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"{_prefix(op)}{name} must be {what}, got {_shown(value)}; pass a number, e.g. {name}={example}")
    return float(value)


def _prefix(op):
    return f"{op}: " if op else ""


def check_positive_finite(name: str, value, example: str = "1.0", op: str | None = None) -> float:
    """``value`` as a float if it is a real number, > 0 and finite; else a clear error.

    Strings, booleans, NaN, inf, zero and negatives are rejected (``TypeError``
    for a non-number, ``ValueError`` for a number out of range). ``op`` names
    the function in the message.
    """
    what = "a positive finite number"
    v = _number(name, value, what, example, op)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{_prefix(op)}{name} must be {what}, got {value!r}; pass e.g. {name}={example}")
    return v


def check_positive(name: str, value, example: str = "1.0", inf_means: str = "no limit", op: str | None = None) -> float:
    """Like :func:`check_positive_finite`, but ``math.inf`` is allowed (it means ``inf_means``)."""
    what = f"a positive number (or math.inf: {inf_means})"
    v = _number(name, value, what, example, op)
    if not v > 0:  # NaN fails here too
        raise ValueError(f"{_prefix(op)}{name} must be {what}, got {value!r}; pass e.g. {name}={example}")
    return v


def check_count(name: str, value, minimum: int = 1, why: str = "pass a larger value") -> int:
    """``value`` as an int if it is an integer >= ``minimum``; ``why`` ends the error message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}; {why}")
    return int(value)


def check_nonempty(name: str, n_rows: int) -> None:
    """Raise when a dataset has no rows (a fit on it would report '0 steps, final loss nan')."""
    if n_rows == 0:
        raise ValueError(f"{name} has 0 rows, so no training step can run; check the slice, "
                         f"filter or loader that produced it")


def check_optimizer(name: str, value, accepted: str) -> None:
    """Reject an optimizer given by name (``'adam'``): the object is needed, not a string."""
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be an optimizer object ({accepted}), got the string {value!r}; "
            f"create it first, e.g. keras.optimizers.Adam(1e-3) or stabilize.optim.Adam(lr=1e-3)"
        )


def float_dtype(B, x, op: str) -> str:
    """The canonical float dtype of tensor ``x``; ``TypeError`` for integer or bool tensors."""
    dt = B.dtype(x)
    if dt not in FLOAT_INFO:
        raise TypeError(
            f"{op} expects a floating tensor (float16, bfloat16, float32, float64), "
            f"got {dt}; cast it first, e.g. x.float() or tf.cast(x, 'float32')"
        )
    return dt


def convert(B, x, op: str, arg: str, dtype: str | None = None):
    """``B.convert(x)``, or a ``TypeError`` naming the op and argument instead of the framework's."""
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{op}: {arg} must be a tensor, an array or a number, got {_shown(x)}")
    try:
        return B.convert(x, dtype) if dtype is not None else B.convert(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{op}: {arg} could not be made into a {B.name} tensor ({_shown(x)}); "
            f"pass a tensor, a numeric array or a number"
        ) from None  # the framework's own message names its internals, not the user's call


def check_path(path, op: str):
    """``path`` if it is a str or ``os.PathLike`` (a file path); else one TypeError naming the argument."""
    import os

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: path must be a file path (a str or a pathlib.Path), got {type(path).__name__} "
                        f"{path!r:.60}; e.g. {op}('run.ckpt')")
    return path
