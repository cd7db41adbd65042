"""Shared fixtures, and the rule for what a partial install skips.

``STABILIZE_TEST_BACKENDS`` (default ``torch,tensorflow``) names the backends
this run must exercise: one of those that cannot load fails the run; a backend
not named is skipped.

A test that needs a module from an extra that is not installed (scikit-learn,
matplotlib or tqdm from ``scenarios``, or a framework not named in
``STABILIZE_TEST_BACKENDS``) is skipped, naming the module and the extra: a
torch-only install (``pip install -e '.[torch,test]'`` with
``STABILIZE_TEST_BACKENDS=torch``) runs everything it can and skips the rest.
The rule is applied once, here (``pytest_runtest_call``, and ``pytest.importorskip``),
not test by test.
"""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest

REQUIRED = [b.strip() for b in os.environ.get("STABILIZE_TEST_BACKENDS", "torch,tensorflow").split(",") if b.strip()]
ALL_BACKENDS = ["torch", "tensorflow"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


# module -> (extra that installs it, the backend it belongs to or None)
OPTIONAL = {
    "sklearn": ("scenarios", None),
    "matplotlib": ("scenarios", None),
    "tqdm": ("scenarios", None),
    "pandas": ("test", None),
    "tensorflow": ("tensorflow", "tensorflow"),
    "keras": ("tensorflow", "tensorflow"),
    "torch": ("torch", "torch"),
    "mkdocs": ("docs", None),
    "material": ("docs", None),
    "mkdocstrings": ("docs", None),
    "lightning": ("lightning", None),
    "transformers": ("hf", None),
    "accelerate": ("hf", None),
}


def _importorskip(modname, *args, **kwargs):
    """``pytest.importorskip`` under the same rule: a missing optional module skips naming its extra
    (pytest's own reason, "could not import 'keras'", does not say what to install), and a module of a
    backend that ``STABILIZE_TEST_BACKENDS`` asks for fails instead of skipping."""
    top = modname.split(".")[0]
    if top in OPTIONAL and importlib.util.find_spec(top) is None:
        extra, backend = OPTIONAL[top]
        if backend in REQUIRED:
            pytest.fail(f"{top} is needed by the backend {backend}, which STABILIZE_TEST_BACKENDS asks for",
                        pytrace=False)
        pytest.skip(f"needs {top} (the '{extra}' extra), not installed", allow_module_level=True)
    return _pytest_importorskip(modname, *args, **kwargs)


_pytest_importorskip = pytest.importorskip
pytest.importorskip = _importorskip  # the tests' own calls, module-level ones included, follow the rule


def _missing_optional(exc):
    """The (module, extra) behind an ImportError that a partial install may skip, else None."""
    while exc is not None:
        name = getattr(exc, "name", None)
        if isinstance(exc, ImportError) and name:
            top = name.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                extra, backend = OPTIONAL[top]
                return None if backend in REQUIRED else (top, extra)
        exc = exc.__cause__ or exc.__context__
    return None


def _skip_if_optional_missing(outcome):
    exc = getattr(outcome, "exception", None)
    if exc is None:
        try:
            outcome.get_result()
        except BaseException as err:  # noqa: BLE001 - inspected, then re-raised by pluggy
            exc = err
    missing = _missing_optional(exc) if exc is not None else None
    if missing is not None:
        module, extra = missing
        outcome.force_exception(pytest.skip.Exception(f"needs {module} (the '{extra}' extra), not installed"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    outcome = yield
    _skip_if_optional_missing(outcome)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    _skip_if_optional_missing(outcome)


@pytest.fixture(autouse=True)
def _needs_marker(request):
    """``@pytest.mark.needs("tensorflow", "matplotlib")``: for tests that use a module only in a
    subprocess, where the ImportError rule above cannot see it."""
    marker = request.node.get_closest_marker("needs")
    for module in marker.args if marker else ():
        if importlib.util.find_spec(module) is None:
            extra, backend = OPTIONAL.get(module, (None, None))
            if backend in REQUIRED:
                pytest.fail(f"{module} is needed by the backend {backend}, which STABILIZE_TEST_BACKENDS asks for")
            pytest.skip(f"needs {module} (the '{extra}' extra), not installed")


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
