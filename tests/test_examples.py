"""The examples run as the README says (the parity demo on one dtype, without plots, to keep CI short)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabilize import scenarios

ROOT = Path(__file__).resolve().parents[1]

# Each example is a subprocess that imports the frameworks and trains (the parity demo alone: ~90 s CPU).
pytestmark = pytest.mark.slow


def _run(args, env_extra=None, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    env.pop("STABILIZE_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd or ROOT)


@pytest.mark.parametrize("script", [
    "torch_user.py",
    pytest.param("keras_user.py", marks=pytest.mark.needs("tensorflow")),
    pytest.param("quickstart.py", marks=pytest.mark.needs("tensorflow")),
])
def test_example_runs(script):
    out = _run([str(ROOT / "examples" / script)])
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.needs("tensorflow")
def test_swap_backend_by_env_and_by_pyproject(tmp_path):
    lines = {}
    for name in ("torch", "tensorflow"):
        out = _run([str(ROOT / "examples" / "swap_backend.py")], {"STABILIZE_BACKEND": name})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"backend: {name} (chosen by STABILIZE_BACKEND)" in out.stdout
        lines[name] = [l for l in out.stdout.splitlines() if l.startswith("first loss")]
    assert lines["torch"] == lines["tensorflow"]  # the same numbers, printed to 12 digits
    (tmp_path / "pyproject.toml").write_text('[tool.stabilize]\nbackend = "tensorflow"\n')
    out = _run([str(ROOT / "examples" / "swap_backend.py")], cwd=tmp_path)
    assert "backend: tensorflow (chosen by" in out.stdout and "pyproject.toml" in out.stdout


@pytest.mark.needs("tensorflow", "matplotlib", "sklearn")
def test_parity_demo_runs(tmp_path):
    out = _run([str(ROOT / "examples" / "parity_demo.py"), "--dtype", "float32", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all parity bars met" in out.stdout
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(scenarios.names())


def test_gan_example_two_guards():
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import gan_guards
    finally:
        sys.path.pop(0)
    out = gan_guards.main()
    assert out == {"d_events": [(2, "backed-off")], "g_applied": 6}
