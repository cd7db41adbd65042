"""Finite-difference gradient checks in float64, away from each op's floor."""

import numpy as np
import pytest

import stabilize

RNG = np.random.default_rng(7)
POS = RNG.uniform(0.5, 3.0, (3, 4))
SIGNED = RNG.normal(size=(3, 4))
DENOM = np.sign(SIGNED + 1e-3) * RNG.uniform(0.5, 2.0, (3, 4))
LABELS = np.array([0, 3, 1])

CASES = {
    "safe_log": (lambda x: stabilize.safe_log(x), [POS]),
    "safe_div": (lambda a, b: stabilize.safe_div(a, b), [SIGNED, DENOM]),
    "safe_mse": (lambda p, t: stabilize.safe_mse(p, t), [SIGNED, POS]),
    "safe_mse_sum": (lambda p, t: stabilize.safe_mse(p, t, reduction="sum"), [SIGNED, POS]),
    "safe_cross_entropy": (lambda z: stabilize.safe_cross_entropy(z, LABELS_NATIVE[0]), [SIGNED]),
}
LABELS_NATIVE = [None]


@pytest.mark.parametrize("op", sorted(CASES))
def test_gradcheck_float64_torch(op):
    from conftest import load_backend

    load_backend("torch")
    import torch

    fn, inputs = CASES[op]
    LABELS_NATIVE[0] = torch.from_numpy(LABELS)
    xs = tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in inputs)
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("op", sorted(CASES))
def test_compute_gradient_float64_tensorflow(op):
    from conftest import load_backend

    load_backend("tensorflow")
    import tensorflow as tf

    fn, inputs = CASES[op]
    LABELS_NATIVE[0] = tf.constant(LABELS)
    xs = [tf.constant(a, tf.float64) for a in inputs]
    theoretical, numerical = tf.test.compute_gradient(fn, xs, delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7)
