"""The numpy backend: the float64 reference and the home of numpy-only inputs.

numpy has no autodiff, so ``custom_grad`` only runs the forward pass and
``stop_gradient`` is the identity. It has no bfloat16 either.
"""

from __future__ import annotations

import numpy as np

from .base import Backend

__all__ = ["NumpyBackend"]


class NumpyBackend(Backend):
    name = "numpy"
    framework_module = "numpy"

    def is_tensor(self, x):
        return isinstance(x, (np.ndarray, np.generic))

    def convert(self, x, dtype=None):
        arr = np.asarray(x)
        return arr.astype(dtype) if dtype is not None and arr.dtype != dtype else arr

    def to_numpy(self, x):
        return np.asarray(x)

    def dtype(self, x):
        return np.asarray(x).dtype.name

    def cast(self, x, dtype):
        return np.asarray(x).astype(dtype)

    def shape(self, x):
        return tuple(np.shape(x))

    def full_like(self, x, value):
        return np.full_like(x, value)

    def numel(self, x, dtype):
        return int(np.size(x))

    def rows(self, x, dtype):
        return int(np.shape(x)[0])

    def where(self, cond, a, b):
        out = np.where(cond, a, b)
        like = a if isinstance(a, np.ndarray) else b
        return out.astype(like.dtype) if isinstance(like, np.ndarray) else out

    def abs(self, x):
        return np.abs(x)

    def log(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)

    def exp(self, x):
        with np.errstate(over="ignore"):
            return np.exp(x)

    def sqrt(self, x):
        with np.errstate(invalid="ignore"):
            return np.sqrt(x)

    def acos(self, x):
        with np.errstate(invalid="ignore"):
            return np.arccos(x)

    def asin(self, x):
        with np.errstate(invalid="ignore"):
            return np.arcsin(x)

    def isfinite(self, x):
        return np.isfinite(x)

    def isnan(self, x):
        return np.isnan(x)

    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def amax(self, x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)  # np.max propagates NaN

    def all(self, x):
        return np.all(x)

    def norms(self, xs, ord, dtype):
        with np.errstate(over="ignore", invalid="ignore"):
            return [np.asarray(np.linalg.norm(np.asarray(x, dtype=dtype).ravel(), ord=ord), dtype=dtype) if np.size(x)
                    else np.asarray(0.0, dtype=dtype) for x in xs]

    def all_finite(self, xs):
        return np.bool_(all(np.isfinite(x).all() for x in xs))

    def stop_gradient(self, x):
        return x

    def custom_grad(self, forward, backward):
        def call(*xs):
            with np.errstate(all="ignore"):
                return forward(*xs)[0]

        return call

    def one_hot(self, labels, num_classes, dtype):
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
        return np.eye(num_classes, dtype=dtype)[labels]
