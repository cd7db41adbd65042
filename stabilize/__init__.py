"""stabilize: keep neural-network training numerically stable, in PyTorch and TensorFlow.

Importing this package imports neither torch nor tensorflow; a backend is
loaded the first time it is needed.
"""

from . import config
from .config import set_backend, use_backend
from .errors import (
    BackendNotAvailableError,
    ConfigError,
    NonFiniteError,
    RankLostError,
    StabilizeError,
    UnknownBackendError,
)
from .audit import AuditReport, Finding, audit
from .diagnose import Diagnosis
from .finite import FiniteReport, LeafReport, check_finite
from .ops import clip_grads, clip_grads_, global_norm, safe_cross_entropy, safe_div, safe_log, safe_mse
from .singular import masked_softmax, safe_acos, safe_asin, safe_norm, safe_pow, safe_sqrt, safe_std, safe_var
from .registry import backend_for, get_backend, known_backends, register_backend
from .trainer import StabilityTrainer
from .history import Event, History
from .guard.settings import GuardSettings
from .guards import keras_guard
from .losses import keras_loss

__version__ = "0.1.0"

from .frameworks import register_keras_objects as _register_keras_objects

_register_keras_objects()  # keras.models.load_model of a guarded model needs only `import stabilize`


def __getattr__(name):
    """Load on first use what would import a framework or a heavy subpackage (PEP 562)."""
    if name == "TorchGuard":
        from .integrations.torch_guard import TorchGuard

        return TorchGuard
    if name in ("scenarios", "parity", "integrations", "guard", "lightning", "hf"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "config",
    "set_backend",
    "use_backend",
    "get_backend",
    "backend_for",
    "known_backends",
    "register_backend",
    "safe_log",
    "safe_div",
    "safe_mse",
    "safe_cross_entropy",
    "safe_sqrt",
    "safe_norm",
    "safe_pow",
    "safe_acos",
    "safe_asin",
    "masked_softmax",
    "safe_var",
    "safe_std",
    "clip_grads",
    "clip_grads_",
    "global_norm",
    "check_finite",
    "audit",
    "AuditReport",
    "Finding",
    "Diagnosis",
    "StabilityTrainer",
    "TorchGuard",
    "GuardSettings",
    "keras_guard",
    "keras_loss",
    "History",
    "Event",
    "FiniteReport",
    "LeafReport",
    "StabilizeError",
    "ConfigError",
    "UnknownBackendError",
    "BackendNotAvailableError",
    "NonFiniteError",
    "RankLostError",
]
