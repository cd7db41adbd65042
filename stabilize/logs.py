"""Where stabilize's messages go: one logger, the progress bar, and nothing else.

Everything stabilize reports while it runs (a diagnosis line, a rate change)
goes through ``logging.getLogger("stabilize")``, so an application silences or
redirects it the usual way::

    logging.getLogger("stabilize").setLevel(logging.ERROR)

stabilize adds no handler to that logger (a library must not); with none
configured, Python's last-resort handler prints WARNING and above on stderr.
A line names its source once: ``stabilize: ...`` when it goes to that
last-resort handler (which prints the message alone), and the bare message
when the application has configured handlers, whose format names the logger
(``%(name)s: %(message)s`` would otherwise read ``stabilize: stabilize: ...``).
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

__all__ = ["logger", "warning", "log", "announce", "held_lines", "print_held", "quiet_framework_import"]

logger = logging.getLogger("stabilize")
PREFIX = "stabilize: "


class _NameOnce(logging.Filter):
    """Messages are written with the ``stabilize: `` tag; keep it only where no handler's format adds the name."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(PREFIX) and logger.hasHandlers():
            record.msg = record.msg[len(PREFIX):]
        return True


if not any(isinstance(f, _NameOnce) for f in logger.filters):  # once, even if this module is reloaded
    logger.addFilter(_NameOnce())


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


def announce(event, seen: set) -> None:
    """Log the first event of each kind and action a guard records, so that no guard skips a step
    unseen (with or without a diagnosis); ``seen`` holds the ``(kind, action)`` pairs already logged.
    The repeats are counted in the history, not logged; a loss scaler's own skips are routine."""
    key = (event.kind, event.action)
    if key in seen or event.action in ("applied", "clipped") or event.kind == "scaler":
        return
    seen.add(key)
    logger.warning("stabilize: %s (further '%s -> %s' events: see the history, not logged)", event, *key)


def warning(message: str, bar=None) -> None:
    """:func:`log` at WARNING: the level of a diagnosis line."""
    log(logging.WARNING, message, bar)


@contextlib.contextmanager
def held_lines():
    """Hold the ``stabilize`` logger's lines while a table is printed; yields the list they go to.

    For programs that print a table row by row on stdout (the parity command, the demo): a diagnosis
    line logged between two rows would land inside the table on a terminal. The caller prints the
    held lines after the table. The logger is put back as it was.
    """
    held: list[str] = []
    handler = logging.Handler(logging.NOTSET)
    handler.emit = lambda record: held.append(record.getMessage())
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def print_held(held: list[str], stream=None) -> None:
    """Print the distinct held lines after the table, each tagged ``stabilize: `` once."""
    stream = stream or sys.stderr
    lines = list(dict.fromkeys(line if line.startswith(PREFIX) else PREFIX + line for line in held))
    if lines:
        print(f"\n{len(lines)} line(s) logged during the runs (distinct ones):", file=stream)
        for line in lines:
            print(f"  {line}", file=stream)


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
