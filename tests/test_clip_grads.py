"""clip_grads: one formula on every backend, honest about non-finite norms."""

import math

import numpy as np
import pytest

import stabilize
from helpers import to_native


def _np(backend, t):
    return stabilize.get_backend(backend).to_numpy(t).astype(np.float64)


def _grads(rng):
    return [rng.normal(size=(5, 3)) * 10, rng.normal(size=(3,)), rng.normal(size=(2, 2, 2))]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_clip_grads_total_norm_matches_torch_clip_grad_norm_float64(backend, norm_type):
    import torch

    rng = np.random.default_rng(0)
    arrays = _grads(rng)
    params = [torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.float64)) for a in arrays]
    for p, a in zip(params, arrays):
        p.grad = torch.from_numpy(a.copy())
    ref_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type).item()
    grads = [to_native(backend, a, "float64") for a in arrays]
    clipped, total = stabilize.clip_grads(grads, max_norm=1.0, norm_type=norm_type)
    assert abs(float(_np(backend, total)) - ref_norm) <= 1e-6 * ref_norm
    for c, p in zip(clipped, params):
        np.testing.assert_allclose(_np(backend, c), p.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_clip_grads_nonfinite_norm_never_negates_or_scales_into_nan(backend, device, bad):
    if backend != "torch" and device != "cpu":
        pytest.skip("CUDA runs the torch backend only")
    g0 = np.array([3.0, -4.0, 1e-3])
    g1 = np.array([1.0, bad])
    clipped, total = stabilize.clip_grads([to_native(backend, g0, "float32", device), to_native(backend, g1, "float32", device)],
                                          max_norm=1.0)
    c0, c1 = _np(backend, clipped[0]), _np(backend, clipped[1])
    np.testing.assert_array_equal(c0, g0.astype(np.float32))  # untouched: not zeroed, not NaN
    np.testing.assert_array_equal(c1[:1], [1.0])
    assert np.isnan(c1[1]) if np.isnan(bad) else c1[1] == bad  # the bad element is shown as it was
    t = float(_np(backend, total))
    assert (np.isnan(t) if np.isnan(bad) else t == np.inf)


def test_clip_grads_by_value_then_norm_and_structure_kept(backend):
    grads = {"w": to_native(backend, np.array([10.0, -10.0, 0.5]), "float64"), "b": None}
    clipped, total = stabilize.clip_grads(grads, max_norm=1.0, max_value=1.0)
    assert set(clipped) == {"w", "b"} and clipped["b"] is None
    np.testing.assert_allclose(float(_np(backend, total)), math.sqrt(200.25), rtol=1e-15)
    v = np.array([1.0, -1.0, 0.5])
    np.testing.assert_allclose(_np(backend, clipped["w"]), v / (np.linalg.norm(v) + 1e-6), rtol=1e-15)


def test_clip_grads_below_threshold_leaves_values_exact(backend):
    g = np.array([0.1, -0.2])
    (c,), total = stabilize.clip_grads([to_native(backend, g, "float32")], max_norm=5.0)
    np.testing.assert_array_equal(_np(backend, c), g.astype(np.float32))


def test_clip_grads_half_precision_accumulates_in_float32(backend):
    g = np.full(4, 300.0)  # a float16 sum of squares would overflow (360000 > 65504)
    (c,), total = stabilize.clip_grads([to_native(backend, g, "float16")], max_norm=1.0)
    np.testing.assert_allclose(float(_np(backend, total)), 600.0, rtol=1e-6)
    np.testing.assert_allclose(_np(backend, c), np.full(4, 0.5), rtol=1e-3)


@pytest.mark.parametrize("kw", [{"max_norm": 0.0}, {"max_norm": -1}, {"max_value": float("nan")}, {"norm_type": 0}])
def test_clip_grads_rejects_bad_arguments(backend, kw):
    with pytest.raises(ValueError, match="clip_grads"):
        stabilize.clip_grads([to_native(backend, np.ones(2), "float32")], **kw)


def test_clip_grads_is_the_same_formula_on_both_backends():
    from conftest import load_backend

    load_backend("torch"), load_backend("tensorflow")
    rng = np.random.default_rng(3)
    arrays = _grads(rng)
    out = {}
    for b in ("torch", "tensorflow"):
        clipped, total = stabilize.clip_grads([to_native(b, a, "float64") for a in arrays], max_norm=0.5)
        out[b] = [_np(b, c) for c in clipped] + [_np(b, total)]
    for x, y in zip(out["torch"], out["tensorflow"]):
        np.testing.assert_allclose(x, y, rtol=1e-15)
