"""What to do about a bad step: the host-side policy, shared by every loop.

The guarded step has already refused to commit a bad update (the device formed
that decision); the policy decides what happens next:

* ``"raise"``: stop with a report.
* ``"skip"``: nothing more; the training state is as before the step.
* ``"backoff"``: skip, and scale the rate by ``factor**k`` where ``k`` counts
  back-offs (never below ``min_lr``); after ``grow_after`` clean steps in a
  row, ``k`` drops by one, never below 0. The factor multiplies whatever rate
  the user's schedule gives: the schedule is never overwritten.
* ``"rollback"``: skip; after ``max_bad_steps`` bad steps in a row, restore the
  last good snapshot (the whole training state), back off once, and leave out
  the data implicated; after ``max_rollbacks`` rollbacks, raise.
* ``"auto"``: the reaction follows the cause. Bad data (non-finite inputs
  or targets in the batch): skip, and list the rows, with no back-off.
  Instability (an overflow with finite data): back off. A failure that
  recurs on ``max_bad_steps`` batches in a row with finite data (a singular
  op that every batch hits) is not cured by a smaller rate: stop, with the
  diagnosis, instead of skipping forever.
* ``"ignore"``: commit every update, bad or not: the unguarded loop, for
  reproducing a failure.

Never burn compute (every policy but ``ignore`` and ``raise``): a failure that
recurs on ``max_bad_steps`` consecutive batches whose data are finite stops the
run, with the diagnosis, when no smaller rate can cure it:

* the loss or the gradients are non-finite at the current weights (``at_weights``):
  the next step starts from the same weights, so a smaller rate changes nothing;
  skipping, backing off or ``auto`` stop (``rollback`` restores other weights: it
  rolls back, up to ``max_rollbacks``);
* the diagnosis names a cause that is not a rate (``RATE_CAUSES``: a singular
  op, a masked softmax, an infeasible CTC target...): every policy stops, and
  ``auto`` skips meanwhile instead of backing off, so the rate is never lowered
  for nothing;
* ``skip``: any failure (skipping cures nothing that every batch repeats).

Only updates that overflow from finite gradients (a rate problem) may back off
for longer: up to ``RATE_PATIENCE * max_bad_steps`` batches in a row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .settings import GuardSettings

__all__ = ["Policy", "RATE_PATIENCE"]

_SATURATE = 2**31 - 1
RATE_PATIENCE = 10  # a rate cause: 10 * max_bad_steps failing batches in a row (0.5**30 ~ 1e-9 of the rate)


def _rate_cause(cause: str | None) -> bool:
    from ..diagnosis.rules import RATE_CAUSES

    return cause is None or cause in RATE_CAUSES


@dataclass
class Policy:
    """The policy's mutable state: back-off exponent, streaks, rollbacks."""

    settings: GuardSettings
    backoffs: int = 0
    clean_streak: int = 0
    bad_streak: int = 0
    rollbacks: int = 0
    stuck: int = 0  # bad steps in a row whose data were finite
    stuck_at_weights: int = 0  # of those, the ones whose loss or gradients were non-finite

    @property
    def factor(self) -> float:
        """The back-off factor ``backoff_factor**k`` (1.0 when not backed off)."""
        return self.settings.backoff_factor**self.backoffs

    def lr(self, base: float, backoffs: int | None = None) -> float:
        """The rate to use when the schedule gives ``base``: ``max(base * factor, min_lr)``,
        except that a schedule already below ``min_lr`` is left as it is. ``backoffs``: the
        exponent to use instead of the current one (a replay runs at the rate its step had)."""
        k = self.backoffs if backoffs is None else backoffs
        if not k:
            return base
        return max(base * self.settings.backoff_factor**k, min(self.settings.min_lr, base))

    def on_good(self) -> str | None:
        """A committed step; returns ``"grew-lr"`` when a back-off is undone."""
        self.bad_streak = self.stuck = self.stuck_at_weights = 0
        self.clean_streak = min(self.clean_streak + 1, _SATURATE)
        grow = self.settings.grow_after
        if self.settings.on_nonfinite in ("backoff", "rollback", "auto") and grow and self.backoffs and self.clean_streak >= grow:
            self.backoffs -= 1
            self.clean_streak = 0
            return "grew-lr"
        return None

    def on_bad(self, bad_data: bool = False, cause: str | None = None, at_weights: bool = False) -> str:
        """Return the action: ``raise``, ``skipped``, ``backed-off``, ``rolled-back`` or ``applied``.

        ``bad_data``: the batch itself holds non-finite values (used by ``auto``).
        ``cause``: the diagnosis of the run's failure, when one was made; ``at_weights``: the loss or
        the gradients were non-finite (not only the update). See the module docstring.
        """
        self.clean_streak = 0
        mode = self.settings.on_nonfinite
        self.stuck = 0 if bad_data else min(self.stuck + 1, _SATURATE)
        self.stuck_at_weights = min(self.stuck_at_weights + 1, _SATURATE) if at_weights and not bad_data else 0
        if mode == "auto" and bad_data:  # the data, not the training: nothing to back off from
            return "skipped"
        self.bad_streak = min(self.bad_streak + 1, _SATURATE)
        if mode == "ignore":
            return "applied"
        if mode == "raise" or self.burning(cause):
            return "raise"
        if mode == "auto":
            if not _rate_cause(cause):  # a smaller rate cures nothing: skip until it proves to recur
                return "skipped"
            if self.bad_streak >= self.settings.max_bad_steps:
                return "raise"
            self.backoffs = min(self.backoffs + 1, _SATURATE)
            return "backed-off"
        if mode == "skip":
            return "skipped"
        if mode == "backoff":
            self.backoffs = min(self.backoffs + 1, _SATURATE)
            return "backed-off"
        # rollback
        if self.bad_streak < self.settings.max_bad_steps:
            return "skipped"
        if self.rollbacks >= self.settings.max_rollbacks:
            return "raise"
        self.rollbacks += 1
        self.bad_streak = 0
        self.backoffs = min(self.backoffs + 1, _SATURATE)
        return "rolled-back"

    def burning(self, cause: str | None) -> bool:
        """Whether the failing batches in a row with finite data are enough to stop (module docstring)."""
        n, mode = self.settings.max_bad_steps, self.settings.on_nonfinite
        if self.stuck >= n and (mode == "skip" or not _rate_cause(cause)):
            return True
        if mode == "rollback":
            return False  # a rollback restores other weights: bounded by max_rollbacks
        return self.stuck_at_weights >= n or self.stuck >= RATE_PATIENCE * n

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "settings"}

    def load_state_dict(self, state: dict) -> None:
        for key in ("backoffs", "clean_streak", "bad_streak", "rollbacks"):
            setattr(self, key, int(state[key]))
        self.stuck = int(state.get("stuck", 0))
        self.stuck_at_weights = int(state.get("stuck_at_weights", 0))
