"""The safe ops on PyTorch and on TensorFlow: the same numbers from either.

Run: python examples/quickstart.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import stabilize

x = np.array([0.0, -0.0, -1.0, 1e-30, 0.5])

import torch  # noqa: E402

t = torch.tensor(x, dtype=torch.float32, requires_grad=True)
stabilize.safe_log(t).sum().backward()
print("torch  safe_log(x) grad:", t.grad.numpy())
print("torch  naive log(x):   ", torch.log(torch.tensor(x, dtype=torch.float32)).numpy())

import tensorflow as tf  # noqa: E402

v = tf.constant(x, tf.float32)
with tf.GradientTape() as tape:
    tape.watch(v)
    y = tf.reduce_sum(stabilize.safe_log(v))
print("tf     safe_log(x) grad:", tape.gradient(y, v).numpy())

# The clip coefficient is one formula everywhere, and a NaN norm is reported, not spread.
grads = [torch.tensor([3.0, 4.0]), torch.tensor([float("nan")])]
clipped, norm = stabilize.clip_grads(grads, max_norm=1.0)
print("clip_grads with a NaN gradient: norm =", norm.item(), "first grad untouched:", clipped[0].tolist())

X = {"input1": np.array([[1.0, 2.0], [np.nan, 4.0]]), "input2": np.array([[1e10], [np.inf]])}
report = stabilize.check_finite(X, name="X", raise_error=False)
print(report)
