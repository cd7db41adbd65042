"""What the framework callbacks (Lightning, Hugging Face) share: settings checked up front, the
guard built over the framework's model and optimizer, the scheduler held back on a step that was
not applied (the per-step metrics are :func:`stabilize.tensorboard.step_metrics`).

Both callbacks run the one guarded torch step (:class:`~stabilize.integrations.torch_guard.TorchGuard`
with ``backward=False``) inside the hook the framework calls just before its own
``optimizer.step()``, then leave every ``.grad`` as None: the framework's step that follows moves
nothing (every ``torch.optim`` optimizer skips a parameter whose gradient is None; Adam's step
count included). A step the guard did not apply must not advance the learning-rate schedule
either; each framework steps its scheduler itself, so the adapter puts the scheduler back
(:class:`SchedulerHold`) or tells the framework the step was skipped.
"""

from __future__ import annotations

__all__ = ["check_settings", "SchedulerHold"]

# Settings the callbacks pass to TorchGuard itself rather than to GuardSettings.
GUARD_ARGS = ("verify_updates", "restore_rng")


def check_settings(where: str, settings: dict) -> dict:
    """Validate ``settings`` now, as TorchGuard does, with its messages (the guard itself is built when
    training starts, once the framework has made the optimizer); returns them unchanged."""
    from .torch_guard import guard_settings

    if "loss_fn" in settings:
        raise ValueError(f"{where} takes no loss_fn: the framework owns the forward pass, so a failing step is not "
                         f"replayed for a diagnosis; use TorchGuard(model, optimizer, loss_fn=...) in a hand-written loop")
    if settings.get("sync_free"):
        raise ValueError(f"{where} decides on the host before the framework's optimizer step; sync_free is "
                         f"for TorchGuard in a hand-written loop")
    given = {k: v for k, v in settings.items() if k not in GUARD_ARGS}
    guard_settings(where, given, verify_updates=settings.get("verify_updates", False), own=GUARD_ARGS)
    return settings


class SchedulerHold:
    """Learning-rate schedulers kept in step with the guard where the framework steps them itself.

    The framework steps its schedulers after its optimizer step, applied or not. Around each guarded
    step: :meth:`before_step` (nothing stepped yet), :meth:`after_step` (the guard decided), then,
    once the framework has stepped its schedulers, :meth:`after_framework`: a step not applied gets
    the schedulers' state and the rates back as they were before it; a rollback gets them as they
    were when the restored snapshot was taken (the guard's snapshot is taken inside its step, before
    the framework's scheduler step, so the schedulers' state is recorded here, after it).
    """

    def __init__(self, schedulers, optimizer):
        self.schedulers = [s for s in schedulers if s is not None and hasattr(s, "state_dict")]
        self.optimizer = optimizer
        self._before = self._at_snapshot = None
        self._put_back = self._rolled_back = self._refresh = False

    def _state(self):
        return [s.state_dict() for s in self.schedulers], [g["lr"] for g in self.optimizer.param_groups]

    def _load(self, saved) -> None:
        states, lrs = saved
        for s, state in zip(self.schedulers, states):
            s.load_state_dict(state)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def before_step(self, guard) -> None:
        self._before = self._state()
        if guard.supervisor.keeps_snapshot and not guard._snapshots.held:
            self._at_snapshot = self._before  # the guard takes its first snapshot in this step, before any update

    def after_step(self, guard, applied: bool) -> None:
        sup = guard.supervisor
        last = sup.events[-1] if sup.events else None
        self._rolled_back = last is not None and last.step == sup.step - 1 and last.action in ("rolled-back", "rewound")
        self._put_back = not applied
        self._refresh = applied and sup.keeps_snapshot and sup.steps_since_snapshot() == 0

    def after_framework(self) -> None:
        if self._rolled_back and self._at_snapshot is not None:
            self._load(self._at_snapshot)
        elif self._put_back and self._before is not None:
            self._load(self._before)
        if self._refresh:
            self._at_snapshot = self._state()
        self._before, self._put_back, self._rolled_back, self._refresh = None, False, False, False
