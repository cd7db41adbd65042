"""The host glue between a guarded step and the :class:`~stabilize.guard.supervisor.Supervisor`, written once.

Every entry point (``StabilityTrainer``, ``TorchGuard`` in both modes, the
``keras_guard`` callback) runs its step on the device and hands the statistics
here. What follows is the same for all of them, and lives only here:

1. **the broken-weights probe**: a step that failed with a non-finite value,
   under an optimizer whose update is applied before it can be checked (a
   native one), asks once whether an *earlier* update left the weights
   non-finite (``weights_broken``): they cannot be un-updated, so the last
   snapshot must come back (or the run stops, saying so);
2. **bad data**: only for a failed step, whether the batch itself holds
   non-finite values (policy ``auto`` skips such a batch without backing off);
   the adapter says how it knows (a host check, or the device's ``data_finite``);
3. **observe and decide**: :meth:`Supervisor.observe`;
4. **when to diagnose**: a non-finite step (never a finite spike, a clip or a
   large update, never a loss scaler's own skip), the first one, when the
   adapter can replay it (:func:`wants_diagnosis`);
5. **replay, restore and snapshot**: a rewind or rollback replays the failing
   step first when the adapter can (:mod:`~stabilize.guard.replay`), then
   restores; a snapshot is never taken of weights a native update broke;
6. **stop**: :meth:`Supervisor.raise_for`.

An adapter keeps only what is its own: how a batch gets in, and how the
framework is called.

Example:
    >>> from stabilize.guard.settings import GuardSettings
    >>> from stabilize.guard.supervisor import Supervisor
    >>> sup = Supervisor(GuardSettings())
    >>> d = HostDriver(sup, snapshots=None)
    >>> decision = d.judge({"loss": 1.0, "grad_norm": 1.0, "committed": 1.0})
    >>> decision.action, d.follow(decision)
    ('applied', None)
"""

from __future__ import annotations

from typing import Any, Callable

from .stats import flag, nonfinite_parts, verdict
from .supervisor import Decision, Supervisor

__all__ = ["HostDriver", "wants_diagnosis"]


def wants_diagnosis(stats: dict, decision: Decision, supervisor: Supervisor) -> bool:
    """Whether this step is the one to diagnose: a non-finite step (the verdict says so, a loss
    scaler's own skip excluded), and no diagnosis yet (the first one only)."""
    return supervisor.diagnosis is None and decision.action != "scaler-skip" and verdict(stats) == "nonfinite" \
        and bool(nonfinite_parts(stats))


class HostDriver:
    """What every entry point does around one guarded step, on the host.

    Args:
        supervisor: the run's :class:`Supervisor`.
        snapshots: its :class:`~stabilize.guard.snapshots.SnapshotStore` (None: the adapter holds none).
        weights_finite: ``() -> bool``, one read of whether every parameter is finite (reduced
            across ranks when distributed); needed by the probe and the snapshot rule.
        native: updates are applied before they can be checked (torch.optim, Keras): the probe runs.
        verifies: each update was checked after it was made (``verify_updates``): snapshots
            need no weights check.
    """

    def __init__(self, supervisor: Supervisor, snapshots=None, *, weights_finite: Callable[[], bool] | None = None,
                 native: bool = True, verifies: bool = False):
        self.supervisor, self.snapshots = supervisor, snapshots
        self.weights_finite = weights_finite
        self.native, self.verifies = native, verifies

    # -- before the first step ------------------------------------------------------------
    def start(self) -> None:
        """Take the first rollback snapshot when the policy keeps one and none is held."""
        if self.supervisor.keeps_snapshot and self.snapshots is not None and not self.snapshots.held:
            self.take_snapshot()

    def take_snapshot(self) -> None:
        self.snapshots.take()
        self.supervisor.snapshot_taken()

    # -- one step -----------------------------------------------------------------------
    def probe(self, stats: dict) -> dict:
        """Set ``weights_broken`` when a failed non-finite step finds the weights already non-finite."""
        if self.native and self.weights_finite is not None and not flag(stats.get("committed")) \
                and verdict(stats) == "nonfinite" and not self.weights_finite():
            stats["weights_broken"] = 1.0
        return stats

    def judge(self, stats: dict, *, bad_data: bool | Callable[[], bool] = False, epoch: int = 0,
              batch: int | None = None, position: Any = None, rows=None, diagnose=None) -> Decision:
        """Probe, find bad data (only for a failed step), and let the supervisor decide.

        ``bad_data``: a flag, or ``() -> bool`` (or ``(bool, rows)``: the rows at fault, for a
        rollback to leave out) called only for a failed step (not committed, or not clean).
        ``batch`` defaults to the global step (the guards have no batch index of their own).
        ``diagnose``: ``() -> None``, replays the first non-finite step before the policy decides
        (the cause decides: :mod:`~stabilize.guard.policies`).
        """
        sup = self.supervisor
        self.probe(stats)
        found = False
        if not flag(stats.get("committed")) or verdict(stats) != "committed":
            found = bad_data() if callable(bad_data) else bad_data
            if isinstance(found, tuple):
                found, rows = found
            found = bool(found)
        return sup.observe(stats, epoch=epoch, batch=sup.step if batch is None else batch, position=position,
                           rows=rows, bad_data=found, diagnose=diagnose)

    def follow(self, decision: Decision, *, replay: Callable[[], Any] | None = None,
               before_stop: Callable[[], None] | None = None) -> None:
        """Replay and restore, or take a snapshot; then stop when the decision says so.

        ``replay``: called before a restore that asks for one (``Decision.replay``);
        ``before_stop``: what the adapter tidies before the error is raised.
        """
        sup = self.supervisor
        if decision.restore:
            if decision.replay and replay is not None:
                replay()
            if self.snapshots is not None:
                self.snapshots.restore()
        elif decision.snapshot and self.snapshots is not None and self._may_keep():
            self.take_snapshot()  # never keep weights a native update broke
        if decision.stop:
            if before_stop is not None:
                before_stop()
            sup.raise_for(decision, sup.history())

    def _may_keep(self) -> bool:
        return not self.native or self.verifies or self.weights_finite is None or self.weights_finite()
