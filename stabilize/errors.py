"""Exceptions raised by stabilize.

Every error says what was received, what is allowed, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "DISTRIBUTION",
    "install_hint",
    "StabilizeError",
    "UnknownBackendError",
    "BackendNotAvailableError",
    "NonFiniteError",
    "ConfigError",
    "SkipAlarmError",
    "RankLostError",
]


# The name on the package index: PyPI's ``stabilize`` is an unrelated project,
# so ``pip install stabilize`` would install someone else's package.
DISTRIBUTION = "stabilize-nn"


def install_hint(extra: str) -> str:
    """The command that installs a pip extra of this package, from the index or a clone.

    Example:
        >>> from stabilize.errors import install_hint
        >>> install_hint("tensorflow")
        "pip install 'stabilize-nn[tensorflow]' (from a clone: pip install -e '.[tensorflow]')"
    """
    return f"pip install '{DISTRIBUTION}[{extra}]' (from a clone: pip install -e '.[{extra}]')"


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
            f"install it with: {install_hint(extra)}"
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


class RankLostError(StabilizeError, RuntimeError):
    """A rank of the process group is gone (killed, out of memory): the guarded step's collective
    cannot complete, and the ranks can no longer decide together. The message names the lost rank."""
