"""What the framework callbacks (Lightning, Hugging Face) share: settings checked up front, the
guard built over the framework's model and optimizer, the scheduler held back on a step that was
not applied, and the per-step metrics written to the framework's logger.

Both callbacks run the one guarded torch step (:class:`~stabilize.integrations.torch_guard.TorchGuard`
with ``backward=False``) inside the hook the framework calls just before its own
``optimizer.step()``, then leave every ``.grad`` as None: the framework's step that follows moves
nothing (every ``torch.optim`` optimizer skips a parameter whose gradient is None; Adam's step
count included). A step the guard did not apply must not advance the learning-rate schedule
either; each framework steps its scheduler itself, so the adapter puts the scheduler back
(:class:`SchedulerHold`) or tells the framework the step was skipped.
"""

from __future__ import annotations

from ..guard.settings import GuardSettings

__all__ = ["check_settings", "SchedulerHold", "step_metrics"]

# Settings the callbacks pass to TorchGuard itself rather than to GuardSettings.
GUARD_ARGS = ("verify_updates", "restore_rng", "loss_fn")


def check_settings(where: str, settings: dict) -> dict:
    """Validate ``settings`` now, with TorchGuard's messages (the guard itself is built when training
    starts, once the framework has made the optimizer); returns them unchanged."""
    GuardSettings(**{k: v for k, v in settings.items() if k not in GUARD_ARGS})
    if settings.get("spike") == "rewind":
        raise ValueError(f"spike='rewind' leaves batches out, which needs StabilityTrainer's data loop; "
                         f"use spike='skip' or 'clip' with {where}")
    if settings.get("sync_free"):
        raise ValueError(f"{where} decides on the host before the framework's optimizer step; sync_free is "
                         f"for TorchGuard in a hand-written loop")
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


def step_metrics(guard, applied: bool) -> dict[str, float]:
    """The last step's numbers and the run's counters, keyed ``stabilize/...`` for a framework logger.

    ``loss``, ``grad_norm`` and ``lr`` are the step's (the loss summed over micro-batches, the
    norm before clipping, the rate the update used); ``applied`` is 1.0 or 0.0; ``skipped``
    counts the steps not applied so far, ``spikes`` the spikes seen, ``backoffs`` the current
    back-off level, ``events`` every event recorded (the JSON-lines ``events_path`` keeps them).
    """
    sup = guard.supervisor
    row = sup.rows[-1] if sup.rows else {}
    return {"stabilize/loss": float(row.get("loss", float("nan"))),
            "stabilize/grad_norm": float(row.get("grad_norm", float("nan"))),
            "stabilize/lr": float(row.get("lr", float("nan"))),
            "stabilize/applied": float(applied),
            "stabilize/skipped": float(sup.not_applied),
            "stabilize/spikes": float(sup.spikes.spikes if sup.spikes is not None else 0),
            "stabilize/backoffs": float(sup.policy.backoffs),
            "stabilize/events": float(len(sup.events))}
