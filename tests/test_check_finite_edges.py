"""check_finite on degenerate input: None, NaT, cycles and deep nesting, thousands of bad arrays,
Keras variables, and the chunked scan (exact counts and positions across chunk borders)."""

import numpy as np
import pytest

import stabilize
from stabilize import finite


def test_none_and_empty_structures_are_errors_not_all_finite():
    with pytest.raises(TypeError, match="check_finite: 'X' is None; pass the data to check"):
        stabilize.check_finite(None, name="X")
    with pytest.raises(ValueError, match="holds no arrays or numbers to check"):
        stabilize.check_finite({"a": None, "b": []})
    report = stabilize.check_finite({"a": None, "b": np.ones(2)})  # a None entry beside data is skipped
    assert [leaf.path for leaf in report.leaves] == ["input['b']"]


def test_nat_in_a_datetime_series_and_frame_counts_as_nan():
    pd = pytest.importorskip("pandas")
    s = pd.Series(pd.to_datetime(["2024-01-01", None, "2024-01-03"]))
    with pytest.raises(stabilize.NonFiniteError) as info:
        stabilize.check_finite(s, name="when")
    leaf = info.value.report.bad[0]
    assert (leaf.n_nan, leaf.positions) == (1, [(1,)])
    tz = pd.Series(pd.to_datetime(["2024-01-01", None]).tz_localize("UTC"))
    assert stabilize.check_finite(tz, raise_error=False).bad[0].n_nan == 1
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0], "t": s, "d": s - s.iloc[0]})
    leaf = stabilize.check_finite(df, raise_error=False).bad[0]
    assert leaf.n_nan == 2 and leaf.positions == [(1, 1), (1, 2)]
    assert "(row 1, col 't')" in leaf.describe()
    arr = np.array(["2024-01-01", "NaT"], dtype="datetime64[s]")
    assert stabilize.check_finite(arr, raise_error=False).bad[0].n_nan == 1


def test_a_cycle_is_a_clear_error_and_depth_5000_is_walked():
    cyclic = {"a": [np.ones(2)]}
    cyclic["a"].append(cyclic)
    with pytest.raises(ValueError, match=r"check_finite: input\['a'\]\[1\] contains itself \(a reference cycle\)"):
        stabilize.check_finite(cyclic)
    deep = np.array([1.0, np.inf])
    for _ in range(5000):
        deep = [deep]
    report = stabilize.check_finite(deep, raise_error=False)
    assert report.bad[0].n_posinf == 1 and report.bad[0].path == "input" + "[0]" * 5000
    shared = np.ones(3)
    assert len(stabilize.check_finite([shared, (shared, shared)]).leaves) == 3  # shared, not cyclic


def test_ten_thousand_bad_arrays_give_a_bounded_summary():
    bad = [np.array([np.nan, 1.0])] * 10_000
    report = stabilize.check_finite(bad, raise_error=False)
    assert len(report.bad) == 10_000
    text = str(report)
    assert len(text.splitlines()) == finite.MAX_LEAVES_SHOWN + 3 and len(text) < 5_000
    assert "... and 9980 more array(s) with 9980 non-finite value(s) in all (report.bad lists every one)" in text


def test_chunked_scan_counts_and_positions_match_numpy(monkeypatch):
    monkeypatch.setattr(finite, "CHUNK", 7)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 5))
    a[0, 3], a[2, 1], a[4, 4], a[8, 0] = np.nan, np.inf, -np.inf, np.nan
    leaf = stabilize.check_finite(a, raise_error=False).bad[0]
    assert (leaf.n_nan, leaf.n_posinf, leaf.n_neginf) == (2, 1, 1)
    assert leaf.positions == [(0, 3), (2, 1), (4, 4), (8, 0)]
    clean = a[np.isfinite(a)]
    assert (leaf.finite_min, leaf.finite_max) == (clean.min(), clean.max())
    t = stabilize.check_finite(a.T, raise_error=False).bad[0]  # non-contiguous: positions in its own shape
    assert t.positions == [(0, 8), (1, 2), (3, 0), (4, 4)]


def test_keras_model_weights_are_checked():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    report = stabilize.check_finite(model.weights, name="weights")
    assert report.ok and [leaf.shape for leaf in report.leaves] == [(3, 2), (2,)]
    kernel = model.weights[0]
    kernel.assign(np.full((3, 2), np.inf, dtype="float32"))
    assert stabilize.check_finite(model.weights, raise_error=False).bad[0].n_posinf == 6
