"""The reliability table for numeric functions, row by row, on every backend and dtype."""

import math

import numpy as np
import pytest

import stabilize
from stabilize.backends.base import FLOAT_INFO
from stabilize.ops import grad_bound
from conftest import DTYPES
from helpers import TOL, rounded, value_and_grads

def _cuda_is_torch_only(backend, device):
    if backend != "torch" and device != "cpu":
        pytest.skip("CUDA runs the torch backend only")


BELOW_FLOOR = np.array([0.0, -0.0, -1.0, -np.inf, -1e300])


def _below(dtype):
    tiny = FLOAT_INFO[dtype].tiny
    # Subnormals of this dtype, and the floor itself.
    return np.concatenate([BELOW_FLOOR, [tiny / 2, -tiny / 2, tiny / 4, tiny / 1024, tiny]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_log_below_floor_finite_value_nonzero_gradient(backend, dtype, device):
    _cuda_is_torch_only(backend, device)
    x = _below(dtype)
    value, (grad,), _ = value_and_grads(backend, stabilize.safe_log, [x], dtype, device)
    tiny = FLOAT_INFO[dtype].tiny
    np.testing.assert_array_equal(value, rounded(np.full_like(x, math.log(tiny)), dtype))
    # The gradient bound (1/floor would be 8.5e37 in float32: inf once scaled by 5):
    # finite, positive (towards larger x), never the zero of clip_by_value.
    np.testing.assert_array_equal(grad, np.full_like(x, grad_bound(dtype)))
    assert np.all(np.isfinite(grad)) and np.all(grad > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_log_above_floor_matches_float64_log_and_reciprocal_gradient(backend, dtype, device):
    _cuda_is_torch_only(backend, device)
    rng = np.random.default_rng(0)
    tiny, big = FLOAT_INFO[dtype].tiny, FLOAT_INFO[dtype].max
    x = rounded(np.exp(rng.uniform(np.log(tiny) + 1, np.log(big) - 1, 500)), dtype)
    value, (grad,), _ = value_and_grads(backend, stabilize.safe_log, [x], dtype, device)
    tol = TOL[dtype]
    np.testing.assert_allclose(value, np.log(x), rtol=tol, atol=tol)
    # 1/x, capped at the gradient bound below x = 1/bound (5.4e-20 in float32, 0.0039 in float16).
    np.testing.assert_allclose(grad, np.minimum(1.0 / x, grad_bound(dtype)), rtol=tol)
    assert np.any(1.0 / x > grad_bound(dtype)) and np.any(1.0 / x < grad_bound(dtype))  # both regimes drawn


def _ops():
    return {
        "safe_log": (lambda x, y: stabilize.safe_log(x), [0]),
        "safe_div": (lambda x, y: stabilize.safe_div(x, y), [0, 1]),
        "safe_mse_none": (lambda x, y: stabilize.safe_mse(x, y, reduction="none"), [0, 1]),
    }


@pytest.mark.parametrize("op", sorted(_ops()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_propagates_in_its_own_element_only(backend, device, op, dtype):
    _cuda_is_torch_only(backend, device)
    fn, wrt = _ops()[op]
    x = np.array([1.5, np.nan, 2.0, 0.25, 0.0])
    y = np.array([0.5, 1.0, 2.0, 4.0, 0.0])
    value, grads, _ = value_and_grads(backend, fn, [x, y], dtype, device, wrt=wrt)
    clean = np.array([True, False, True, True, True])
    ref_value, ref_grads, _ = value_and_grads(backend, fn, [np.where(clean, x, 1.0), y], dtype, device, wrt=wrt)
    assert np.isnan(value[1])  # never turned into a number
    np.testing.assert_array_equal(value[clean], ref_value[clean])
    for g, rg in zip(grads, ref_grads):
        # The NaN element's own gradient is whatever the math gives (d(a/b)/da = 1/b);
        # every other element is untouched.
        np.testing.assert_array_equal(g[clean], rg[clean])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_propagate_nan(backend, dtype):
    x = np.array([[1.5, np.nan], [2.0, 0.25]])
    t = np.zeros_like(x)
    assert np.isnan(value_and_grads(backend, stabilize.safe_mse, [x, t], dtype)[0])
    labels = np.array([0, 1])
    loss = value_and_grads(backend, lambda z, lab: stabilize.safe_cross_entropy(z, lab, reduction="none"), [x, labels], dtype)[0]
    assert np.isnan(loss[0]) and np.isfinite(loss[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_safe_mse_half_precision_large_difference_is_finite_and_accumulates_float32(backend, device, dtype):
    _cuda_is_torch_only(backend, device)
    pred = np.array([300.0, -1000.0, 0.5, 20000.0])
    target = np.array([0.0, 1000.0, 0.0, -20000.0])
    value, (gp, gt), out_dtype = value_and_grads(backend, stabilize.safe_mse, [pred, target], dtype, device)
    p, t = rounded(pred, dtype), rounded(target, dtype)
    assert out_dtype == "float32"
    assert np.isfinite(value)
    np.testing.assert_allclose(value, np.mean((p - t) ** 2), rtol=1e-6)
    np.testing.assert_allclose(gp, rounded(2 * (p - t) / 4, dtype), rtol=0)
    np.testing.assert_allclose(gt, -gp, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_safe_mse_sum_of_squares_does_not_overflow_before_the_mean(backend, dtype):
    big = math.sqrt(FLOAT_INFO[dtype].max) * 0.9  # big**2 fits, 4 * big**2 does not
    pred = np.array([big, big, big, big])
    value, _, _ = value_and_grads(backend, stabilize.safe_mse, [pred, np.zeros(4)], dtype)
    ref = rounded(pred, dtype)[0] ** 2
    np.testing.assert_allclose(value, ref, rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_mse_matches_float64_reference(backend, device, dtype):
    _cuda_is_torch_only(backend, device)
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(8, 3)) * 10, rng.normal(size=(8, 3))
    for reduction, ref_fn, n in (("mean", np.mean, 24), ("sum", np.sum, 1)):
        fn = lambda p, t: stabilize.safe_mse(p, t, reduction=reduction)
        value, (gp, gt), _ = value_and_grads(backend, fn, [pred, target], dtype, device)
        p, t = rounded(pred, dtype), rounded(target, dtype)
        np.testing.assert_allclose(value, ref_fn((p - t) ** 2), rtol=max(TOL[dtype], 1e-6))
        np.testing.assert_allclose(gp, 2 * (p - t) / n, rtol=TOL[dtype], atol=TOL[dtype] * 1e-3)


def test_safe_mse_rejects_mismatched_shapes(backend):
    with pytest.raises(ValueError, match=r"reshape"):
        value_and_grads(backend, stabilize.safe_mse, [np.zeros((4, 1)), np.zeros(4)], "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_div_matches_reference_and_floors_small_denominators(backend, device, dtype):
    _cuda_is_torch_only(backend, device)
    eps = math.sqrt(FLOAT_INFO[dtype].tiny)
    a = np.array([1.0, -2.0, 0.5, 1.0, 1.0, 3.0])
    b = np.array([4.0, 0.5, 0.0, -0.0, -1e-300, 1e-300])
    value, (ga, gb), _ = value_and_grads(backend, stabilize.safe_div, [a, b], dtype, device)
    ar, br = rounded(a, dtype), rounded(b, dtype)
    bs = np.where(np.abs(br) < eps, np.where(br < 0, -eps, eps), br)
    tol = TOL[dtype]
    np.testing.assert_allclose(value, a / bs, rtol=tol)
    np.testing.assert_allclose(ga, 1 / bs, rtol=tol)
    bound = grad_bound(dtype)
    np.testing.assert_allclose(gb, np.clip(-ar / bs**2, -bound, bound), rtol=tol * 2)
    assert np.any(np.abs(ar / bs**2) > bound)  # the cap is exercised: -a/b**2 at the floor is 1/tiny
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.all(gb[2:] != 0)  # the floored region keeps an informative gradient


def test_safe_div_broadcast_gradient_is_summed_back(backend):
    a = np.arange(6.0).reshape(2, 3) + 1
    b = np.array([[2.0], [4.0]])
    value, (ga, gb), _ = value_and_grads(backend, stabilize.safe_div, [a, b], "float64")
    np.testing.assert_allclose(value, a / b, rtol=1e-15)
    np.testing.assert_allclose(gb, (-a / b**2).sum(axis=1, keepdims=True), rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_cross_entropy_matches_float64_reference_sparse_and_one_hot(backend, device, dtype):
    _cuda_is_torch_only(backend, device)
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 4)) * 30
    labels = rng.integers(0, 4, 6)
    zr = rounded(z, dtype)
    logp = zr - zr.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    onehot = np.eye(4)[labels]
    ref = -(onehot * logp).sum(1).mean()
    ref_grad = (np.exp(logp) - onehot) / 6
    tol = max(TOL[dtype], 1e-6)
    for lab in (labels, onehot):
        value, (g,), _ = value_and_grads(backend, stabilize.safe_cross_entropy, [z, lab], dtype, device, wrt=[0])
        np.testing.assert_allclose(value, ref, rtol=tol)
        np.testing.assert_allclose(g, ref_grad, rtol=tol, atol=max(TOL[dtype], 1e-7))


def test_safe_cross_entropy_saturated_logits_stay_finite_where_log_softmax_of_probs_fails(backend):
    z = np.array([[200.0, -200.0], [0.0, 1e4]])
    labels = np.array([1, 0])
    value, (g,), _ = value_and_grads(
        backend, lambda a, b: stabilize.safe_cross_entropy(a, b, reduction="none"), [z, labels], "float32", wrt=[0]
    )
    np.testing.assert_allclose(value, [400.0, 1e4], rtol=1e-6)
    np.testing.assert_allclose(g, [[1.0, -1.0], [-1.0, 1.0]], atol=1e-6)


def test_safe_cross_entropy_masked_minus_inf_logit(backend):
    z = np.array([[1.0, -np.inf, 0.0]])
    value, (g,), _ = value_and_grads(backend, stabilize.safe_cross_entropy, [z, np.array([0])], "float64", wrt=[0])
    ref = -(1.0 - np.log(np.e + 1.0))
    np.testing.assert_allclose(value, ref, rtol=1e-15)
    assert np.all(np.isfinite(g)) and g[0, 1] == 0.0


def test_safe_cross_entropy_rejects_out_of_range_labels(backend):
    with pytest.raises(Exception, match=r"(?i)(label|index|class)"):
        value_and_grads(backend, stabilize.safe_cross_entropy, [np.zeros((2, 3)), np.array([0, 3])], "float32", wrt=[0])


def test_ops_reject_integer_input_with_advice(backend):
    with pytest.raises(TypeError, match=r"cast it first"):
        value_and_grads(backend, stabilize.safe_log, [np.array([1, 2])], "float32", wrt=[])


def test_all_finite_primitive_is_exact_in_each_dtype(backend):
    """Regression: a large but finite float64 value must not read as inf (no float32 cast)."""
    B = stabilize.get_backend(backend)
    from helpers import to_native

    big = to_native(backend, np.array([1e300, -1e300]), "float64")
    assert bool(B.to_numpy(B.all_finite([big, to_native(backend, np.ones(3), "float32")])))
    for bad in (np.nan, np.inf, -np.inf):
        t = to_native(backend, np.array([1.0, bad, 2.0]), "float64")
        assert not bool(B.to_numpy(B.all_finite([big, t])))
