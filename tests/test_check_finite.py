"""check_finite: NaN, +inf and -inf counted apart; paths and (row, column) positions named."""

import numpy as np
import pandas as pd
import pytest

import stabilize
from helpers import to_native


def _data():
    a = np.arange(12, dtype=np.float64).reshape(4, 3)
    a[1, 2] = np.nan
    a[3, 0] = np.inf
    a[3, 1] = -np.inf
    a[0, 0] = np.nan
    return a


def test_check_finite_counts_kinds_separately_and_names_positions(backend):
    data = {"input1": to_native(backend, _data(), "float32"), "input2": to_native(backend, np.ones((4, 1)), "float32")}
    with pytest.raises(stabilize.NonFiniteError) as info:
        stabilize.check_finite(data, name="X")
    report = info.value.report
    assert len(report.bad) == 1 and len(report.leaves) == 2
    leaf = report.bad[0]
    assert leaf.path == "X['input1']"
    assert (leaf.n_nan, leaf.n_posinf, leaf.n_neginf) == (2, 1, 1)
    assert leaf.positions == [(0, 0), (1, 2), (3, 0), (3, 1)]
    assert (leaf.finite_min, leaf.finite_max) == (1.0, 11.0)
    msg = str(info.value)
    assert "X['input1']" in msg and "2 NaN, 1 +inf, 1 -inf" in msg
    assert "(row 0, col 0), (row 1, col 2), (row 3, col 0), (row 3, col 1)" in msg
    assert "finite range [1, 11]" in msg


def test_check_finite_pandas_uses_index_and_column_labels():
    df = pd.DataFrame({"input1": [1.0, np.nan, 3.0], "input2": [1e10, 2e10, np.inf]}, index=[10, 11, 12])
    report = stabilize.check_finite({"frame": df, "target": pd.Series([1.0, -np.inf], index=["a", "b"])}, raise_error=False)
    assert not report.ok
    text = str(report)
    assert "input['frame']: shape (3, 2)" in text
    assert "(row 11, col 'input1'), (row 12, col 'input2')" in text
    assert "input['target']" in text and "(row 'b')" in text and "0 NaN, 0 +inf, 1 -inf" in text


def test_check_finite_nested_lists_and_clean_input_returns_report():
    report = stabilize.check_finite([np.ones(3), (np.zeros((2, 2)), 1.5)], name="batch")
    assert report.ok and len(report.leaves) == 3 and bool(report)


def test_check_finite_caps_positions_and_says_more():
    a = np.full((10, 10), np.nan)
    leaf = stabilize.check_finite(a, raise_error=False).bad[0]
    assert leaf.n_nan == 100 and len(leaf.positions) == 5
    assert leaf.describe().count("(row") == 5 and "..." in leaf.describe()
    assert "no finite values" in leaf.describe()


def test_check_finite_rejects_what_it_cannot_read_with_advice():
    with pytest.raises(TypeError, match=r"input\['name'\] is a object|expected a tensor"):
        stabilize.check_finite({"name": object()})
    with pytest.raises(TypeError, match="select_dtypes"):
        stabilize.check_finite(pd.DataFrame({"a": [1.0], "s": ["x"]}))


def test_check_finite_half_precision_tensors(backend, device):
    if backend != "torch" and device != "cpu":
        pytest.skip("CUDA runs the torch backend only")
    for dtype in ("float16", "bfloat16"):
        t = to_native(backend, np.array([1.0, np.inf, np.nan]), dtype, device)
        leaf = stabilize.check_finite(t, raise_error=False).bad[0]
        assert (leaf.n_nan, leaf.n_posinf, leaf.n_neginf) == (1, 1, 0)
