"""Hypothesis sweeps with NaN, inf and subnormals allowed, plus the cross-backend identity row."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stabilize
from stabilize.backends.base import FLOAT_INFO
from helpers import rounded, value_and_grads

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _arrays(width, n=8, **kw):
    return hnp.arrays(
        np.float64 if width == 64 else np.float32,
        st.integers(1, n),
        elements=st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=width, **kw),
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_log_finite_input_never_produces_new_nonfinite_value_or_gradient(backend, dtype, data):
    x = data.draw(_arrays(32 if dtype == "float32" else 64))
    value, (grad,), _ = value_and_grads(backend, stabilize.safe_log, [x], dtype)
    xr = rounded(x, dtype)
    finite = np.isfinite(xr)
    assert np.all(np.isfinite(value[finite])) and np.all(np.isfinite(grad[finite]))
    # Never the zero "fake" gradient; 1/x itself underflows only past 1/tiny
    # (TF flushes such subnormal results to zero, torch keeps them).
    representable = finite & (np.abs(xr) < 1.0 / FLOAT_INFO[dtype].tiny / 2)
    assert np.all(grad[representable] > 0)
    below = xr <= FLOAT_INFO[dtype].tiny
    assert np.all(np.isfinite(value[below & ~np.isnan(xr)]))  # -inf too
    np.testing.assert_array_equal(np.isnan(value), np.isnan(xr))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_div_finite_input_never_produces_new_nonfinite(backend, dtype, data):
    a = data.draw(_arrays(32 if dtype == "float32" else 64))
    b = data.draw(hnp.arrays(a.dtype, a.shape, elements=st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=a.dtype.itemsize * 8)))
    value, (ga, gb), _ = value_and_grads(backend, stabilize.safe_div, [a, b], dtype)
    ar, br = rounded(a, dtype), rounded(b, dtype)
    eps = np.sqrt(FLOAT_INFO[dtype].tiny)
    bs = np.where(np.abs(br) < eps, np.where(br < 0, -eps, eps), br)
    with np.errstate(all="ignore"):
        ref, ref_gb = ar / bs, -ar / bs / bs
    lim = FLOAT_INFO[dtype].max
    ok = np.isfinite(ar) & np.isfinite(br) & (np.abs(ref) < lim) & (np.abs(ref_gb) < lim)
    assert np.all(np.isfinite(value[ok])) and np.all(np.isfinite(ga[ok])) and np.all(np.isfinite(gb[ok]))
    np.testing.assert_array_equal(np.isnan(value) & ~np.isnan(ref), np.zeros_like(ok))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_mse_finite_input_never_produces_new_nonfinite(backend, dtype, data):
    width = {"float16": 16, "float32": 32, "float64": 64}[dtype]
    p = data.draw(_arrays(width).map(lambda a: a.astype(np.float64)))
    t = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=width)))
    value, (gp, gt), _ = value_and_grads(backend, stabilize.safe_mse, [p, t], dtype)
    pr, tr = rounded(p, dtype), rounded(t, dtype)
    acc = "float64" if dtype == "float64" else "float32"
    with np.errstate(all="ignore"):
        ref = np.mean((pr - tr) ** 2)
        ref_g = 2 * (pr - tr) / pr.size
    if np.all(np.isfinite(pr)) and np.all(np.isfinite(tr)) and abs(ref) < FLOAT_INFO[acc].max * 0.5:
        assert np.isfinite(value)
        ok = np.abs(ref_g) < FLOAT_INFO[dtype].max * 0.5
        assert np.all(np.isfinite(gp[ok])) and np.all(np.isfinite(gt[ok]))
    if np.any(np.isnan(pr)) or np.any(np.isnan(tr)):
        assert np.isnan(value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_safe_cross_entropy_finite_logits_never_produce_new_nonfinite(backend, dtype, data):
    width = 32 if dtype == "float32" else 64
    z = data.draw(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 5)),
                             elements=st.floats(-(2.0**100), 2.0**100, allow_subnormal=True, width=width)))
    labels = data.draw(hnp.arrays(np.int64, (z.shape[0],), elements=st.integers(0, z.shape[1] - 1)))
    value, (g,), _ = value_and_grads(backend, stabilize.safe_cross_entropy, [z, labels], dtype, wrt=[0])
    assert np.isfinite(value) and np.all(np.isfinite(g))


# The row's points: 0, -0, +-inf, NaN and the floor (+-1 for division). Away from
# them the frameworks' log/exp may differ by an ulp, and TensorFlow's CPU kernels
# flush subnormal inputs to zero where torch keeps them (safe_log clamps those
# below its floor anyway, so it is checked there too).
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_same_op_on_two_backends_identical_at_special_values(dtype):
    from conftest import load_backend

    load_backend("torch"), load_backend("tensorflow")
    tiny = FLOAT_INFO[dtype].tiny
    x = np.concatenate([SPECIAL, [tiny, -tiny]])
    y = x[::-1].copy()
    sub = np.concatenate([x, [tiny / 2, -tiny / 4]])
    vt, (gt,), _ = value_and_grads("torch", stabilize.safe_log, [sub], dtype)
    vf, (gf,), _ = value_and_grads("tensorflow", stabilize.safe_log, [sub], dtype)
    np.testing.assert_array_equal(vt, vf)
    np.testing.assert_array_equal(gt, gf)
    cases = {
        "safe_div": (lambda a, b: stabilize.safe_div(a, b), [0, 1]),
        "safe_mse": (lambda a, b: stabilize.safe_mse(a, b, reduction="none"), [0, 1]),
    }
    for name, (fn, wrt) in cases.items():
        vt, gt, _ = value_and_grads("torch", fn, [x, y], dtype, wrt=wrt)
        vf, gf, _ = value_and_grads("tensorflow", fn, [x, y], dtype, wrt=wrt)
        np.testing.assert_array_equal(vt, vf, err_msg=f"{name} value")
        for a, b in zip(gt, gf):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} gradient")
    # Rows whose log-sum-exp is log(1): exact in both; log(3) already differs by an ulp.
    z = np.array([[0.0, -np.inf, -np.inf], [np.inf, 0.0, 0.0], [-np.inf, -0.0, -np.inf], [np.nan, 0.0, 0.0], [tiny, -np.inf, -np.inf]])
    labels = np.array([0, 1, 1, 0, 0])
    fn = lambda a, b: stabilize.safe_cross_entropy(a, b, reduction="none")
    vt, (gt,), _ = value_and_grads("torch", fn, [z, labels], dtype, wrt=[0])
    vf, (gf,), _ = value_and_grads("tensorflow", fn, [z, labels], dtype, wrt=[0])
    np.testing.assert_array_equal(vt, vf)
    np.testing.assert_array_equal(gt, gf)
