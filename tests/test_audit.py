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
