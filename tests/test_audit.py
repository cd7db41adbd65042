"""stabilize.audit: the seeded problems of the catalogue's raw data are found; the fixed data are clean."""

import numpy as np
import pandas as pd
import pytest

import stabilize
from stabilize import scenarios

RAW = {  # the data problems each diverging variant was built on
    "unscaled-inputs": {"unscaled-inputs", "huge-targets"},
    "huge-targets": {"huge-targets"},
    "dirty-data": {"nonfinite"},
    "numpy-net": {"unscaled-inputs"},
    "log-zero": set(), "high-lr": set(), "masked-loss": set(),  # their trouble is not in the data
    "loss-spike": set(),  # 64 targets x30: finite, and within what the audit calls ordinary
}


@pytest.mark.parametrize("name", scenarios.names())
def test_audit_finds_the_seeded_problems_in_raw_data(name):
    case = scenarios.build(name, "diverging")
    assert stabilize.audit(case.x, case.y).kinds() == RAW[name]


@pytest.mark.parametrize("name,variant", [(n, v) for n in scenarios.names() for v in scenarios.variants(n) if v == "fixed"])
def test_audit_finds_nothing_in_fixed_data(name, variant):
    case = scenarios.build(name, variant)
    if case.preflight is not None:
        case, _ = case.preflight(case)
    report = stabilize.audit(case.x, case.y)
    assert report.ok, str(report)


def test_audit_flags_the_leaky_scaler_and_not_the_proper_one():
    for variant, leaks in (("leaky", True), ("fixed", False)):
        f = scenarios.build("unscaled-inputs", variant).facts
        report = stabilize.audit(f["raw_inputs"], f["raw_targets"], train_index=f["train_index"], scaler=f["scaler"])
        assert ("leakage" in report.kinds()) is leaks
    f = scenarios.build("unscaled-inputs", "leaky").facts
    leak = [x for x in stabilize.audit(f["raw_inputs"], train_index=f["train_index"], scaler=f["scaler"]).findings
            if x.kind == "leakage"][0]
    assert leak.figures["scaler rows seen"] == 400 and leak.figures["training rows"] == 320
    with pytest.raises(ValueError, match="pass train_index"):
        stabilize.audit(f["raw_inputs"], scaler=f["scaler"])


def test_audit_nonfinite_names_rows_and_columns_of_a_dataframe():
    df = pd.DataFrame({"input1": [1.0, np.nan, 0.5, 0.2], "input2": [0.1, 0.2, np.inf, 0.3]})
    (finding,) = stabilize.audit(df, np.zeros(4)).findings
    assert finding.kind == "nonfinite"
    assert "row 1 col 'input1', row 2 col 'input2'" in finding.where
    assert finding.figures["rows"] == [1, 2] and finding.figures["NaN"] == 1 and finding.figures["+inf"] == 1


def test_audit_dict_inputs_name_their_keys():
    x = scenarios.build("unscaled-inputs", "diverging").x
    (finding,) = stabilize.audit(x).findings
    assert finding.kind == "unscaled-inputs" and "'input1'" in finding.where
    assert finding.figures["input1 std"] == pytest.approx(np.std(x["input1"]))


def test_audit_samples_a_dataloader_and_a_tf_dataset():
    from conftest import load_backend

    load_backend("torch"), load_backend("tensorflow")
    import tensorflow as tf
    import torch

    X = np.column_stack([np.linspace(0, 5e4, 64), np.linspace(-1, 1, 64)])
    y = np.linspace(0, 1, 64)[:, None] * 1e6
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=16)
    assert stabilize.audit(loader).kinds() == {"unscaled-inputs", "huge-targets"}
    ds = tf.data.Dataset.from_tensor_slices((X, y)).batch(16)
    assert stabilize.audit(ds).kinds() == {"unscaled-inputs", "huge-targets"}


