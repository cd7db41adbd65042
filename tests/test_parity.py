"""Every scenario x variant on torch and TensorFlow: the same trajectory, diverging and fixed alike.

Bars: float64, identical first non-finite step and losses within 1e-9 up to
it; float32, the same step and 1e-4. Each run is also checked against what
its variant claims (diverges, converges below its bound, stalls, is guarded).
"""

import functools

import numpy as np
import pytest

from stabilize import parity, scenarios

CASES = [(n, v) for n in scenarios.names() for v in scenarios.variants(n)]
# The variants that do not diverge train to the end on both backends (3-8 s of CPU each): in the slow
# run (-m slow). The diverging ones stop at their first non-finite step, and stay in the fast run.
PARAMS = [pytest.param(n, v, marks=pytest.mark.slow) if v != "diverging" else pytest.param(n, v) for n, v in CASES]


@functools.lru_cache(maxsize=None)
def _report(name, variant, dtype):
    from conftest import load_backend

    load_backend("torch"), load_backend("tensorflow")
    return parity.compare(name, variant, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,variant", PARAMS)
def test_parity_same_first_nonfinite_step_and_losses_within_bar(name, variant, dtype):
    report = _report(name, variant, dtype)
    steps = set(report.first_nonfinite.values())
    assert len(steps) == 1, report.first_nonfinite
    assert report.max_rel_diff <= parity.BARS[dtype], report.row()
    first = steps.pop()
    if first == 0:
        # Saturated from the start (log-zero): nothing finite to compare, so the
        # non-finite values themselves must be of the same kind on both.
        t, f = (report.trajectories[b] for b in ("torch", "tensorflow"))
        for a, b in ((t.losses[0], f.losses[0]), (t.grad_norms[0], f.grad_norms[0])):
            assert np.isnan(a) == np.isnan(b) and np.isinf(a) == np.isinf(b) and not np.isfinite(a)
    else:
        assert report.per_step_rel_diff.size >= min(first or 10**9, len(report.trajectories["torch"].losses))
    assert report.ok


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,variant", PARAMS)
def test_each_variant_shows_what_it_claims_on_each_backend(name, variant, dtype):
    for backend, traj in _report(name, variant, dtype).trajectories.items():
        assert traj.ok, (backend, traj.expect, traj.first_nonfinite_step, traj.final_loss, traj.bound)
        if variant == "diverging":
            assert traj.first_nonfinite_step is not None
        if traj.expect == "finite":
            assert traj.first_nonfinite_step is None and np.all(np.isfinite(traj.losses))
            assert traj.final_loss < traj.bound


def test_catalogue_has_every_scenario_and_variant_of_the_map():
    assert scenarios.names() == ["unscaled-inputs", "log-zero", "high-lr", "huge-targets", "dirty-data",
                                 "masked-loss", "numpy-net", "loss-spike"]
    assert scenarios.variants("loss-spike") == ["diverging", "fixed"]
    assert scenarios.variants("unscaled-inputs") == ["diverging", "fixed", "leaky"]
    assert scenarios.variants("log-zero") == ["diverging", "clipped", "fixed"]
    assert scenarios.variants("high-lr") == ["diverging", "fixed", "backoff"]
    assert scenarios.variants("huge-targets") == ["diverging", "fixed", "clip"]
    for name in scenarios.names():
        assert {"diverging", "fixed"} <= set(scenarios.variants(name))
    with pytest.raises(KeyError, match="known: unscaled-inputs"):
        scenarios.variants("nope")
    with pytest.raises(KeyError, match="has no variant 'x'; it has: diverging"):
        scenarios.build("log-zero", "x")


@pytest.mark.slow  # a variant that trains to the end
def test_log_zero_clipped_stalls_with_exactly_zero_gradient_where_clipped():
    for traj in _report("log-zero", "clipped", "float64").trajectories.values():
        f = traj.facts
        assert f["clipped_samples"] > 0 and f["clipped_grad_norm"] == 0.0
        assert f["clipped_loss"] == pytest.approx(-np.log(1e-8), rel=1e-9)  # every hidden sample sits at the clip
        assert f["stalled"]


@pytest.mark.slow  # a variant that trains to the end
def test_unscaled_leaky_variant_fits_the_scaler_on_all_rows():
    from sklearn.preprocessing import StandardScaler

    leaky = scenarios.build("unscaled-inputs", "leaky")
    fixed = scenarios.build("unscaled-inputs", "fixed")
    assert isinstance(leaky.facts["scaler"], StandardScaler)
    assert leaky.facts["scaler_fit_rows"] == 400 > leaky.facts["train_rows"] == 320
    assert fixed.facts["scaler_fit_rows"] == fixed.facts["train_rows"] == 320
    t = _report("unscaled-inputs", "fixed", "float64").trajectories["torch"]
    assert t.facts["test_rmse_original_units"] < 150  # predictions inverse-transformed to the original scale


@pytest.mark.slow  # a variant that trains to the end
def test_dirty_data_fixed_names_the_bad_cells_and_lists_dropped_rows():
    t = _report("dirty-data", "fixed", "float64").trajectories["torch"]
    msg = t.facts["check_finite"]
    assert "data['X']: shape (256, 4) float64: 3 NaN, 1 +inf, 0 -inf" in msg
    assert "(row 101, col 0), (row 102, col 3), (row 117, col 1), (row 200, col 2)" in msg
    assert t.facts["dropped_rows"] == [101, 102, 117, 200]


@pytest.mark.slow  # a variant that trains to the end
def test_masked_loss_diverging_prints_finite_losses_over_nan_weights():
    for traj in _report("masked-loss", "diverging", "float64").trajectories.values():
        assert traj.facts["losses_all_finite"] and not traj.facts["weights_finite_at_end"]
        assert traj.first_nonfinite_step == 1
        assert np.isnan(traj.grad_norms[1])
    for traj in _report("masked-loss", "guarded", "float64").trajectories.values():
        assert traj.events and all(e.action == "skipped" and "gradients" in e.nonfinite for e in traj.events)
        assert traj.facts["weights_finite_at_end"]


@pytest.mark.slow  # a variant that trains to the end
def test_high_lr_backoff_rescues_the_original_rate():
    for traj in _report("high-lr", "backoff", "float64").trajectories.values():
        assert traj.history.lrs[0] == 0.5
        assert traj.facts["final_lr"] == 0.5 * 0.5 ** traj.facts["backoffs"] < 0.5
        assert all(e.action == "backed-off" for e in traj.events)


def test_cuda_torch_matches_cpu_tensorflow_at_float64(device):
    if device != "cuda":
        pytest.skip("needs CUDA")
    for name, variant in CASES:
        report = parity.compare(name, variant, dtype="float64", device="cuda")
        assert report.ok, report.row()
        assert report.trajectories["torch"].device.startswith("cuda")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", scenarios.names())
def test_diagnosis_names_the_scenario_on_every_diverging_variant(name, dtype):
    for backend, traj in _report(name, "diverging", dtype).trajectories.items():
        d = traj.history.diagnosis
        assert d is not None, backend
        assert d.step == traj.first_nonfinite_step and d.phase in ("forward", "backward")
        assert d.origin and d.advice
        if name == "numpy-net":
            # Any of its causes, as long as the evidence names them: scale, targets, rate.
            assert d.cause in ("unscaled-inputs", "huge-targets", "high-lr", "exploding-gradients")
            assert {"input feature std max", "target RMS", "learning rate"} <= set(d.evidence)
        elif name == "loss-spike":
            # No rule names a past spike: what the replay sees at the overflow is the blow-up it caused.
            assert d.cause in ("high-lr", "huge-targets", "exploding-gradients"), (backend, d)
        else:
            assert d.cause == name, (backend, d)


@pytest.mark.parametrize("name,variant", [p for p in PARAMS if p.values[1] != "diverging"])
def test_no_diagnosis_on_fixed_variants(name, variant):
    for traj in _report(name, variant, "float64").trajectories.values():
        if variant.startswith("fixed"):
            assert traj.history.diagnosis is None
        elif traj.first_nonfinite_step is not None:  # guarded: the guard met bad steps, and says why
            assert traj.history.diagnosis.cause == name


def test_diagnosis_evidence_figures():
    t = _report("log-zero", "diverging", "float64").trajectories["torch"]
    ev = t.history.diagnosis.evidence
    assert ev["log input minimum (softmax probability)"] == 0.0 and ev["probabilities that underflow to 0 in float64"] > 0
    t = _report("masked-loss", "diverging", "float64").trajectories["tensorflow"]
    d = t.history.diagnosis
    assert d.origin == "loss" and d.phase == "backward" and ev_true(d.evidence, "finite loss over non-finite gradients")
    assert np.isfinite(d.evidence["loss"])
    t = _report("high-lr", "diverging", "float64").trajectories["torch"]
    assert t.history.diagnosis.evidence["loss growth per step (last steps)"] > 10
    t = _report("dirty-data", "diverging", "float64").trajectories["torch"]
    assert "NaN" in str(t.history.diagnosis) and t.history.diagnosis.origin == "input batch"
    assert "stabilize.check_finite" in t.history.diagnosis.advice


def ev_true(evidence, key):
    return evidence.get(key) is True


@pytest.mark.slow  # the fixed variant trains to the end
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loss_spike_is_finite_then_diverges_and_the_detector_skips_exactly_the_burst(dtype):
    from stabilize.scenarios.catalogue import SPIKE_ROWS

    burst = {SPIKE_ROWS.start // 32 + 32 * e + k for e in range(4) for k in range(2)}  # batches 24, 25 per epoch
    for backend, traj in _report("loss-spike", "diverging", dtype).trajectories.items():
        first = traj.first_nonfinite_step
        assert first is not None and first > 25, (backend, first)  # the burst (steps 24, 25) was finite
        assert np.all(np.isfinite(traj.losses[:25])) and traj.losses[24] > 1e3 * np.median(traj.losses[10:24])
        assert not [e for e in traj.events if e.kind == "spike"]  # no detector: no spike was caught
    for backend, traj in _report("loss-spike", "fixed", dtype).trajectories.items():
        spiked = {e.step for e in traj.events if e.kind == "spike"}
        assert spiked == burst and all(e.action == "skipped" for e in traj.events), (backend, spiked)
        assert traj.history.spikes == 8 and not traj.history.committed[sorted(burst)].any()
        assert traj.final_loss < 0.1
