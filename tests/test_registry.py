"""Backend resolution: the precedence table, dispatch on tensor type, errors, device, no framework at import."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import stabilize
from stabilize import config

# (explicit, context, set_backend, env, stabilize.toml, pyproject, expected, source)
PRECEDENCE = [
    (None, None, None, None, None, None, "torch", "default"),
    (None, None, None, None, None, "numpy", "numpy", "pyproject.toml [tool.stabilize]"),
    (None, None, None, None, "tensorflow", "numpy", "tensorflow", "stabilize.toml"),
    (None, None, None, "numpy", "tensorflow", "torch", "numpy", "STABILIZE_BACKEND"),
    (None, None, "tensorflow", "numpy", "torch", "torch", "tensorflow", "set_backend()"),
    (None, "numpy", "tensorflow", "torch", "torch", "torch", "numpy", "use_backend()"),
    ("torch", "numpy", "tensorflow", "numpy", "numpy", "numpy", "torch", "backend= argument"),
]


@pytest.mark.parametrize("explicit,ctx,glob,env,own,pyproject,expected,source", PRECEDENCE)
def test_config_precedence_table(tmp_path, monkeypatch, explicit, ctx, glob, env, own, pyproject, expected, source):
    if env:
        monkeypatch.setenv("STABILIZE_BACKEND", env)
    if own:
        (tmp_path / "stabilize.toml").write_text(f'backend = "{own}"\n')
    if pyproject:
        (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "x"\n\n[tool.stabilize]\nbackend = "{pyproject}"\n')
    before = sorted(os.listdir(tmp_path)), dict(os.environ)
    stabilize.set_backend(glob)
    if ctx:
        with stabilize.use_backend(ctx):
            name, got_source = config.resolve_backend_name(explicit)
    else:
        name, got_source = config.resolve_backend_name(explicit)
    assert name == expected
    assert got_source.endswith(source)
    assert (sorted(os.listdir(tmp_path)), dict(os.environ)) == before  # resolving has no side effects


def test_use_backend_nests_and_restores():
    with stabilize.use_backend("numpy"):
        with stabilize.use_backend("tf"):
            assert config.resolve_backend_name()[0] == "tf"
        assert stabilize.get_backend().name == "numpy"
    assert config.resolve_backend_name()[0] == "torch"


def test_unknown_backend_lists_known_names(monkeypatch):
    with pytest.raises(stabilize.UnknownBackendError, match=r"known backends: .*numpy.*tensorflow.*torch"):
        stabilize.get_backend("jaxx")
    monkeypatch.setenv("STABILIZE_BACKEND", "mxnet")
    with pytest.raises(stabilize.UnknownBackendError, match=r"'mxnet' \(from STABILIZE_BACKEND\)"):
        stabilize.get_backend()
    with pytest.raises(stabilize.UnknownBackendError):
        stabilize.set_backend("nope")


def test_invalid_toml_is_a_clear_error(tmp_path):
    (tmp_path / "stabilize.toml").write_text("backend = \n")
    with pytest.raises(stabilize.ConfigError, match="stabilize.toml is not valid TOML"):
        stabilize.get_backend()


def _run(code):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("STABILIZE_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=240)


def test_import_stabilize_imports_no_framework():
    out = _run("""
        import sys, numpy as np, stabilize
        stabilize.check_finite({"a": np.ones(3)})
        stabilize.safe_log(np.ones(2), backend="numpy")
        stabilize.clip_grads([np.ones(2)], max_norm=1.0, backend="numpy")
        bad = [m for m in ("torch", "tensorflow", "keras", "jax", "lightning", "transformers", "accelerate")
               if m in sys.modules]
        print("LOADED", bad)
    """)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_known_but_missing_framework_names_the_pip_extra():
    out = _run("""
        import sys
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
        import stabilize
        try:
            stabilize.get_backend("torch")
        except stabilize.BackendNotAvailableError as e:
            print("ERR", e)
    """)
    assert "ERR backend 'torch' is known but its framework failed to import" in out.stdout, out.stderr
    assert "pip install 'stabilize-nn[torch]' (from a clone: pip install -e '.[torch]')" in out.stdout


def test_ops_dispatch_on_tensor_type_not_on_config(backend):
    from helpers import to_native

    x = to_native(backend, np.array([0.0, 1.0]), "float32")
    other = "tensorflow" if backend == "torch" else "torch"
    with stabilize.use_backend(other):
        y = stabilize.safe_log(x)
    assert stabilize.backend_for(y).name == backend


def test_numpy_input_goes_to_configured_backend(backend):
    with stabilize.use_backend(backend):
        y = stabilize.safe_log(np.array([0.0, 1.0]))
    assert stabilize.get_backend(backend).is_tensor(y)


def test_register_backend_third_party():
    from stabilize.backends.numpy import NumpyBackend

    calls = []

    def loader():
        calls.append(1)
        return NumpyBackend()

    stabilize.register_backend("lazy-numpy", loader)
    assert calls == []  # lazy: nothing loaded at registration
    assert "lazy-numpy" in stabilize.known_backends()
    y = stabilize.safe_log(np.array([0.0]), backend="lazy-numpy")
    assert calls == [1] and np.isfinite(y).all()
    with pytest.raises(TypeError, match="callable"):
        stabilize.register_backend("x", "not callable")


def test_torch_device_follows_config(tmp_path, monkeypatch):
    from conftest import load_backend

    B = load_backend("torch")
    import torch

    monkeypatch.setenv("STABILIZE_DEVICE", "cpu")
    assert B.convert(np.ones(2)).device.type == "cpu"
    monkeypatch.delenv("STABILIZE_DEVICE")
    (tmp_path / "stabilize.toml").write_text('device = "cpu"\n')
    assert B.device().type == "cpu"
    (tmp_path / "stabilize.toml").unlink()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert B.device().type == expected
    monkeypatch.setenv("STABILIZE_DEVICE", "gpu0")
    with pytest.raises(stabilize.ConfigError, match="invalid device 'gpu0'"):
        B.device()
