"""The lazy backend registry.

A backend module is imported only when first needed, and a framework the user
has not imported is never imported to find out what a tensor is: as in einops,
dispatch on a tensor only consults backends whose framework is already in
``sys.modules`` (if a tensor exists, its framework was imported). A framework
may be missing, heavy to import or broken; none of that should matter to a user
of another one.

Dispatch rule: an op runs on the backend of the tensors it is given. The
configured backend (see :mod:`stabilize.config`) decides only where no tensor
does: numpy arrays, Python numbers, neutral specs.
"""

from __future__ import annotations

import importlib
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from . import config
from .errors import BackendNotAvailableError, ConfigError, UnknownBackendError

__all__ = ["register_backend", "get_backend", "backend_for", "known_backends", "canonical_name"]


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[], Any]
    framework_module: str | None  # consulted in sys.modules for tensor dispatch
    extra: str | None  # the pip extra that installs the framework


def _builtin(module: str, cls: str) -> Callable[[], Any]:
    def load():
        return getattr(importlib.import_module(module), cls)()

    return load


_entries: dict[str, _Entry] = {
    "torch": _Entry(_builtin("stabilize.backends.torch", "TorchBackend"), "torch", "torch"),
    "tensorflow": _Entry(
        _builtin("stabilize.backends.tensorflow", "TensorFlowBackend"), "tensorflow", "tensorflow"
    ),
    "numpy": _Entry(_builtin("stabilize.backends.numpy", "NumpyBackend"), "numpy", None),
}
_aliases = {"tf": "tensorflow", "pytorch": "torch", "np": "numpy"}
_instances: dict[str, Any] = {}
_type_cache: dict[type, Any] = {}
_lock = threading.Lock()


def known_backends() -> list[str]:
    """Names of every registered backend, loaded or not."""
    return sorted(_entries)


def canonical_name(name: str, source: str = "argument") -> str:
    """Map an alias (``tf``, ``pytorch``) to its backend name; raise on unknown names."""
    key = name.strip().lower()
    key = _aliases.get(key, key)
    if key not in _entries:
        raise UnknownBackendError(name, known_backends() + sorted(_aliases), source)
    return key


def register_backend(
    name: str,
    loader: Callable[[], Any],
    *,
    framework_module: str | None = None,
    extra: str | None = None,
) -> None:
    """Register a third-party backend.

    Args:
        name: the name users pass as ``backend=`` or ``STABILIZE_BACKEND``.
        loader: a zero-argument callable returning a backend instance (an
            object with the primitives of :class:`stabilize.backends.base.Backend`).
            It is called on first use, not now.
        framework_module: the top-level module whose tensors this backend
            handles; tensors dispatch to it once that module is imported.
        extra: a pip extra to name in the error when the loader fails to import.

    Example:
        >>> import stabilize
        >>> from stabilize.backends.numpy import NumpyBackend
        >>> stabilize.register_backend("mynumpy", NumpyBackend)
        >>> stabilize.get_backend("mynumpy").name
        'numpy'
    """
    if not callable(loader):
        raise TypeError(f"loader must be a zero-argument callable, got {type(loader).__name__}")
    key = name.strip().lower()
    with _lock:
        _entries[key] = _Entry(loader, framework_module, extra)
        _instances.pop(key, None)
        _type_cache.clear()


def _load(name: str):
    inst = _instances.get(name)
    if inst is not None:
        return inst
    entry = _entries[name]
    with _lock:
        if name not in _instances:
            try:
                _instances[name] = entry.loader()
            except ImportError as exc:
                raise BackendNotAvailableError(name, entry.extra, exc) from exc
        return _instances[name]


def get_backend(backend: str | Any | None = None):
    """Return the backend in force (see :mod:`stabilize.config` for the precedence).

    ``backend`` may be a name, an alias or a backend instance.

    Example:
        >>> import stabilize
        >>> stabilize.get_backend("numpy").name
        'numpy'
    """
    if backend is not None and not isinstance(backend, str):
        return backend
    name, source = config.resolve_backend_name(backend)
    return _load(canonical_name(name, source))


def backend_for(*values, backend: str | None = None):
    """The backend of the first framework tensor among ``values``.

    An explicit ``backend`` wins; where no value is a framework tensor the
    configured backend is used. Only frameworks already imported are consulted.
    """
    if backend is not None:
        return get_backend(backend)
    for value in values:
        found = _type_cache.get(type(value))
        if found is None:
            found = _lookup_type(value)
        if found is not None:
            return found
    return get_backend()


def _lookup_type(value):
    if value is None or isinstance(value, (int, float, bool, list, tuple, dict, str)):
        return None
    for name, entry in list(_entries.items()):
        if name == "numpy" or entry.framework_module is None:
            continue  # numpy arrays defer to the configured backend
        if entry.framework_module not in sys.modules and name not in _instances:
            continue
        try:
            inst = _load(name)
        except (BackendNotAvailableError, ConfigError):
            continue
        if inst.is_tensor(value):
            _type_cache[type(value)] = inst
            return inst
    return None
