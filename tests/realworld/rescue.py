"""Each catalogue case trained by ``StabilityTrainer`` under each policy: rescued, or stopped
within ``max_bad_steps`` failing batches with the right diagnosis (never burn compute).

A run is *rescued* when it ends with finite weights and its last step applied; *stopped* when
it raises (``NonFiniteError``, or the user's own error with the diagnosis as a note). A stop
is *bounded* when no run of failing steps on finite data was longer than ``max_bad_steps``.
Anything else raised from the library is a *crash*.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from .registry import BY_NAME
from .results import builders

POLICIES = ("skip", "backoff", "rollback", "auto")
MAX_BAD = 3


@dataclass
class Outcome:
    kind: str  # "rescued", "stopped", "skipped-data", "crash", "unrescued" (ran on, not cured, not stopped)
    cause: str | None
    longest_streak: int
    detail: str = ""

    def ok(self, expected: str) -> bool:
        if self.kind == "rescued":
            return True
        if self.kind == "skipped-data":  # non-finite data: skipped with its rows listed, never blamed otherwise
            return expected == "dirty-data"
        return self.kind == "stopped" and self.cause == expected and self.longest_streak <= MAX_BAD


def _streak(history) -> int:
    """The longest run of bad steps (not committed) in a row; a rollback starts a new run
    (it restores other weights: ``max_rollbacks`` bounds how often)."""
    restarts = {e.step for e in history.events if e.action == "rolled-back"}
    longest = run = 0
    for step, committed in enumerate(np.asarray(history.committed, dtype=bool)):
        run = 0 if committed else run + 1
        longest = max(longest, run)
        if step in restarts:
            run = 0
    return longest


def _dirty_only(history) -> bool:
    """Every bad step had non-finite data (skipped and listed, as the policy promises)."""
    bad = [e for e in history.events if e.kind == "nonfinite"]
    return bool(bad) and all(e.action in ("skipped", "backed-off", "rolled-back") for e in bad)


def _data(s):
    """Arrays (rows known: a rollback can leave rows out) for one batch of plain tensors, else the batches."""
    steps = max(s.steps, 2 * MAX_BAD + 2)
    x, y = s.batches[0]
    as_np = lambda v: v.numpy() if hasattr(v, "numpy") else np.asarray(v)  # noqa: E731
    if len(s.batches) == 1 and not isinstance(x, dict) and len(as_np(x)) == len(as_np(y)):
        return dict(x=as_np(x), y=as_np(y), batch_size=len(as_np(y)), epochs=steps, shuffle=False)
    return dict(x=[s.batches[i % len(s.batches)] for i in range(steps)], epochs=1)


def _trainer(framework, s, policy):
    import stabilize

    loss = s.loss_fn if framework == "torch" else (lambda y_true, y_pred, f=s.loss_fn: f(y_pred, y_true))
    return stabilize.StabilityTrainer(s.model, loss, s.optimizer, on_nonfinite=policy, max_bad_steps=MAX_BAD,
                                      progress=False, snapshot_every=1)


@functools.lru_cache(maxsize=None)
def run(framework: str, name: str, policy: str) -> Outcome:
    import stabilize

    s = builders(framework)[name](False)
    t = _trainer(framework, s, policy)
    d = lambda: t.supervisor.diagnosis.cause if t.supervisor.diagnosis is not None else None  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            h = t.fit(**_data(s))
        except stabilize.NonFiniteError as exc:
            return Outcome("stopped", d(), _streak(exc.report), str(exc).splitlines()[0][:160])
        except ValueError as exc:
            if "every row has been left out" in str(exc):  # the data, named: a deliberate stop
                return Outcome("stopped", d(), _streak(t.history), str(exc)[:160])
            return Outcome("crash", None, 0, f"{type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # noqa: BLE001 - the user's error (a label out of range) or a library crash
            notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith("stabilize:")]
            if notes and d() is not None:
                return Outcome("stopped", d(), 0, notes[0][:160])
            return Outcome("crash", None, 0, f"{type(exc).__name__}: {exc}"[:300])
    finite = all(np.all(np.isfinite(np.asarray(w, dtype=np.float64))) for w in t.get_weights())
    committed = np.asarray(h.committed, dtype=bool)
    if finite and committed.any() and (committed[-1] or _dirty_only(h)):
        return Outcome("rescued", None, _streak(h))  # trained on; what failed was skipped (bad data: listed)
    if finite and d() == "dirty-data" and _dirty_only(h):
        return Outcome("skipped-data", d(), 0)
    return Outcome("unrescued", d(), _streak(h))


def expected(name: str) -> str:
    return BY_NAME[name].cause
