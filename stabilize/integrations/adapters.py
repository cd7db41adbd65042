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
GUARD_ARGS = ("verify_updates", "restore_rng", "loss_fn")


def check_settings(where: str, settings: dict) -> dict:
    """Validate ``settings`` now, as TorchGuard does, with its messages (the guard itself is built when
    training starts, once the framework has made the optimizer); returns them unchanged."""
    from .torch_guard import guard_settings

    if settings.get("sync_free"):
        raise ValueError(f"{where} decides on the host before the framework's optimizer step; sync_free is "
                         f"for TorchGuard in a hand-written loop")
    given = {k: v for k, v in settings.items() if k not in GUARD_ARGS}
    guard_settings(where, given, verify_updates=settings.get("verify_updates", False), own=GUARD_ARGS)
    return settings


class SchedulerHold:
    """The state of learning-rate schedulers and their optimizer's rates, put back after the framework
    has stepped them for an optimizer step that was not applied."""

    def __init__(self, schedulers, optimizer):
        self.schedulers = [s for s in schedulers if s is not None and hasattr(s, "state_dict")]
        self.optimizer = optimizer
        self._held = None

    def hold(self) -> None:
        """Remember the schedulers and rates as they are now (before the framework steps them)."""
        self._held = ([s.state_dict() for s in self.schedulers], [g["lr"] for g in self.optimizer.param_groups])

    def put_back(self) -> bool:
        """Put back what :meth:`hold` saw, once; returns whether anything was held."""
        if self._held is None:
            return False
        states, lrs = self._held
        self._held = None
        for s, state in zip(self.schedulers, states):
            s.load_state_dict(state)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        return True
