"""The safe singular ops (stabilize.singular): the safe_log contract at their singular points."""

import math

import numpy as np
import pytest

import stabilize
from conftest import DTYPES, load_backend
from stabilize.backends.base import FLOAT_INFO
from stabilize.singular import _grad_bound

EDGES = [0.0, -0.0, 1.0, -1.0, -2.0, float("nan")]  # the special points: identical on both backends
SPECIAL = EDGES + [2.0, 1e-30, 0.25]
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}

OPS = {
    "safe_sqrt": (stabilize.safe_sqrt, lambda x: np.sqrt(x)),
    "safe_pow_0.5": (lambda x: stabilize.safe_pow(x, 0.5), lambda x: x**0.5),
    "safe_pow_1.5": (lambda x: stabilize.safe_pow(x, 1.5), lambda x: x**1.5),
    "safe_pow_-0.5": (lambda x: stabilize.safe_pow(x, -0.5), lambda x: x**-0.5),
    "safe_pow_-1": (lambda x: stabilize.safe_pow(x, -1), lambda x: 1.0 / x),
    "safe_acos": (stabilize.safe_acos, np.arccos),
    "safe_asin": (stabilize.safe_asin, np.arcsin),
}


def value_and_grad(backend, fn, values, dtype):
    """``fn`` and the gradient of its sum at ``values``, both as float64 numpy."""
    load_backend(backend)
    if backend == "torch":
        import torch

        x = torch.tensor(values, dtype=getattr(torch, dtype), requires_grad=True)
        y = fn(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        return y.detach().double().numpy(), g.double().numpy()
    import tensorflow as tf

    x = tf.constant(values, dtype=dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    g = tape.gradient(y, x)
    return tf.cast(y, tf.float64).numpy(), tf.cast(g, tf.float64).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_special_points_identical_on_torch_and_tensorflow(op, dtype):
    fn = OPS[op][0]
    v_t, g_t = value_and_grad("torch", fn, SPECIAL, dtype)
    v_f, g_f = value_and_grad("tensorflow", fn, SPECIAL, dtype)
    n = len(EDGES)
    np.testing.assert_array_equal(v_t[:n], v_f[:n])
    np.testing.assert_array_equal(g_t[:n], g_f[:n])
    np.testing.assert_allclose(v_t[n:], v_f[n:], rtol=TOL[dtype], atol=FLOAT_INFO[dtype].tiny)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_finite_bounded_informative_gradient_and_nan_propagation(backend, op, dtype):
    fn, ref = OPS[op]
    v, g = value_and_grad(backend, fn, SPECIAL, dtype)
    nan = np.isnan(np.asarray(SPECIAL))
    # NaN stays NaN in its own element; every other value and gradient is finite.
    assert np.isnan(v[nan]).all() and np.isnan(g[nan]).all()
    assert np.isfinite(v[~nan]).all() and np.isfinite(g[~nan]).all()
    assert np.abs(g[~nan]).max() <= _grad_bound(dtype)
    # Informative at the singular point: the gradient at 0 (sqrt, pow) or ±1 (acos, asin) is not zero.
    singular = [SPECIAL.index(1.0), SPECIAL.index(-1.0)] if "sin" in op or "cos" in op else [SPECIAL.index(0.0)]
    if op != "safe_pow_1.5":  # x**1.5 really has derivative 0 at 0
        assert (np.abs(g[singular]) > 0).all(), g
    # Away from the singular points (and inside the domain) the value is the float64 reference.
    inside = np.array([0.25, 2.0 if "sin" not in op and "cos" not in op else 0.5])
    v_in, _ = value_and_grad(backend, fn, inside.tolist(), dtype)
    np.testing.assert_allclose(v_in, ref(inside), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_exact_values_and_gradients_at_the_singular_points_float32(backend):
    v, g = value_and_grad(backend, stabilize.safe_sqrt, [0.0, -3.0, 4.0], "float32")
    assert v.tolist() == [0.0, 0.0, 2.0] and g.tolist() == [2.0**62, 2.0**62, 0.25]  # 0.5/sqrt(2^-126)
    v, g = value_and_grad(backend, stabilize.safe_acos, [1.0, -1.0, 1.5], "float32")
    edge = 1 - 2.0**-24
    expected = -1 / math.sqrt((1 - edge) * (1 + edge))
    assert v[0] == 0.0 and v[1] == pytest.approx(math.pi, rel=1e-7) and v[2] == 0.0
    np.testing.assert_allclose(g, [expected] * 3, rtol=1e-6)
    v, g = value_and_grad(backend, lambda x: stabilize.safe_pow(x, 0.5), [-8.0, 0.0, 4.0], "float32")
    assert v.tolist() == [0.0, 0.0, 2.0] and g[2] == 0.25 and g[0] == g[1] == 2.0**62


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_norm_distance_of_identical_points_has_zero_gradient_not_nan(backend):
    def dist(x):
        return stabilize.safe_norm(x - x * 0.0 - 1.0 + 1.0 - x, axis=-1)

    v, g = value_and_grad(backend, dist, [[1.0, 2.0], [3.0, 4.0]], "float32")
    assert v.tolist() == [0.0, 0.0] and g.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    v, g = value_and_grad(backend, lambda x: stabilize.safe_norm(x, axis=-1), [[3.0, 4.0], [1e30, 1e30]], "float32")
    np.testing.assert_allclose(v, [5.0, math.sqrt(2) * 1e30], rtol=1e-6)  # no overflow of the squares
    np.testing.assert_allclose(g, [[0.6, 0.8], [2**-0.5, 2**-0.5]], rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_masked_softmax_all_masked_row_is_zero_with_zero_gradient(backend, dtype):
    ninf = float("-inf")
    logits = [[1.0, 2.0, ninf], [ninf, ninf, ninf], [0.5, float("nan"), 0.0]]
    weights = np.array([[1.0, 2.0, 3.0]])
    load_backend(backend)
    v, g = value_and_grad(backend, lambda z: stabilize.masked_softmax(z) * stabilize.get_backend(backend).convert(weights, dtype), logits, dtype)
    e = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    np.testing.assert_allclose(v[0], [e[0], 2 * e[1], 0.0], rtol=TOL[dtype])
    assert v[1].tolist() == [0.0, 0.0, 0.0] and g[1].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(v[2]).all()  # a kept NaN makes its row NaN, as the plain softmax does
    assert np.isfinite(g[:2]).all() and g[0, 2] == 0.0 and abs(g[0, 0]) > 0


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_masked_softmax_with_a_boolean_mask_matches_the_plain_softmax_where_rows_are_kept(backend):
    z = np.array([[0.3, -1.0, 2.0], [5.0, 5.0, 5.0]])
    mask = np.array([[True, False, True], [False, False, False]])
    B = load_backend(backend)
    out = np.asarray(B.to_numpy(stabilize.masked_softmax(B.convert(z), B.convert(mask))), dtype=np.float64)
    kept = np.exp([0.3, 2.0]) / np.exp([0.3, 2.0]).sum()
    np.testing.assert_allclose(out, [[kept[0], 0.0, kept[1]], [0.0, 0.0, 0.0]], rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_std_and_var_of_one_sample_and_of_constant_values(backend):
    v, g = value_and_grad(backend, lambda x: stabilize.safe_std(x, axis=0, ddof=1), [[2.0, -1.0]], "float32")
    assert v.tolist() == [0.0, 0.0] and g.tolist() == [[0.0, 0.0]]
    v, g = value_and_grad(backend, lambda x: stabilize.safe_std(x), [0.1, 0.1, 0.1], "float32")
    assert v.tolist() == [0.0] or float(v) == 0.0
    assert np.isfinite(g).all() and np.abs(g).max() <= 1.0
    x = [1.0, 2.0, 4.0]
    v, g = value_and_grad(backend, lambda t: stabilize.safe_var(t, ddof=1), x, "float64")
    assert float(v) == pytest.approx(np.var(x, ddof=1), rel=1e-14)
    np.testing.assert_allclose(g, 2 * (np.array(x) - np.mean(x)) / 2, rtol=1e-14)
    v, _ = value_and_grad(backend, lambda t: stabilize.safe_std(t), x, "float64")
    assert float(v) == pytest.approx(np.std(x), rel=1e-14)


def test_the_plain_ops_really_fail_where_the_safe_ones_do_not():
    """The reproductions the safe ops answer (so the tests above cannot pass vacuously)."""
    load_backend("torch")
    import torch

    x = torch.zeros(3, requires_grad=True)
    (g,) = torch.autograd.grad(torch.sqrt(x * x).sum(), x)
    assert torch.isnan(g).all()
    x = torch.ones(2, requires_grad=True)
    (g,) = torch.autograd.grad(torch.acos(x).sum(), x)
    assert torch.isinf(g).all()
    x = torch.tensor([[3.0]], requires_grad=True)
    assert torch.isnan(torch.std(x, dim=0)).all()
    assert torch.isnan(torch.softmax(torch.full((1, 3), float("-inf")), -1)).all()


GRADCHECK = {
    "safe_sqrt": (stabilize.safe_sqrt, [0.5, 2.0, 3.0]),
    "safe_pow": (lambda x: stabilize.safe_pow(x, 0.3), [0.5, 2.0, 3.0]),
    "safe_pow_neg": (lambda x: stabilize.safe_pow(x, -2), [-0.5, 2.0, 3.0]),
    "safe_acos": (stabilize.safe_acos, [-0.5, 0.2, 0.7]),
    "safe_asin": (stabilize.safe_asin, [-0.5, 0.2, 0.7]),
    "safe_norm": (lambda x: stabilize.safe_norm(x), [-0.5, 0.2, 0.7]),
    "safe_std": (lambda x: stabilize.safe_std(x, ddof=1), [-0.5, 0.2, 0.7]),
    "masked_softmax": (stabilize.masked_softmax, [-0.5, 0.2, 0.7]),
}


@pytest.mark.parametrize("op", sorted(GRADCHECK))
def test_gradcheck_float64_away_from_the_singularity(op):
    fn, values = GRADCHECK[op]
    load_backend("torch")
    import torch

    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: (fn(t) * w[: fn(t).numel()]).sum(), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    load_backend("tensorflow")
    import tensorflow as tf

    wt = tf.constant([1.0, -2.0, 0.5], tf.float64)
    f = lambda t: tf.reduce_sum(tf.reshape(fn(t), [-1]) * wt[: int(tf.size(fn(t)))])
    theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(values, tf.float64)], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-7)
