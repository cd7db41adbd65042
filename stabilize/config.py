"""Where the backend and device come from.

Precedence, highest first (``resolve``):

1. an explicit ``backend=`` / ``device=`` argument;
2. the innermost :func:`use_backend` context, else :func:`set_backend`;
3. the ``STABILIZE_BACKEND`` / ``STABILIZE_DEVICE`` environment variables;
4. a config file, found by :func:`find_config_file`: starting in the working
   directory and moving up, the first ``stabilize.toml`` (top-level keys) or
   ``pyproject.toml`` with a ``[tool.stabilize]`` table; the search stops at
   the project root (the first directory holding a ``pyproject.toml``,
   ``.git`` or ``.hg``);
5. the default: backend ``"torch"``, device ``"auto"`` (CUDA when torch sees one).

The keys are ``backend`` and ``device``. An unknown key, or a ``[stabilize]``
table in ``pyproject.toml`` (which must be ``[tool.stabilize]``), gives a
warning once per file version; invalid TOML gives a one-line ConfigError.

Resolving reads but never writes: no file, environment variable or global is
changed by asking which backend is in force.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
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
    "find_config_file",
    "KEYS",
]

DEFAULT_BACKEND = "torch"
DEVICES = ("auto", "cpu", "cuda")
KEYS = ("backend", "device")
_ROOT_MARKERS = ("pyproject.toml", ".git", ".hg")
_warned: set = set()

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


class _Frame:
    """One active ``use_backend`` block; compared by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the backend inside a ``with`` block (thread- and task-local).

    Blocks may be exited in any order: leaving one removes exactly that block,
    and the innermost block still open wins. One limit comes from Python
    itself: context variables do not follow generators (PEP 568 was
    deferred), so while a generator is suspended at a ``yield`` inside a
    ``with use_backend(...)`` block, its caller sees that backend too. In a
    generator, pass ``backend=`` to the calls instead, or drive it with
    ``contextvars.copy_context().run(next, gen)``.

    Example:
        >>> import stabilize
        >>> with stabilize.use_backend("numpy"):
        ...     stabilize.get_backend().name
        'numpy'
    """
    _validate_name(name, "use_backend()")
    frame = _Frame(name)
    _context.set(_context.get() + (frame,))
    try:
        yield
    finally:
        # Remove this block only: a reset to the saved token would also drop blocks
        # entered after it, or restore ones already exited (out-of-order exits).
        _context.set(tuple(f for f in _context.get() if f is not frame))


def _validate_name(name, source):
    from . import registry  # local: registry imports config

    if not isinstance(name, str):
        raise ConfigError(f"{source} expects a backend name (str), got {type(name).__name__}")
    registry.canonical_name(name, source)


def find_config_file(cwd: str | os.PathLike | None = None) -> tuple[Path, str] | tuple[None, None]:
    """The config file in force: ``(path, kind)`` with kind ``"stabilize.toml"`` or ``"pyproject"``.

    Searches ``cwd`` (default: the working directory), then its parents, up to
    and including the project root (a directory holding ``pyproject.toml``,
    ``.git`` or ``.hg``). Returns ``(None, None)`` when there is none.
    """
    here = (Path(cwd) if cwd is not None else Path.cwd()).resolve()
    for base in (here, *here.parents):
        own = base / "stabilize.toml"
        if own.is_file():
            return own, "stabilize.toml"
        pyproject = base / "pyproject.toml"
        if pyproject.is_file():
            data = _read_toml(pyproject)
            if "stabilize" in data.get("tool", {}):
                return pyproject, "pyproject"
            if "stabilize" in data:
                _warn_once(pyproject, f"{pyproject} has a [stabilize] table, which is ignored; "
                                      f"rename it [tool.stabilize]")
        if any((base / marker).exists() for marker in _ROOT_MARKERS):
            break
    return None, None


def file_config(cwd: str | os.PathLike | None = None) -> tuple[dict, str | None]:
    """Return ``(settings, source)`` from the config file in force (see :func:`find_config_file`)."""
    path, kind = find_config_file(cwd)
    if path is None:
        return {}, None
    if kind == "stabilize.toml":
        settings, source = _read_toml(path), str(path)
    else:
        settings, source = _read_toml(path)["tool"]["stabilize"], f"{path} [tool.stabilize]"
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: [tool.stabilize] must be a table")
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        _warn_once(path, f"{source}: unknown key(s) {', '.join(map(repr, unknown))} ignored; "
                         f"known keys: {', '.join(KEYS)}")
    return settings, source


def _warn_once(path: Path, message: str) -> None:
    try:
        key = (str(path), path.stat().st_mtime_ns, message)
    except OSError:
        key = (str(path), None, message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib decodes before it parses
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}), so "
                          f"not valid TOML; save it as UTF-8 or remove it") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None


def resolve_backend_name(explicit: str | None = None) -> tuple[str, str]:
    """Return ``(name, source)`` of the backend in force; ``source`` says which rule won."""
    if explicit is not None:
        return explicit, "backend= argument"
    stack = _context.get()
    if stack:
        return stack[-1].name, "use_backend()"
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
