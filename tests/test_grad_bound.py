"""The safe ops' gradient bound: every local derivative is at most ``grad_bound(dtype)``,
so an ordinary loss (``c * safe_log(x).sum()``, ``safe_log(x) ** 2``, a loss scale)
keeps a finite gradient for any upstream factor up to the bound."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stabilize
from stabilize.backends.base import FLOAT_INFO
from stabilize.ops import grad_bound
from helpers import TOL, rounded, value_and_grads

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
WIDTH = {"float16": 16, "float32": 32, "float64": 64}


def test_grad_bound_is_the_largest_number_whose_square_is_finite():
    assert grad_bound("float16") == 255.875
    assert grad_bound("float32") == 18446742974197923840.0  # 2**64 - 2**40
    assert grad_bound("float64") == pytest.approx(1.3407807929942596e154, rel=1e-15)
    assert grad_bound("bfloat16") == pytest.approx(1.8374686e19, rel=1e-7)
    for name, info in FLOAT_INFO.items():
        g = grad_bound(name)
        bits = round(-math.log2(info.eps)) + 1
        mantissa, exponent = math.frexp(g)
        assert mantissa * 2**bits == int(mantissa * 2**bits)  # representable in the dtype
        next_up = g + math.ldexp(1.0, exponent - bits)
        assert Fraction(g) ** 2 <= Fraction(info.max) < Fraction(next_up) ** 2


def test_grad_bound_accepts_framework_dtypes_and_rejects_integers():
    assert grad_bound(np.float32) == grad_bound(np.dtype("float32")) == grad_bound("float32")
    with pytest.raises(TypeError, match="not a floating dtype; use one of float16"):
        grad_bound("int64")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_the_issue_examples_have_finite_gradients(backend, dtype):
    """``5 * safe_log(x).sum()`` gave inf and ``safe_log(x) ** 2`` gave -inf at the floor."""
    x = np.array([0.0, -1.0, -np.inf, 0.5])
    g = grad_bound(dtype)
    _, (grad,), _ = value_and_grads(backend, lambda t: 5 * stabilize.safe_log(t), [x], dtype)
    np.testing.assert_allclose(grad, rounded([5 * g, 5 * g, 5 * g, 10.0], dtype), rtol=TOL[dtype])
    _, (grad,), _ = value_and_grads(backend, lambda t: stabilize.safe_log(t) ** 2, [x], dtype)
    log_floor = float(rounded([math.log(FLOAT_INFO[dtype].tiny)], dtype)[0])
    expected = [2 * log_floor * g] * 3 + [2 * math.log(0.5) / 0.5]
    np.testing.assert_allclose(grad, expected, rtol=4 * TOL[dtype])
    assert np.all(np.isfinite(grad)) and np.all(grad[:3] < 0)


def _upstream(dtype):
    """An upstream factor of either sign whose magnitude is log-uniform up to the bound."""
    top = math.log2(grad_bound(dtype))
    return st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(-top, top)).map(
        lambda sv: min(grad_bound(dtype), sv[0] * 2.0 ** sv[1]) if sv[0] > 0 else max(-grad_bound(dtype), sv[0] * 2.0 ** sv[1]))


def _finite(dtype, n=6):
    return hnp.arrays(np.float64, st.integers(1, n), elements=st.floats(
        allow_nan=False, allow_infinity=False, allow_subnormal=True, width=WIDTH[dtype]))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_log_gradient_finite_under_any_upstream_factor_up_to_the_bound(backend, dtype, data):
    x, c = data.draw(_finite(dtype)), data.draw(_upstream(dtype))
    cr = float(rounded([c], dtype)[0])
    _, (grad,), _ = value_and_grads(backend, lambda t: cr * stabilize.safe_log(t), [x], dtype)
    xr = rounded(x, dtype)
    with np.errstate(divide="ignore", over="ignore"):
        local = np.minimum(1.0 / np.maximum(xr, FLOAT_INFO[dtype].tiny), grad_bound(dtype))
    assert np.all(np.isfinite(grad))
    # TF flushes subnormal results, intermediate ones (the local 1/x) included, to zero;
    # elsewhere the float64 reference holds.
    ref = cr * local
    normal = (np.abs(ref) >= FLOAT_INFO[dtype].tiny) & (np.abs(local) >= FLOAT_INFO[dtype].tiny)
    np.testing.assert_allclose(grad[normal], ref[normal], rtol=2 * TOL[dtype])
    _, (grad2,), _ = value_and_grads(backend, lambda t: stabilize.safe_log(t) ** 2, [x], dtype)
    assert np.all(np.isfinite(grad2))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_div_gradient_finite_under_any_upstream_factor_up_to_the_bound(backend, dtype, data):
    a, c = data.draw(_finite(dtype)), data.draw(_upstream(dtype))
    b = data.draw(hnp.arrays(np.float64, a.shape, elements=st.floats(
        allow_nan=False, allow_infinity=False, allow_subnormal=True, width=WIDTH[dtype])))
    cr = float(rounded([c], dtype)[0])
    _, (ga, gb), _ = value_and_grads(backend, lambda p, q: cr * stabilize.safe_div(p, q), [a, b], dtype)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.all(np.abs(ga) <= abs(cr) * grad_bound(dtype)) and np.all(np.abs(gb) <= abs(cr) * grad_bound(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_mse_gradient_finite_under_any_upstream_factor_up_to_the_bound(backend, dtype, data):
    p, c = data.draw(_finite(dtype)), data.draw(_upstream(dtype))
    t = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(
        allow_nan=False, allow_infinity=False, width=WIDTH[dtype])))
    cr = float(rounded([c], dtype)[0])
    _, (gp, gt), _ = value_and_grads(backend, lambda u, v: cr * stabilize.safe_mse(u, v, reduction="sum"), [p, t], dtype)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gt))
    pr, tr = rounded(p, dtype), rounded(t, dtype)
    with np.errstate(over="ignore"):  # 2 (p - t) may overflow float64: the cap applies there
        ref = cr * np.clip(2 * (pr - tr), -grad_bound(dtype), grad_bound(dtype))
    normal = np.abs(ref) >= FLOAT_INFO[dtype].tiny
    np.testing.assert_allclose(gp[normal], ref[normal], rtol=2 * TOL[dtype])


def test_safe_mse_mean_of_nothing_is_an_error_and_sum_is_zero(backend):
    empty = np.zeros(0)
    with pytest.raises(ValueError, match="empty .*reduction='sum'"):
        value_and_grads(backend, stabilize.safe_mse, [empty, empty], "float32")
    value, (gp, gt), _ = value_and_grads(backend, lambda p, t: stabilize.safe_mse(p, t, reduction="sum"),
                                         [empty, empty], "float32")
    assert float(value) == 0.0 and gp.shape == (0,) and gt.shape == (0,)
