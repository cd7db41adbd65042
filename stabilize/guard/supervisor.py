"""The host side of a guarded step, written once for the trainer and both guards.

A framework adapter runs the step on the device and reads its statistics once
(a :class:`~stabilize.guard.stats.StepStats` record; ``committed`` is the
device's own decision, which the host reads and never re-derives, and
:func:`~stabilize.guard.stats.verdict` names what the step was). :meth:`Supervisor.observe` then records the
row, asks the policy what to do, and answers with a :class:`Decision`: restore
the last rollback snapshot, take a new one, or stop. Step numbers are global
(they count across ``fit`` calls and guard steps alike); epoch and batch labels
are what the adapter passes.

A loss scaler's own overflow skip (``scaler_skip``) is recorded as a
``"scaler"`` event and is not a training failure: the policy never hears of it.

The rate is handed out whole, as a :class:`Rate` (the back-off factor and its
``min_lr`` floor, and the spike lowering: after a rewind the rate is multiplied
by ``spike_lr_factor`` for the next ``spike_lr_steps`` applied steps; PaLM,
Chowdhery et al. 2022, sec. 5.1): every adapter applies it as given, on the
host (:meth:`Rate.apply`) or on the device (the same formula over its ops).
An adapter that replays a failing step before restoring a snapshot
(``replays``; :mod:`~stabilize.guard.replay`) gets ``Decision.replay``, and the
event reaches the JSON-lines log only once :meth:`Supervisor.replayed` has added
the verdict.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, NamedTuple

from ..distributed import is_main, unwrap
from ..errors import NonFiniteError, SkipAlarmError
from ..history import Event, History
from .policies import Policy
from .settings import GuardSettings
from ..eventlog import EventLog
from .spikes import SpikeDetector
from .stats import FIELDS, flag, nonfinite_parts, row, verdict

__all__ = ["STAT_FIELDS", "Decision", "Rate", "Supervisor"]

logger = logging.getLogger("stabilize")

STAT_FIELDS = FIELDS  # kept for callers: the fields of :class:`~stabilize.guard.stats.StepStats`


class Rate(NamedTuple):
    """The whole rate the next step uses, for a base rate the user's schedule gives.

    ``apply(base) = max(base * factor, min(floor, base)) * after``: ``factor`` is the
    back-off (``backoff_factor**k``), ``floor`` is ``min_lr`` (a schedule already below it
    is left as it is), ``after`` is ``spike_lr_factor`` while a rewind lowers the rate, else 1.
    With ``factor == after == 1`` it is ``base`` exactly.
    """

    factor: float = 1.0
    floor: float = 0.0
    after: float = 1.0

    def apply(self, base: float) -> float:
        if self.factor == 1.0 and self.after == 1.0:
            return base
        return max(base * self.factor, min(self.floor, base)) * self.after

    __call__ = apply  # a Rate is also the ``rate(base) -> lr`` callable the adapters take


_NO_SNAPSHOT = ("an update was applied before it could be checked (a native optimizer) and left non-finite "
                "weights, and on_nonfinite={!r} holds no snapshot to restore: pass on_nonfinite='rollback' (a "
                "snapshot every snapshot_every applied steps) or verify_updates=True (each update checked and "
                "undone exactly), or lower the learning rate")


class Decision(NamedTuple):
    """What the adapter must do after a step.

    Attributes:
        action: ``"applied"``, ``"clipped"`` (applied, a spike clipped), ``"skipped"``,
            ``"backed-off"``, ``"rolled-back"``, ``"raise"`` or ``"scaler-skip"``.
        restore: restore the last rollback snapshot now.
        snapshot: take a snapshot now (``keeps_snapshot``, every ``snapshot_every`` applied steps).
        stop: raise :class:`~stabilize.NonFiniteError` (``Supervisor.raise_for``).
        event: the event recorded for this step, if any.
        reason: what the user can do, added to the error when ``stop``.
        replay: replay the step before restoring, then call :meth:`Supervisor.replayed`.
    """

    action: str
    restore: bool = False
    snapshot: bool = False
    stop: bool = False
    event: Event | None = None
    replay: bool = False
    reason: str = ""


class Supervisor:
    """Policy, rows, events and rollback bookkeeping of one guarded run."""

    def __init__(self, settings: GuardSettings, *, replays: bool = False):
        """``replays``: the adapter replays a failing step before a restore (the trainer does;
        :mod:`~stabilize.guard.replay`), when ``settings.replay`` is ``"on"``."""
        self.settings = settings
        self.policy = Policy(settings)
        self.rows: list[dict] = []  # every step's statistics, global step = index
        self.events: list[Event] = []
        self.first_bad: int | None = None
        self.applied = 0
        self.diagnosis = None
        self.skip_rows: set[int] = set()
        self.skip_positions: set[tuple[int, int]] = set()
        self._streak: list[tuple] = []  # (position, rows, bad data) of the current run of bad steps
        self._snapshot_applied: int | None = None
        # Whether the adapter holds a snapshot: for ``rollback``, and for a native optimizer whose
        # update is applied before it can be checked (weights it breaks come back from the snapshot).
        self.keeps_snapshot = self.wants_snapshot
        self.spikes = SpikeDetector(settings) if settings.spike else None
        self._recent: collections.deque = collections.deque(maxlen=settings.skip_alarm_window)
        self.alarms = 0
        self.not_applied = 0  # steps not applied, for the progress line
        self.leave_out = 0  # batches a spike rewind still leaves out (spike="rewind")
        self.lowered = 0  # applied steps still run at spike_lr_factor after a rewind
        self.replays = replays and settings.replay == "on"
        self._pending: Event | None = None  # an event held back from the log until its replay's verdict
        self._ran_with = (0, 0)  # (back-offs, lowered) when the last observed step ran: its rate
        self.event_log = EventLog(settings.events_path) if settings.events_path else None
        self._announced: set[tuple[str, str]] = set()  # (kind, action) of the events already logged

    # -- what the adapter asks --------------------------------------------------
    @property
    def step(self) -> int:
        """The global index of the next step."""
        return len(self.rows)

    def rate(self) -> Rate:
        """The whole rate of the next step (back-off, floor, spike lowering), for the device."""
        return self._rate(self.policy.backoffs, self.lowered)

    def replay_rate(self) -> Rate:
        """The rate the last observed step ran with (its replay must use it, not the next one's)."""
        return self._rate(*self._ran_with)

    def lr(self, base: float) -> float:
        """The rate for the next step when the user's schedule gives ``base``: :meth:`rate` applied."""
        return self.rate().apply(base)

    def replay_lr(self, base: float) -> float:
        """The rate the last observed step ran with, for ``base``."""
        return self.replay_rate().apply(base)

    def _rate(self, backoffs: int, lowered: int) -> Rate:
        s = self.settings
        return Rate(s.backoff_factor**backoffs if backoffs else 1.0, s.min_lr,
                    s.spike_lr_factor if lowered > 0 else 1.0)

    @property
    def wants_snapshot(self) -> bool:
        """Whether a rollback snapshot is used (``on_nonfinite="rollback"`` or ``spike="rewind"``)."""
        return self.settings.on_nonfinite == "rollback" or self.settings.spike == "rewind"

    def snapshot_taken(self) -> None:
        self._snapshot_applied = self.applied

    def steps_since_snapshot(self) -> int | None:
        """Applied steps since the last snapshot (what restoring it loses)."""
        return None if self._snapshot_applied is None else self.applied - self._snapshot_applied

    def spike_limits(self) -> tuple[float, float] | None:
        """``(loss_max, norm_max)`` for the next step's device-side spike check; None when not watched."""
        return self.spikes.limits() if self.spikes is not None else None

    # -- one step ---------------------------------------------------------------
    def observe(self, stats: dict, *, epoch: int = 0, batch: int = 0, position: Any = None, rows=None,
                bad_data: bool = False, diagnose=None) -> Decision:
        """Record one step read from the device and decide what follows.

        ``bad_data``: the adapter found non-finite values in the batch itself
        (policy ``auto`` skips such a batch without backing off).

        ``diagnose``: called with no argument at the first non-finite step, before the policy
        decides, so that the cause decides (a cause no smaller rate cures stops a failure that
        every batch repeats; :mod:`~stabilize.guard.policies`). It calls :meth:`diagnose`.

        ``position`` names the batch for a rollback to leave out (default
        ``(epoch, batch)``); ``rows`` are its sample indices when known.
        """
        self._ran_with = (self.policy.backoffs, self.lowered)
        decision = self._decide(stats, epoch, batch, position, rows, bad_data, diagnose)
        held = decision.action not in ("applied", "clipped")
        self.not_applied += held
        self._recent.append(held)
        window = self.settings.skip_alarm_window
        if self.settings.skip_alarm != "off" and len(self._recent) == window and not decision.stop \
                and sum(self._recent) > self.settings.skip_alarm_fraction * window:
            self.alarms += 1
            message = (f"stabilize: {sum(self._recent)} of the last {window} steps were not applied (alarm at "
                       f"{self.settings.skip_alarm_fraction:.0%}): the run is not training; "
                       f"{self.history().report() if self.settings.skip_alarm == 'raise' else 'see guard.history'}")
            self._recent.clear()
            if self.settings.skip_alarm == "raise":
                raise SkipAlarmError(message)
            if is_main():
                logger.warning(message)
        return decision

    def _decide(self, stats, epoch, batch, position, rows, bad_data, diagnose=None) -> Decision:
        step = self.step
        stats = dict(row(stats), step=step, epoch=epoch, batch=batch)
        self.rows.append(stats)
        kind = verdict(stats)  # the one verdict; ``committed`` is the device's own
        broken = flag(stats["weights_broken"])
        bad = list(nonfinite_parts(stats))
        committed = flag(stats["committed"])
        if bad and self.first_bad is None:
            self.first_bad = step
        if kind == "scaler-skip":
            event = self._event(stats, "scaler", bad, "scaler-skip")
            return Decision("scaler-skip", event=event)
        spike = kind == "spike"
        if spike and not committed:  # spike="skip": held back on the device
            self.spikes.spikes += 1
            if self.settings.spike == "rewind":  # PaLM: back to the last snapshot, then leave batches out
                self.leave_out = self.settings.spike_skip_batches
                self.lowered = self.settings.spike_lr_steps
                event = self._event(stats, "spike", (), "rewound", steps_lost=self.steps_since_snapshot(),
                                    log=not self.replays)
                return Decision("rolled-back", restore=True, event=event, replay=self.replays)
            return Decision("skipped", event=self._event(stats, "spike", (), "skipped"))
        if committed and kind in ("committed", "spike"):
            self._streak.clear()
            self.applied += 1
            self.lowered = max(self.lowered - 1, 0)
            if self.spikes is not None:
                if spike:  # spike="clip": applied with the norm clipped to the limit (ZClip)
                    self.spikes.spikes += 1
                    self._event(stats, "spike", (), "clipped")
                norm_max = stats["norm_max"] if not math.isnan(stats["norm_max"]) else math.inf
                self.spikes.update(stats["loss"], min(stats["grad_norm"], norm_max))
            grew = self.policy.on_good()
            event = self._event(stats, "lr-growth", (), grew) if grew else None
            snap = self.keeps_snapshot and self.applied % self.settings.snapshot_every == 0
            return Decision("clipped" if spike else "applied", snapshot=snap, event=event)
        self._streak.append(((epoch, batch) if position is None else position, rows, bad_data))
        if diagnose is not None and self.diagnosis is None and any(p in bad for p in ("loss", "gradients", "weights")):
            diagnose()  # before the policy: the cause decides
        cause = self.diagnosis.cause if self.diagnosis is not None else None
        action = self.policy.on_bad(bad_data, cause, at_weights="loss" in bad or "gradients" in bad)
        if broken and self.settings.guarded:
            # An earlier update (a native optimizer's, applied before it could be checked) left
            # non-finite weights: they cannot be un-updated, so the last snapshot comes back,
            # and the event says how many applied steps that loses. No snapshot is held under a
            # policy that never rolls back (:mod:`~stabilize.guard.snapshots`): stop, and say so.
            held = self.keeps_snapshot
            shown = "raised" if action == "raise" or not held else "rolled-back"
            event = self._event(stats, "nonfinite", bad, shown, steps_lost=self.steps_since_snapshot() if held else None)
            self._streak.clear()
            if not held:
                return Decision("raise", stop=True, event=event, reason=_NO_SNAPSHOT.format(self.settings.on_nonfinite))
            return Decision("raise", stop=True, event=event) if action == "raise" else \
                Decision("rolled-back", restore=True, event=event)
        if committed:  # "ignore": the device applied it
            self.applied += 1
        kind = "nonfinite" if bad else "large-update"
        if bad_data:
            stats["bad_data"] = 1.0
        replay = self.replays and action == "rolled-back"
        event = self._event(stats, kind, bad, "raised" if action == "raise" else action, log=not replay)
        if action == "rolled-back":
            for pos, idx, dirty in self._streak:
                if not dirty:  # the data were finite: nothing in them to leave out
                    continue
                if idx is None:
                    self.skip_positions.add(pos)
                else:
                    self.skip_rows.update(int(i) for i in idx)
            self._streak.clear()
            return Decision(action, restore=True, event=event, replay=replay)
        reason = ""
        if action == "raise" and not bad_data and self.policy.burning(cause):
            n = self.policy.stuck
            reason = (f"the step failed on {n} batches in a row whose data are finite: {self.settings.on_nonfinite!r} "
                      f"cannot cure a failure every batch repeats" + (f" (cause {cause}: "
                      f"{self.diagnosis.advice.split(';')[0]})" if self.diagnosis is not None else ""))
        return Decision(action, stop=action == "raise", event=event, reason=reason)

    def left_out_whole(self, *, epoch: int, batch: int) -> None:
        """Record that a rollback leaves the failing batch out whole: the model's batch is not a set of
        independent rows (it declares ``rows_independent = False``, or its forward fails without a row)."""
        nan = float("nan")
        self._record(Event(self.step - 1, batch, epoch, "left-out", (), "whole-batch", nan, nan, nan))

    def replayed(self, verdict: str | None) -> Event | None:
        """Add a replay's verdict (``"transient"``, ``"reproducible"``, None: no verdict) to the
        event held back by a ``Decision.replay``, and log it; returns the event as recorded."""
        event, self._pending = self._pending, None
        if event is None:
            return None
        if verdict is not None:
            index = next(i for i in range(len(self.events) - 1, -1, -1) if self.events[i] is event)
            event = self.events[index] = dataclasses.replace(event, replay=verdict)
        if self.event_log is not None:
            self.event_log.append(event)
        return event

    def leaves_out(self, *, epoch: int = 0, batch: int = 0) -> bool:
        """Whether the adapter must leave this batch out (a rewind's next batches); recorded as an event."""
        if self.leave_out <= 0:
            return False
        self.leave_out -= 1
        nan = float("nan")
        self._record(Event(self.step, batch, epoch, "left-out", (), "skipped", nan, nan, nan))
        return True

    def diagnose(self, B, model, loss_fn, x, y, params, *, pending: dict | None = None, optimizer=None):
        """Replay the last failed step from the current weights and keep the diagnosis.

        The model must hold the step's pre-step weights. ``pending`` is the
        statistics of a step not yet recorded (diagnosed before an unguarded
        update is applied, so that no weights need copying). A diagnosis that
        fails itself is logged, never raised: it must not take the run down.
        """
        import numpy as np

        from ..diagnose import diagnose

        model = unwrap(model)
        if model is None:  # sharded parameters: a rank-local replay would start a collective
            return None
        rows = self.rows if pending is None else self.rows + [dict(pending, step=self.step)]
        row = rows[-1]
        col = lambda k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)
        try:
            weights = [np.asarray(B.to_numpy(p), dtype=np.float64) for p in params]
            wnorm = float(np.sqrt(sum(float(np.sum(w * w)) for w in weights)))
            self.diagnosis = diagnose(B, model, loss_fn, x, y, step=row["step"], batch_index=row.get("batch", 0),
                                      lr=row.get("lr", np.nan), losses=col("loss"),
                                      grad_norms=col("grad_norm"), weights_norm=wnorm,
                                      optimizer=optimizer)
        except Exception as exc:  # noqa: BLE001 - reported, and training goes on
            if is_main():
                logger.warning("stabilize: the diagnosis of step %d failed (%s: %s); the step was still handled",
                               row["step"], type(exc).__name__, exc)
            return None
        if is_main():  # every rank records; only rank 0 prints
            logger.warning(self.diagnosis.line())
        return self.diagnosis

    def explain(self, exc, B, model, loss_fn, x, y, params, *, lr: float = float("nan"), optimizer=None):
        """The user's forward or loss raised (a label or id out of range raises on the CPU): replay the
        batch and add the diagnosis to the exception as a note. The run's first diagnosis is kept."""
        first, self.diagnosis = self.diagnosis, None
        nan = float("nan")
        d = self.diagnose(B, model, loss_fn, x, y, params, optimizer=optimizer,
                          pending={"loss": nan, "grad_norm": nan, "lr": lr})
        self.diagnosis = first if first is not None else d
        if d is not None and not any(str(n).startswith("stabilize:") for n in getattr(exc, "__notes__", ())):
            exc.add_note(f"stabilize: {d.line()}")
        return d

    def raise_for(self, decision: Decision, history: History | None = None) -> None:
        """Raise :class:`NonFiniteError` with the run's report (call when ``decision.stop``)."""
        history = history or self.history()
        reason = f"\n{decision.reason}" if decision.reason else ""
        raise NonFiniteError(f"training stopped: {decision.event}{reason}\n{history.report()}", history)

    def history(self, start: int = 0) -> History:
        """The record from global step ``start`` on (a ``fit`` passes the step it began at)."""
        first = self.first_bad if self.first_bad is not None and self.first_bad >= start else None
        events = [e for e in self.events if e.step >= start]
        return History.from_rows(self.rows[start:], events, first, self.diagnosis)

    # -- counters (part of the training state) ------------------------------------
    def state_dict(self) -> dict:
        """Counters, every step's row, the events and what was left out: plain values, for a checkpoint."""
        rows = [{k: (float(v) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows]
        return {"policy": self.policy.state_dict(), "applied": self.applied, "steps": self.step,
                "first_bad": self.first_bad, "skip_rows": sorted(self.skip_rows),
                "skip_positions": sorted(self.skip_positions), "rows": rows,
                "events": [dataclasses.asdict(e) for e in self.events], "snapshot_applied": self._snapshot_applied,
                "spikes": self.spikes.state_dict() if self.spikes is not None else None,
                "recent": [bool(b) for b in self._recent], "alarms": self.alarms, "not_applied": self.not_applied,
                "leave_out": self.leave_out, "lowered": self.lowered}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.applied, self.first_bad = int(state["applied"]), state["first_bad"]
        self.skip_rows = set(int(i) for i in state["skip_rows"])
        self.skip_positions = {tuple(p) for p in state["skip_positions"]}
        self.rows = [dict(r) for r in state["rows"]]
        self.events = [Event(**dict(e, nonfinite=tuple(e["nonfinite"]))) for e in state["events"]]
        self._snapshot_applied = state["snapshot_applied"]
        self._streak.clear()
        if self.spikes is not None and state["spikes"] is not None:
            self.spikes.load_state_dict(state["spikes"])
        self._recent.clear()
        self._recent.extend(state["recent"])
        self.alarms, self.not_applied = int(state["alarms"]), int(state["not_applied"])
        self.leave_out = int(state.get("leave_out", 0))
        self.lowered = int(state.get("lowered", 0))
        self._pending = None

    def _announce(self, event: Event) -> None:
        """Log the first event of each kind and action, so that no guard skips a step unseen (with or
        without a diagnosis); the repeats are counted in the history, not logged."""
        key = (event.kind, event.action)
        if key in self._announced or event.action in ("applied", "clipped") or event.kind == "scaler":
            return
        self._announced.add(key)
        if is_main():
            logger.warning("stabilize: %s (further '%s -> %s' events: see the history, not logged)", event,
                           event.kind, event.action)

    def _event(self, stats, kind, bad, action, steps_lost=None, log=True) -> Event:
        event = Event(stats.get("step", self.step), stats.get("batch", 0), stats.get("epoch", 0), kind,
                      tuple(bad), action, stats.get("lr", float("nan")), stats["loss"], stats["grad_norm"],
                      steps_lost=steps_lost)
        self._record(event, log)
        return event

    def _record(self, event: Event, log: bool = True) -> None:
        self.events.append(event)
        self._announce(event)
        if not log:  # logged by ``replayed``, with the verdict
            self._pending = event
        elif self.event_log is not None:
            self.event_log.append(event)