def test_audit_rejects_mismatched_rows_and_text_columns():
    with pytest.raises(ValueError, match="inputs have 3 rows but the targets have 2"):
        stabilize.audit(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(TypeError, match="non-numeric input column 'b'"):
        stabilize.audit(pd.DataFrame({"a": [1.0], "b": ["x"]}))


# -- a correct pipeline gets a clean report; which X the scaler check takes ---------------
def _houses(n=200, seed=0):
    """Raw tabular data: float quantities far from unit scale, an integer id and a count."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"sqft": rng.normal(2000.0, 500.0, n), "lat": rng.normal(0.5, 0.1, n),
                      "user_id": np.arange(n) * 7919, "rooms": rng.integers(1, 6, n)})
    y = pd.Series(rng.normal(0.0, 1.0, n), name="price")
    return X, y


def _split(n=200):
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=0.2, random_state=0)


def test_correct_pipeline_is_clean_leaky_one_leaks_unscaled_one_is_unscaled():
    from sklearn.preprocessing import StandardScaler

    X, y = _houses()
    train, _ = _split()
    report = stabilize.audit(X, y, train_index=train, scaler=StandardScaler().fit(X.iloc[train]))
    assert report.findings == [] and report.ok, str(report)
    (leak,) = stabilize.audit(X, y, train_index=train, scaler=StandardScaler().fit(X)).findings
    assert leak.kind == "leakage" and leak.where == "scaler (fitted on 200 rows, not only the 160 training rows)"
    assert leak.figures["scaler rows seen"] == 200 and leak.figures["training rows"] == 160
    (unscaled,) = stabilize.audit(X, y).findings
    assert unscaled.kind == "unscaled-inputs" and unscaled.where == "columns 'sqft'"


def test_scaler_check_takes_the_raw_x_and_rejects_an_already_scaled_one():
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    X, y = _houses()
    train, _ = _split()
    for Scaler in (StandardScaler, MinMaxScaler):
        scaler = Scaler().fit(X.iloc[train])
        assert stabilize.audit(X.to_numpy(), y, train_index=train, scaler=scaler).ok  # names given back, no warning
        with pytest.raises(ValueError, match="X looks already scaled .* pass the raw X"):
            stabilize.audit(scaler.transform(X), y, train_index=train, scaler=scaler)


def test_scaler_fitted_on_other_rows_is_a_mismatch_not_leakage():
    from sklearn.preprocessing import StandardScaler

    X, _ = _houses()
    train, _ = _split()
    (finding,) = stabilize.audit(X, train_index=train, scaler=StandardScaler().fit(X.iloc[train[:50]])).findings
    assert finding.kind == "scaler-mismatch" and "160 training rows" in finding.where


def test_train_index_as_mask_or_dataframe_labels_and_its_errors():
    from sklearn.preprocessing import StandardScaler

    X, y = _houses()
    train, _ = _split()
    mask = np.zeros(len(X), bool)
    mask[train] = True
    scaler = StandardScaler().fit(X.iloc[train])
    assert stabilize.audit(X, y, train_index=mask, scaler=scaler).ok
    Xl = X.set_axis(X.index + 1000)
    assert stabilize.audit(Xl, y.set_axis(Xl.index), train_index=Xl.index[train], scaler=scaler).ok
    with pytest.raises(ValueError, match="train_index holds row 200 but X has 200 rows"):
        stabilize.audit(X, train_index=[0, 200], scaler=scaler)
    with pytest.raises(ValueError, match="scaler was fitted on 4 columns but X has 2"):
        stabilize.audit(X[["sqft", "lat"]], train_index=train, scaler=scaler)


# -- ids, categories and token ids are not unscaled features -------------------------------
def test_integer_id_code_and_categorical_columns_are_not_flagged_as_unscaled():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"x": rng.normal(size=100), "user_id": np.arange(100) * 7919,
                      "store": rng.choice([1000.0, 2000.0, 3000.0], 100),  # float codes: few whole numbers
                      "city": pd.Categorical(rng.choice(["paris", "oslo"], 100)), "flag": rng.random(100) > 0.5})
    report = stabilize.audit(X, rng.normal(size=100))
    assert report.ok, str(report)
    assert report.notes == ["not scale-checked (integer, boolean or categorical: ids, token ids, codes, flags): "
                            "'user_id', 'store', 'city', 'flag'; embed or one-hot ids and codes; cast a quantity "
                            "stored as integers to float to have it checked"]
    assert "note: not scale-checked" in str(report)
    X["user_id"] = X["user_id"].astype(float) + 0.5  # a float quantity is still checked
    assert [f.where for f in stabilize.audit(X).findings] == ["columns 'user_id'"]


def test_token_id_tensors_are_not_flagged_as_unscaled():
    from conftest import load_backend

    load_backend("torch")
    import torch

    ids = torch.randint(0, 30000, (64, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 101  # a [CLS] token in every row is not a constant feature
    report = stabilize.audit(ids, torch.randint(0, 2, (64,)), num_classes=2)
    assert report.ok, str(report)
    assert report.notes[0].startswith("no column is scale-checked: all 128 are integer")
    x = {"input_ids": ids.numpy(), "dense": np.random.default_rng(0).normal(size=(64, 2))}
    assert stabilize.audit(x).ok


# -- constant columns ----------------------------------------------------------------------
def test_constant_columns_are_flagged_with_column_advice_not_row_advice():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=50), "c": np.full(50, 3000.0), "k": np.full(50, 7)})
    report = stabilize.audit(X)
    (finding,) = report.findings  # a constant 3000 is not also "unscaled"
    assert finding.kind == "constant-columns" and finding.where == "columns 'c', 'k'"
    assert finding.figures == {"c value": 3000.0, "k value": 7.0, "constant columns": 2}
    assert "'c'" not in report.notes[0]  # a constant float column is not a code column
    assert "drop these columns" in finding.remedy and "do not drop rows" in finding.remedy
    assert "zero variance" in finding.remedy
    (finding,) = stabilize.audit(np.column_stack([rng.normal(size=50), np.zeros(50)])).findings
    assert finding.kind == "constant-columns" and finding.where == "column 1"
    assert stabilize.audit(np.zeros((1, 3))).ok  # one row: nothing can vary yet


# -- non-finite data: dataset rows, and advice that drops no more than the offending rows ----
def test_nonfinite_targets_name_the_target_and_its_rows():
    y = pd.Series([0.1, 0.2, np.nan, 0.4, np.inf], name="price")
    (finding,) = stabilize.audit(np.zeros((5, 1)) + np.arange(5)[:, None] / 5, y).findings
    assert finding.kind == "nonfinite" and finding.where == "target 'price' at row 2, row 4"
    assert finding.figures["rows"] == [2, 4] and finding.figures["NaN"] == 1 and finding.figures["+inf"] == 1
    assert "rows 2, 4 (2 of 5)" in finding.remedy and "from X and y together" in finding.remedy


def test_nonfinite_rows_are_dataset_rows_index_labels_and_element_positions():
    df = pd.DataFrame({"a": [0.1, 0.2, np.nan, 0.4], "b": [0.5, 0.6, 0.7, 0.8]}, index=[10, 11, 12, 13])
    (f,) = stabilize.audit(df).findings
    assert f.where == "inputs at row 12 col 'a'" and f.figures["rows"] == [12]
    df.index = ["w", "x", "y", "z"]
    assert stabilize.audit(df).findings[0].where == "inputs at row 'y' col 'a'"
    images = np.random.default_rng(0).normal(size=(40, 3, 4, 4))
    images[37, 1, 2, 3] = np.inf
    (f,) = stabilize.audit(images).findings
    assert f.where == "inputs at row 37 col [1, 2, 3]" and f.figures["rows"] == [37]


def test_a_shuffled_dataloader_and_a_subset_report_dataset_rows():
    from conftest import load_backend

    load_backend("torch")
    import torch

    X = np.column_stack([np.linspace(0, 1, 64), np.linspace(-1, 1, 64)])
    X[37, 1] = np.nan
    ds = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(np.linspace(0, 1, 64)))
    (f,) = stabilize.audit(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)).findings
    assert f.where == "inputs at row 37 col 1" and f.figures["rows"] == [37]
    sub = torch.utils.data.Subset(ds, list(range(30, 50)))
    (f,) = stabilize.audit(torch.utils.data.DataLoader(sub, batch_size=4, shuffle=True)).findings
    assert f.where == "inputs at row 37 col 1" and f.figures["rows affected"] == "1 of 20"


def test_a_column_broken_in_most_rows_gets_column_advice_not_row_advice():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=10), "b": rng.normal(size=10), "broken": [np.nan] * 9 + [0.5]})
    X.loc[4, "a"] = np.inf
    (f,) = stabilize.audit(X).findings
    assert f.figures["broken non-finite rows"] == 9 and f.figures["rows affected"] == "9 of 10"
    first, second = f.remedy.split("; ")
    assert first.startswith("column 'broken' is non-finite in most rows: repair or drop that column")
    assert second.startswith("find out why row 4 (1 of 10) holds non-finite values")  # only the row bad elsewhere


def test_nullable_integer_missing_values_are_found():
    X = pd.DataFrame({"a": [0.1, 0.2, 0.3], "n": pd.array([1, None, 3], dtype="Int64")})
    (f,) = stabilize.audit(X).findings
    assert f.kind == "nonfinite" and f.where == "inputs at row 1 col 'n'"


# -- the std ratio names its columns ----------------------------------------------------------
def test_std_ratio_names_the_largest_and_smallest_std_columns():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"big": rng.normal(0, 5, 100), "tiny": rng.normal(0, 1e-3, 100), "unit": rng.normal(0, 1, 100)})
    (f,) = stabilize.audit(X).findings
    assert f.kind == "unscaled-inputs" and f.where.startswith("columns 'big' and 'tiny' differ in scale by")
    assert f.figures["largest std (big)"] == pytest.approx(X["big"].std(ddof=0))
    assert f.figures["smallest std (tiny)"] == pytest.approx(X["tiny"].std(ddof=0))
    assert f.figures["std ratio across columns"] == pytest.approx(X["big"].std() / X["tiny"].std())


# -- labels ------------------------------------------------------------------------------------
def test_labels_out_of_range_name_their_rows():
    y = np.arange(40) % 10
    y[[3, 17]] = [10, 12]
    (f,) = stabilize.audit(np.zeros((40, 1)) + np.arange(40)[:, None] / 40, y, num_classes=10).findings
    assert f.kind == "bad-labels" and f.where == "targets at rows 3, 17"
    assert f.figures["rows"] == [3, 17] and f.figures["values"] == [10, 12] and f.figures["label max"] == 12.0
    assert "give the model 13 outputs" in f.remedy and "drop only these 2 rows" in f.remedy


def test_one_based_negative_and_ignored_labels():
    X = np.linspace(0, 1, 30)[:, None]
    (f,) = stabilize.audit(X, np.arange(30) % 10 + 1, num_classes=10).findings
    assert f.kind == "bad-labels" and "they look 1-based; use y - 1" in f.remedy
    y = np.where(np.arange(30) % 7 == 0, -100, np.arange(30) % 10)
    (f,) = stabilize.audit(X, y, num_classes=10).findings
    assert f.figures["rows"] == [0, 7, 14, 21, 28] and "pass ignore_index=" in f.remedy
    assert stabilize.audit(X, y, num_classes=10, ignore_index=-100).ok
    (f,) = stabilize.audit(X, np.linspace(0, 2, 30), num_classes=3).findings
    assert f.kind == "bad-labels" and "whole numbers" in f.remedy


def test_float_labels_one_hot_rows_and_label_shape():
    X = np.linspace(0, 1, 30)[:, None]
    (f,) = stabilize.audit(X, (np.arange(30) % 3).astype(np.float32), num_classes=3).findings
    assert f.kind == "label-dtype" and f.figures == {"dtype": "float32"} and "astype('int64')" in f.remedy
    onehot = np.eye(3)[np.arange(30) % 3]
    assert stabilize.audit(X, onehot, num_classes=3).ok
    onehot[5, 1] = 2.0
    (f,) = stabilize.audit(X, onehot, num_classes=3).findings
    assert f.kind == "bad-labels" and f.where == "targets at rows 5"
    (f,) = stabilize.audit(X, np.zeros((30, 2)), num_classes=3).findings
    assert f.kind == "bad-labels" and f.figures == {"target columns": 2, "num_classes": 3}
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        stabilize.audit(X, np.zeros(30), num_classes=0)
    with pytest.raises(ValueError, match="pass them as y"):
        stabilize.audit(X, num_classes=3)


def test_labels_are_not_checked_as_huge_targets():
    X = np.linspace(0, 1, 30)[:, None]
    y = (np.arange(30) * 1000).astype(np.int64)
    assert stabilize.audit(X, y.astype(float)).kinds() == {"huge-targets"}
    assert stabilize.audit(X, y, num_classes=30_000).ok


# -- empty and malformed input ---------------------------------------------------------------
@pytest.mark.parametrize("X,message", [
    (np.zeros((0, 3)), "X has 0 rows: there is nothing to audit"),
    (pd.DataFrame({"a": pd.Series([], dtype=float)}), "X has 0 rows"),
    (pd.DataFrame(index=range(3)), "X has 0 columns: there is nothing to audit"),
    ({"a": np.zeros(3), "b": np.zeros(4)}, "input 'b' has 4 rows but the entries before it have 3"),
])
def test_empty_or_ragged_data_is_a_clear_value_error(X, message):
    with pytest.raises(ValueError, match=message):
        stabilize.audit(X)


def test_a_non_numeric_target_column_is_named():
    with pytest.raises(TypeError, match=r"non-numeric target column 'price' \(dtype .*, e.g. 'cheap' at row 0\)"):
        stabilize.audit(np.zeros((2, 1)), pd.Series(["cheap", "dear"], name="price"))
    with pytest.raises(TypeError, match="the targets have dtype <U5, which is not numeric"):
        stabilize.audit(np.zeros((2, 1)), np.array(["cheap", "dear"]))


def test_a_nested_list_is_data_not_batches():
    assert stabilize.audit([[0.1, 0.2], [0.3, 0.4], [0.5, 0.0]]).ok


def test_the_callers_data_are_not_changed():
    from sklearn.preprocessing import StandardScaler

    X, y = _houses()
    X.loc[3, "sqft"], X.loc[4, "lat"] = np.inf, np.nan
    y[5] = np.nan
    train, _ = _split()
    scaler = StandardScaler().fit(X.iloc[train].replace(np.inf, np.nan))
    before = (X.copy(), y.copy(), train.copy(), scaler.mean_.copy())
    report = stabilize.audit(X, y, train_index=train, scaler=scaler)
    assert report.kinds() == {"nonfinite"}
    pd.testing.assert_frame_equal(X, before[0])
    pd.testing.assert_series_equal(y, before[1])
    assert np.array_equal(train, before[2]) and np.array_equal(scaler.mean_, before[3])


def test_a_scaler_that_leaves_columns_unscaled_is_reported_after_the_transform():
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import StandardScaler

    X, y = _houses()
    train, _ = _split()
    only_lat = ColumnTransformer([("s", StandardScaler(), ["lat"])], remainder="passthrough",
                                 verbose_feature_names_out=False).fit(X.iloc[train])
    (f,) = stabilize.audit(X, y, train_index=train, scaler=only_lat).findings
    assert f.kind == "unscaled-inputs" and f.where == "after scaler.transform(X), columns 'sqft'"


def test_a_scaler_that_is_not_sklearn_is_checked_by_its_mean():
    X, _ = _houses()
    X = X[["sqft", "lat"]]
    train, _ = _split()

    class Mine:
        def __init__(self, rows):
            self.mean_, self.std_ = X.iloc[rows].mean().to_numpy(), X.iloc[rows].std(ddof=0).to_numpy()

        def transform(self, A):
            return (np.asarray(A) - self.mean_) / self.std_

    assert stabilize.audit(X, train_index=train, scaler=Mine(train)).ok
    (f,) = stabilize.audit(X, train_index=train, scaler=Mine(np.arange(len(X)))).findings
    assert f.kind == "leakage" and f.where == "scaler (fitted on all 200 rows, not only the 160 training rows)"
    (f,) = stabilize.audit(X, train_index=train, scaler=Mine(train[:50])).findings
    assert f.kind == "scaler-mismatch"
    with pytest.raises(TypeError, match="must be a fitted transformer with .transform"):
        stabilize.audit(X, train_index=train, scaler=object())
