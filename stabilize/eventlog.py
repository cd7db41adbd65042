"""A JSON-lines log of the run's events, beside a checkpoint: one JSON object per line.

Every :class:`~stabilize.history.Event` the Supervisor records (non-finite
steps, spikes, rewinds, left-out batches, back-offs) is appended as it
happens, and the file is flushed, so a dashboard or ``jq`` can follow a run
and nothing is skipped silently, even if the process dies later. Non-finite
numbers are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(strict JSON has no such literals).

Set it with ``events_path=`` (a trainer or guard setting); a trainer without
one starts a log beside its first checkpoint (:func:`beside`), holding the
events recorded so far.

What holds across crashes and resumes:

* **one record per event:** loading a checkpoint rewrites the log (atomically)
  to exactly the events that checkpoint holds (:meth:`EventLog.rewrite`), so a
  resume neither repeats the restored events nor keeps those of steps the
  resumed run does again; later events are appended as they happen;
* **a failed write never stops training:** it is counted
  (:attr:`EventLog.failures`) and warned about once (a full disk, a
  read-only directory);
* **a torn last line** (a kill in the middle of an append) is dropped, with a
  warning, by :func:`read` and before the next append; any other bad line
  (not JSON, not UTF-8, not an object) raises :class:`EventLogError` naming the
  file and the line.

Example:
    >>> import json, os, tempfile
    >>> from stabilize.history import Event
    >>> path = os.path.join(tempfile.mkdtemp(), "run.events.jsonl")
    >>> log = EventLog(path)
    >>> log.append(Event(3, 3, 0, "spike", (), "skipped", 0.01, 812.5, float("inf")))
    >>> json.loads(open(path).readline())["grad_norm"]
    'Infinity'
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

from .errors import StabilizeError

__all__ = ["EventLog", "EventLogError", "beside", "read"]


class EventLogError(StabilizeError, ValueError):
    """A line of an event log that is not a JSON object (named by file and line number)."""


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, tuple):
        return list(value)
    return value


def _line(event) -> str:
    return json.dumps({k: _plain(v) for k, v in dataclasses.asdict(event).items()}, allow_nan=False) + "\n"


class EventLog:
    """Appends events to ``path``, one JSON object a line (created if missing; see the module docstring).

    Attributes:
        failures: appends or rewrites that could not be written (each one warned about only the first time).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.failures = 0
        self._checked_tail = False

    def append(self, event) -> None:
        """Append one record (a failure is counted and warned about once, never raised)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._checked_tail:
                self._drop_torn_tail()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(_line(event))
                f.flush()
        except OSError as exc:
            self._failed(exc)

    def rewrite(self, events) -> bool:
        """Replace the log by exactly ``events`` (after loading a checkpoint), atomically."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(_line(e) for e in events)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            self._failed(exc)
            return False
        self._checked_tail = True
        return True

    def _drop_torn_tail(self) -> None:
        """A writer killed mid-append leaves a last line without its newline: cut it before appending."""
        self._checked_tail = True
        if not self.path.is_file():  # missing, or a device (reading /dev/full never ends)
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read()
            if not tail or tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            try:  # a whole record that only lacks its newline: end it
                whole = isinstance(json.loads(tail[cut + 1:].decode("utf-8")), dict)
            except (UnicodeDecodeError, ValueError):
                whole = False
            keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size)
            if whole or keep == size:  # (a last line over 64 KiB is not one of ours: ended, not cut)
                f.write(b"\n")
                return
            warnings.warn(f"stabilize: event log {str(self.path)!r} ended in a torn line (a writer died "
                          f"mid-append); it was cut before appending", RuntimeWarning, stacklevel=4)
            f.truncate(keep)

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if self.failures == 1:
            warnings.warn(f"stabilize: cannot write the event log {str(self.path)!r} ({exc.strerror or exc}); "
                          f"training goes on, the events stay in the history, and failed writes are counted "
                          f"in .failures", RuntimeWarning, stacklevel=4)


def beside(checkpoint_path) -> Path:
    """The log's default path next to a checkpoint: ``run.ckpt`` -> ``run.ckpt.events.jsonl``."""
    p = Path(checkpoint_path)
    return p.with_name(p.name + ".events.jsonl")


def read(path) -> list[dict]:
    """Every record of a log (non-finite numbers back as floats).

    A torn last line (no newline, not valid JSON) is skipped with a warning.

    Raises:
        EventLogError: any other line is not UTF-8, not JSON, or not an object (file and line named).
    """
    back = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            if number == len(lines):  # no newline after it: the writer died mid-append
                warnings.warn(f"stabilize: {str(path)!r} line {number} is torn (a writer died mid-append); "
                              f"skipped", RuntimeWarning, stacklevel=2)
                continue
            raise EventLogError(f"event log {str(path)!r}, line {number}: not a JSON record ({exc})") from exc
        if not isinstance(record, dict):
            raise EventLogError(f"event log {str(path)!r}, line {number}: a JSON {type(record).__name__}, not an "
                                f"object")
        out.append({k: back.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return out
