"""The stabilize command line: outputs and exit codes (0 good, 1 findings, 2 usage)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from stabilize.cli import main


def test_scenarios_list(capsys):
    assert main(["scenarios", "list"]) == 0
    out = capsys.readouterr().out
    assert "log-zero" in out and "diverging, clipped, fixed" in out and "001_c5368abc5e3e7511.txt" in out


def test_scenarios_run_reports_and_exits_zero_when_as_claimed(capsys, backend):
    assert main(["scenarios", "run", "high-lr", "diverging", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "first non-finite step 5" in out and "as claimed" in out


def test_audit_csv_finds_problems_and_exits_one(tmp_path, capsys):
    path = tmp_path / "data.csv"
    df = pd.DataFrame({"input1": np.linspace(0, 1e4, 20), "input2": np.linspace(-1, 1, 20),
                       "city": ["a"] * 20, "price": np.linspace(1e4, 2e4, 20)})
    df.loc[3, "input2"] = np.nan
    df.to_csv(path, index=False)
    assert main(["audit", str(path), "--target", "price"]) == 1
    out = capsys.readouterr().out
    assert "[nonfinite]" in out and "row 3 col 'input2'" in out
    assert "[unscaled-inputs]" in out and "[huge-targets]" in out
    assert "non-numeric columns not audited" in out and "city" in out


def test_audit_clean_csv_exits_zero(tmp_path, capsys):
    path = tmp_path / "clean.csv"
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=50), "b": rng.normal(size=50), "y": rng.normal(size=50)}).to_csv(path, index=False)
    assert main(["audit", str(path), "--target", "y"]) == 0
    assert "no findings" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["audit", "missing.csv", "--target", "y"], "no such file"),
    (["doctor", "nope"], "unknown scenario 'nope'"),
    (["doctor", "log-zero", "--variant", "x"], "has no variant 'x'"),
    (["scenarios", "run", "log-zero"], "stabilize scenarios run NAME VARIANT"),
])
def test_usage_errors_exit_two_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_audit_unknown_column_exits_two(tmp_path, capsys):
    path = tmp_path / "d.csv"
    pd.DataFrame({"a": [1.0]}).to_csv(path, index=False)
    assert main(["audit", str(path), "--target", "price"]) == 2
    assert "column 'price' not in" in capsys.readouterr().err


def test_doctor_prints_the_diagnosis_and_writes_a_plot(tmp_path, capsys, backend):
    png = tmp_path / "doctor.png"
    assert main(["doctor", "dirty-data", "--backend", backend, "--plot", str(png)]) == 1
    out = capsys.readouterr().out
    assert "diagnosis: dirty-data" in out and "origin: input batch" in out and "stabilize.check_finite" in out
    assert png.stat().st_size > 10_000
    assert main(["doctor", "dirty-data", "--variant", "fixed", "--backend", backend]) == 0
    assert "nothing to diagnose" in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "stabilize.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "doctor" in out.stdout and "audit" in out.stdout
