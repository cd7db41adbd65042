"""Exceptions raised by stabilize.

Every error says what was received, what is allowed, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "StabilizeError",
    "UnknownBackendError",
    "BackendNotAvailableError",
    "NonFiniteError",
    "ConfigError",
    "SkipAlarmError",
]


class StabilizeError(Exception):
    """Base class of every error stabilize raises on purpose."""


class ConfigError(StabilizeError, ValueError):
    """A configuration value (argument, environment variable or file) is invalid."""


class UnknownBackendError(ConfigError):
    """A backend name that is not registered."""

    def __init__(self, name: str, known: list[str], source: str = "argument"):
        self.name = name
        self.known = known
        super().__init__(
            f"unknown backend {name!r} (from {source}); known backends: "
            f"{', '.join(sorted(known))}. Register a new one with "
            f"stabilize.register_backend(name, loader)."
        )


class BackendNotAvailableError(StabilizeError, ImportError):
    """A known backend whose framework cannot be imported."""

    def __init__(self, name: str, extra: str | None, cause: BaseException):
        self.name = name
        hint = (
            f"install it with: pip install 'stabilize[{extra}]'"
            if extra
            else "install the framework it wraps"
        )
        super().__init__(
            f"backend {name!r} is known but its framework failed to import "
            f"({type(cause).__name__}: {cause}); {hint}"
        )


class NonFiniteError(StabilizeError, FloatingPointError):
    """NaN or Inf values were found. ``report`` holds the full FiniteReport."""

    def __init__(self, message: str, report=None):
        self.report = report
        super().__init__(message)


class SkipAlarmError(StabilizeError, RuntimeError):
    """Too many recent steps were not applied (``skip_alarm="raise"``): the run is not training."""
