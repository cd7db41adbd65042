"""The stabilize command line, run as a user runs it (``python -m stabilize`` in a subprocess):
outputs, one-line errors on stderr, and exit codes (0 good, 1 a problem found, 2 usage or input)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stabilize
from stabilize import scenarios
from stabilize.cli import main

ROOT = str(Path(stabilize.__file__).resolve().parent.parent)


def cli(*argv, cwd=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI must silence TensorFlow by itself
    return subprocess.run([sys.executable, "-m", "stabilize", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith("stabilize: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_and_help_list_every_command_and_scenario():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"stabilize {stabilize.__version__} (stabilize-nn)"
    out = cli("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("scenarios", "audit", "doctor", "exit codes"))
    for action in ("run", "parity"):
        out = cli("scenarios", action, "--help")
        assert out.returncode == 0
        assert all(n in " ".join(out.stdout.split()) for n in scenarios.names())
        assert "masked-loss: diverging, fixed, guarded" in " ".join(out.stdout.split())
    out = cli("doctor", "--help")
    assert "SCENARIO" in out.stdout and "huge-targets" in out.stdout and "--plot PNG" in out.stdout


def test_scenarios_list_shows_names_variants_and_summaries_only():
    out = cli("scenarios", "list")
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["scenario", "variants", "what", "goes", "wrong"]
    assert any(line.startswith("log-zero") and "diverging, clipped, fixed" in line for line in lines)
    assert ".txt" not in out.stdout and "[" not in out.stdout


def test_scenarios_run_as_claimed_exits_zero_with_the_table_on_stdout():
    out = cli("scenarios", "run", "high-lr", "diverging", "--backend", "torch")
    assert out.returncode == 0, out.stderr
    assert "first non-finite step 5" in out.stdout and "-> as claimed" in out.stdout
    assert "non-finite" not in out.stderr.replace("step 5 went non-finite", "")  # only the log line, if any


@pytest.mark.slow  # a subprocess that imports TensorFlow
@pytest.mark.needs("tensorflow")
def test_scenarios_run_tensorflow_prints_no_import_chatter():
    out = cli("scenarios", "run", "high-lr", "fixed", "--backend", "tensorflow")
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr  # no absl/oneDNN banner, no log line for a finite run


@pytest.mark.parametrize("argv,fragments", [
    (["scenarios", "run", "nosuch", "x"], ["invalid choice: 'nosuch'", "'log-zero'", "'numpy-net'"]),
    (["doctor", "nosuch"], ["invalid choice: 'nosuch'", "'high-lr'"]),
])
def test_unknown_scenario_lists_the_names(argv, fragments):
    out = cli(*argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert all(f in out.stderr for f in fragments), out.stderr


@pytest.mark.parametrize("argv,fragments", [
    (["scenarios", "run", "log-zero", "x"], ["scenario 'log-zero' has no variant 'x'; it has: diverging, clipped, fixed"]),
    (["doctor", "high-lr", "--backend", "jax"], ["unknown backend 'jax' (from --backend)", "tensorflow"]),
    (["doctor", "high-lr", "--backend", "numpy"], ["the scenarios run on torch or tensorflow, not 'numpy'"]),
    (["scenarios", "parity", "--backends", "torch"], ["parity compares at least two backends, got 'torch'"]),
    (["scenarios", "parity", "nosuch"], ["unknown scenario 'nosuch'; known: unscaled-inputs"]),
    (["doctor", "high-lr", "--plot", "/nonexistent/x.png"], ["cannot write the plot to /nonexistent/x.png",
                                                             "does not exist"]),
    (["audit", "missing.csv", "--target", "y"], ["no such file: missing.csv"]),
])
def test_user_errors_are_one_line_on_stderr_with_exit_two(argv, fragments, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabilize: error: ") and captured.out == ""
    assert all(f in lines[0] for f in fragments), lines[0]


def test_a_user_error_through_the_real_entry_point():
    _one_line_error(cli("doctor", "high-lr", "--backend", "jax"), "unknown backend 'jax' (from --backend)")


def test_broken_stabilize_toml_is_one_line(tmp_path):
    (tmp_path / "stabilize.toml").write_text("backend = \n")
    _one_line_error(cli("doctor", "high-lr", cwd=tmp_path), "stabilize.toml is not valid TOML", "fix or remove it")


@pytest.mark.slow  # a subprocess that trains on both frameworks
@pytest.mark.needs("tensorflow")
def test_parity_honours_the_name_and_variant_filter():
    out = cli("scenarios", "parity", "high-lr", "--variant", "diverging", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()
    assert rows[0].startswith("scenario") and rows[0].rstrip().endswith("parity")
    assert len(rows) == 2 and rows[1].split()[:5] == ["high-lr", "diverging", "float32", "torch=4", "tensorflow=4"]
    assert rows[1].endswith("ok")


def test_audit_finds_problems_exits_one_and_notes_on_stderr(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "data.csv"
    df = pd.DataFrame({"input1": np.linspace(0, 1e4, 20), "input2": np.linspace(-1, 1, 20),
                       "city": ["a"] * 20, "price": np.linspace(1e4, 2e4, 20)})
    df.loc[3, "input2"] = np.nan
    df.to_csv(path, index=False)
    out = cli("audit", str(path), "--target", "price")
    assert out.returncode == 1, out.stderr
    assert "[nonfinite]" in out.stdout and "row 3 col 'input2'" in out.stdout
    assert "[unscaled-inputs]" in out.stdout and "[huge-targets]" in out.stdout
    assert "non-numeric columns not audited" in out.stderr and "city" in out.stderr
    assert cli("-q", "audit", str(path), "--target", "price").stderr == ""  # --quiet silences the note


def test_audit_clean_csv_exits_zero(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "clean.csv"
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=50), "b": rng.normal(size=50), "y": rng.normal(size=50)}).to_csv(path, index=False)
    out = cli("audit", str(path), "--target", "y")
    assert out.returncode == 0 and "no findings" in out.stdout


@pytest.mark.parametrize("content,fragments", [
    (b"", ["is empty: there is nothing to audit"]),
    (b"a,y\n", ["has a header but no data rows"]),
    (b"a,y\n1,2\n3,4,5,6\n", ["cannot read", "as CSV", "Expected 2 fields in line 3, saw 4"]),
    (bytes(range(256)) * 4, ["cannot read", "as CSV"]),
    (b"a,y\n1,cheap\n2,3\n", ["target column 'y' is not numeric (e.g. 'cheap' in row 0); encode it as numbers first"]),
    (b"a,y\n1,2\n", ["column 'price' not in"]),
    (b"name,y\nx,2\n", ["no numeric input columns besides the target 'y'"]),
])
def test_audit_bad_csv_is_a_one_line_error(tmp_path, content, fragments, capsys):
    pytest.importorskip("pandas")
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    target = "price" if "price" in fragments[0] else "y"
    assert main(["audit", str(path), "--target", target]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabilize: error: ")
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.slow  # a subprocess that trains, diagnoses and plots
@pytest.mark.needs("matplotlib")
def test_doctor_diagnoses_exits_one_and_writes_the_plot(tmp_path):
    png = tmp_path / "doctor.png"
    out = cli("doctor", "dirty-data", "--backend", "torch", "--plot", str(png))
    assert out.returncode == 1, out.stderr
    assert "diagnosis: dirty-data" in out.stdout and "origin: input batch" in out.stdout
    assert "stabilize.check_finite" in out.stdout and png.stat().st_size > 10_000
    assert "went non-finite" in out.stderr and "diagnosis:" not in out.stderr  # the log line, not the table
    assert "went non-finite" not in out.stdout
    out = cli("doctor", "dirty-data", "--variant", "fixed", "--backend", "torch")
    assert out.returncode == 0 and "nothing to diagnose" in out.stdout
