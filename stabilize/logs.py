"""Where stabilize's messages go: one logger, the progress bar, and nothing else.

Everything stabilize reports while it runs (a diagnosis line, a rate change)
goes through ``logging.getLogger("stabilize")``, so an application silences or
redirects it the usual way::

    logging.getLogger("stabilize").setLevel(logging.ERROR)

stabilize adds no handler to that logger (a library must not); with none
configured, Python's last-resort handler prints WARNING and above on stderr.
While a tqdm progress bar is on screen, :func:`warning` clears the bar, logs,
and redraws it, so the line neither breaks the bar nor bypasses the logger
(``tqdm.write`` would do both).

:func:`quiet_framework_import` imports TensorFlow with its C++ start-up
chatter (absl and oneDNN banners written straight to file descriptor 2)
discarded; the command line and the demo use it for their own output only.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

__all__ = ["logger", "warning", "log", "quiet_framework_import"]

logger = logging.getLogger("stabilize")


def log(level: int, message: str, bar=None) -> None:
    """Log ``message`` at ``level`` on the ``stabilize`` logger, around the progress bar if one is shown.

    Args:
        level: a ``logging`` level.
        message: the text (one line).
        bar: the tqdm bar in progress, or None. A disabled or closed bar is ignored.

    Example:
        >>> import logging
        >>> from stabilize import logs
        >>> logging.getLogger("stabilize").setLevel(logging.ERROR)
        >>> logs.warning("this is silenced")
        >>> logging.getLogger("stabilize").setLevel(logging.NOTSET)
    """
    if not logger.isEnabledFor(level):
        return
    write_mode = getattr(bar, "external_write_mode", None)
    if bar is None or getattr(bar, "disable", True) or write_mode is None:
        logger.log(level, message)
        return
    with write_mode():  # clear the bar, log, redraw
        logger.log(level, message)


def warning(message: str, bar=None) -> None:
    """:func:`log` at WARNING: the level of a diagnosis line."""
    log(logging.WARNING, message, bar)


def progress_bar(total: int | None, show: bool | None):
    """A tqdm bar for a fit (None when ``show`` is False or tqdm is missing); ``show=None``:
    only when stderr is a terminal (tqdm's ``disable=None``)."""
    if show is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, disable=None if show is None else False, leave=False, desc="stabilize")


@contextlib.contextmanager
def _fd2_discarded():
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks: nothing to redirect
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def quiet_framework_import(name: str = "tensorflow") -> bool:
    """Import ``name`` (and keras, for tensorflow) with its start-up chatter discarded.

    Returns True when the import succeeded, False when the framework is not
    installed. Import errors other than a missing module propagate after stderr
    is restored. Meant for programs (the CLI, the demo), not for library code:
    it briefly redirects the process's stderr.
    """
    if name in sys.modules:
        return True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _fd2_discarded():
        try:
            importlib.import_module(name)
            if name == "tensorflow":
                importlib.import_module("keras")
        except ModuleNotFoundError:
            return False
    return True
