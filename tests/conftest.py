"""Shared fixtures.

``STABILIZE_TEST_BACKENDS`` (default ``torch,tensorflow``) names the backends
this run must exercise: one of those that cannot load fails the run; a backend
not named is skipped.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest

REQUIRED = [b.strip() for b in os.environ.get("STABILIZE_TEST_BACKENDS", "torch,tensorflow").split(",") if b.strip()]
ALL_BACKENDS = ["torch", "tensorflow"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def load_backend(name):
    import stabilize

    try:
        return stabilize.get_backend(name)
    except stabilize.BackendNotAvailableError as exc:
        if name in REQUIRED:
            pytest.fail(f"backend {name} was asked for (STABILIZE_TEST_BACKENDS) but cannot load: {exc}")
        pytest.skip(f"backend {name} not installed and not asked for")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return load_backend(request.param).name


def _devices():
    out = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    return out


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param not in _devices():
        pytest.skip("no CUDA device")
    return request.param


def _seed_frameworks():
    """Seed every installed framework: tests that build a native model get the same
    initial weights on every run (an unseeded Keras init made one assertion fail ~3% of runs)."""
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass
    try:
        import keras

        keras.utils.set_random_seed(0)
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch, tmp_path):
    """Each test starts from default config: no env override, an empty cwd."""
    import stabilize

    monkeypatch.delenv("STABILIZE_BACKEND", raising=False)
    monkeypatch.delenv("STABILIZE_DEVICE", raising=False)
    monkeypatch.chdir(tmp_path)
    stabilize.set_backend(None)
    _seed_frameworks()
    yield
    stabilize.set_backend(None)
