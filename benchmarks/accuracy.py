"""Worst-case error of each safe op against a float64 numpy reference, per dtype and backend.

For each op, inputs are drawn log-uniformly across the dtype's range (both
signs where the op allows), rounded to the dtype, and the op's value and
gradient are compared with the float64 formula evaluated on the rounded inputs.
Values: the largest element-wise relative error where the true result is a
normal number of the dtype (a result that underflows to a subnormal or 0
carries no relative precision). Gradients: the normwise relative error
``max|g - ref| / max|ref|``, as in finite-difference gradient checks. In
brackets, the same in units of the dtype's machine epsilon.

Run: python benchmarks/accuracy.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np

import stabilize
from stabilize.backends.base import FLOAT_INFO
from helpers import rounded, value_and_grads

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _rel(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(b) & (np.abs(b) >= FLOAT_INFO[dtype].tiny)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.abs(b[ok]))) if ok.any() else 0.0


def _normwise(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def cases(dtype, rng):
    info = FLOAT_INFO[dtype]
    lo, hi = np.log(info.tiny) + 1, np.log(info.max) - 2
    pos = rounded(np.exp(rng.uniform(lo, hi, 2000)), dtype)
    x = rounded(rng.normal(size=(64, 8)) * 10, dtype)
    t = rounded(rng.normal(size=(64, 8)), dtype)
    b = rounded(np.sign(rng.normal(size=2000)) * np.exp(rng.uniform(np.log(np.sqrt(info.tiny)) + 1, 5, 2000)), dtype)
    a = rounded(rng.normal(size=2000), dtype)
    z = rounded(rng.normal(size=(64, 5)) * 20, dtype)
    labels = rng.integers(0, 5, 64)
    zl = z - z.max(1, keepdims=True)
    logp = zl - np.log(np.exp(zl).sum(1, keepdims=True))
    onehot = np.eye(5)[labels]
    return {
        "safe_log": (lambda v: stabilize.safe_log(v), [pos], np.log(pos), [1 / pos]),
        "safe_div": (lambda u, v: stabilize.safe_div(u, v), [a, b], a / b, [1 / b, -a / b**2]),
        "safe_mse": (lambda p, q: stabilize.safe_mse(p, q), [x, t], np.mean((x - t) ** 2), [2 * (x - t) / x.size]),
        "safe_cross_entropy": (lambda v, l: stabilize.safe_cross_entropy(v, l), [z, labels],
                               -(onehot * logp).sum(1).mean(), [(np.exp(logp) - onehot) / 64]),
    }


def main():
    rng = np.random.default_rng(0)
    print(f"{'op':20s} {'dtype':9s} {'backend':11s} {'value rel err':>22s} {'gradient normwise err':>22s}")
    for dtype in DTYPES:
        eps = FLOAT_INFO[dtype].eps
        for op, (fn, inputs, ref, ref_grads) in cases(dtype, rng).items():
            wrt = [i for i, v in enumerate(inputs) if np.asarray(v).dtype.kind == "f"]
            for backend in ("torch", "tensorflow"):
                value, grads, _ = value_and_grads(backend, fn, inputs, dtype, wrt=wrt)
                ev = _rel(value, ref, dtype)
                eg = max(_normwise(g, r) for g, r in zip(grads, ref_grads))
                print(f"{op:20s} {dtype:9s} {backend:11s} {ev:12.3e} ({ev / eps:5.2f} eps) {eg:12.3e} ({eg / eps:5.2f} eps)")


if __name__ == "__main__":
    main()
