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

Counters saturate instead of overflowing. They are part of the training state
(saved with a checkpoint), but a rollback does not rewind them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .settings import GuardSettings

__all__ = ["Policy"]

_SATURATE = 2**31 - 1


@dataclass
class Policy:
    """The policy's mutable state: back-off exponent, streaks, rollbacks."""

    settings: GuardSettings
    backoffs: int = 0
    clean_streak: int = 0
    bad_streak: int = 0
    rollbacks: int = 0

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
        self.bad_streak = 0
        self.clean_streak = min(self.clean_streak + 1, _SATURATE)
        grow = self.settings.grow_after
        if self.settings.on_nonfinite in ("backoff", "rollback", "auto") and grow and self.backoffs and self.clean_streak >= grow:
            self.backoffs -= 1
            self.clean_streak = 0
            return "grew-lr"
        return None

    def on_bad(self, bad_data: bool = False) -> str:
        """Return the action: ``raise``, ``skipped``, ``backed-off``, ``rolled-back`` or ``applied``.

        ``bad_data``: the batch itself holds non-finite values (used by ``auto``).
        """
        self.clean_streak = 0
        mode = self.settings.on_nonfinite
        if mode == "auto":
            if bad_data:  # the data, not the training: nothing to back off from
                return "skipped"
            self.bad_streak = min(self.bad_streak + 1, _SATURATE)
            if self.bad_streak >= self.settings.max_bad_steps:
                return "raise"
            self.backoffs = min(self.backoffs + 1, _SATURATE)
            return "backed-off"
        self.bad_streak = min(self.bad_streak + 1, _SATURATE)
        if mode == "ignore":
            return "applied"
        if mode == "raise":
            return "raise"
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

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "settings"}

    def load_state_dict(self, state: dict) -> None:
        for key in ("backoffs", "clean_streak", "bad_streak", "rollbacks"):
            setattr(self, key, int(state[key]))
