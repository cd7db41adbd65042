"""Where the backend and device come from.

Precedence, highest first (``resolve``):

1. an explicit ``backend=`` / ``device=`` argument;
2. the innermost :func:`use_backend` context, else :func:`set_backend`;
3. the ``STABILIZE_BACKEND`` / ``STABILIZE_DEVICE`` environment variables;
4. ``stabilize.toml`` (top-level keys) in the working directory, else
   ``[tool.stabilize]`` in its ``pyproject.toml``;
5. the default: backend ``"torch"``, device ``"auto"`` (CUDA when torch sees one).

Resolving reads but never writes: no file, environment variable or global is
changed by asking which backend is in force.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from pathlib import Path
from typing import Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import ConfigError

__all__ = [
    "DEFAULT_BACKEND",
    "set_backend",
    "use_backend",
    "resolve_backend_name",
    "resolve_device",
    "file_config",
]

DEFAULT_BACKEND = "torch"
DEVICES = ("auto", "cpu", "cuda")

_context: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "stabilize_backend_stack", default=()
)
_global: str | None = None


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` clears it).

    Example:
        >>> import stabilize
        >>> stabilize.set_backend("numpy")
        >>> stabilize.get_backend().name
        'numpy'
        >>> stabilize.set_backend(None)
    """
    global _global
    if name is not None:
        _validate_name(name, "set_backend()")
    _global = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the backend inside a ``with`` block (thread- and task-local).

    Example:
        >>> import stabilize
        >>> with stabilize.use_backend("numpy"):
        ...     stabilize.get_backend().name
        'numpy'
    """
    _validate_name(name, "use_backend()")
    token = _context.set(_context.get() + (name,))
    try:
        yield
    finally:
        _context.reset(token)


def _validate_name(name, source):
    from . import registry  # local: registry imports config

    if not isinstance(name, str):
        raise ConfigError(f"{source} expects a backend name (str), got {type(name).__name__}")
    registry.canonical_name(name, source)


def file_config(cwd: str | os.PathLike | None = None) -> tuple[dict, str | None]:
    """Return ``(settings, path)`` from ``stabilize.toml`` or ``pyproject.toml`` in ``cwd``."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    own = base / "stabilize.toml"
    if own.is_file():
        return _read_toml(own), str(own)
    pyproject = base / "pyproject.toml"
    if pyproject.is_file():
        section = _read_toml(pyproject).get("tool", {}).get("stabilize")
        if section is not None:
            if not isinstance(section, dict):
                raise ConfigError(f"{pyproject}: [tool.stabilize] must be a table")
            return section, f"{pyproject} [tool.stabilize]"
    return {}, None


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def resolve_backend_name(explicit: str | None = None) -> tuple[str, str]:
    """Return ``(name, source)`` of the backend in force; ``source`` says which rule won."""
    if explicit is not None:
        return explicit, "backend= argument"
    stack = _context.get()
    if stack:
        return stack[-1], "use_backend()"
    if _global is not None:
        return _global, "set_backend()"
    env = os.environ.get("STABILIZE_BACKEND", "").strip()
    if env:
        return env, "STABILIZE_BACKEND"
    settings, path = file_config()
    if "backend" in settings:
        return str(settings["backend"]), path
    return DEFAULT_BACKEND, "default"


def resolve_device(explicit: str | None = None) -> tuple[str, str]:
    """Return ``(device, source)``: one of ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if explicit is not None:
        value, source = explicit, "device= argument"
    elif os.environ.get("STABILIZE_DEVICE", "").strip():
        value, source = os.environ["STABILIZE_DEVICE"].strip(), "STABILIZE_DEVICE"
    else:
        settings, path = file_config()
        value, source = (settings["device"], path) if "device" in settings else ("auto", "default")
    value = str(value)
    if value not in DEVICES and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ConfigError(
            f"invalid device {value!r} (from {source}); use one of {', '.join(DEVICES)} or 'cuda:N'"
        )
    return value, source
