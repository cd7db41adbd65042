"""Run a stabilize op on one backend and bring values and gradients back as float64 numpy."""

from __future__ import annotations

import numpy as np

TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6, "float64": 1e-13}


def rounded(arr: np.ndarray, dtype: str) -> np.ndarray:
    """``arr`` rounded to ``dtype`` (round-to-nearest-even), returned as float64."""
    arr = np.asarray(arr, dtype=np.float64)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(arr).to(torch.bfloat16).to(torch.float64).numpy()
    return arr.astype(dtype).astype(np.float64)


def to_native(backend: str, arr, dtype: str, device: str = "cpu"):
    arr = np.asarray(arr)
    if backend == "torch":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(arr))
        if arr.dtype.kind == "f":
            t = t.to(getattr(torch, dtype))
        return t.to(device)
    import tensorflow as tf

    t = tf.constant(arr)
    return tf.cast(t, dtype) if arr.dtype.kind == "f" else t


def value_and_grads(backend, fn, inputs, dtype, device="cpu", wrt=None):
    """``fn(*native_inputs)`` and the gradients of ``sum(fn(...))`` w.r.t. float inputs."""
    wrt = [i for i, a in enumerate(inputs) if np.asarray(a).dtype.kind == "f"] if wrt is None else wrt
    xs = [to_native(backend, a, dtype, device) for a in inputs]
    if backend == "torch":
        import torch

        for i in wrt:
            xs[i].requires_grad_(True)
        y = fn(*xs)
        y.sum().backward()
        grads = [xs[i].grad for i in wrt]
        value = y.detach().to("cpu", torch.float64).numpy()
        return value, [g.to("cpu", torch.float64).numpy() for g in grads], str(y.dtype).replace("torch.", "")
    import tensorflow as tf

    with tf.GradientTape() as tape:
        for i in wrt:
            tape.watch(xs[i])
        y = fn(*xs)
        s = tf.reduce_sum(y)
    grads = tape.gradient(s, [xs[i] for i in wrt])
    return (
        tf.cast(y, tf.float64).numpy(),
        [tf.cast(g, tf.float64).numpy() for g in grads],
        y.dtype.name,
    )
