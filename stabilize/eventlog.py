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
from pathlib import Path

__all__ = ["EventLog", "beside", "read"]


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, tuple):
        return list(value)
    return value


class EventLog:
    """Appends events to ``path``, one JSON object a line (the file is created, never truncated)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event) -> None:
        record = {k: _plain(v) for k, v in dataclasses.asdict(event).items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()


def beside(checkpoint_path) -> Path:
    """The log's default path next to a checkpoint: ``run.ckpt`` -> ``run.ckpt.events.jsonl``."""
    p = Path(checkpoint_path)
    return p.with_name(p.name + ".events.jsonl")


def read(path) -> list[dict]:
    """Every record of a log (non-finite numbers back as floats)."""
    back = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append({k: back.get(v, v) if isinstance(v, str) else v for k, v in json.loads(line).items()})
    return out
