"""What to do about a bad step: the host-side policy, shared by every loop.

The guarded step (``stabilize.step``) has already refused to commit a bad
update; the policy decides what happens next, from the step's flags alone:

* ``"raise"``: stop with a report.
* ``"skip"``: nothing more; weights, optimizer state and schedule are as before.
* ``"backoff"``: skip, and set ``lr = max(lr0 * factor**k, min_lr)`` where ``k``
  counts back-offs; after ``grow_after`` clean steps in a row, ``k`` drops by
  one (the rate grows back by ``1/factor``), never below 0.
* ``"rollback"``: skip; after ``max_bad_steps`` bad steps in a row, restore the
  last good snapshot (weights, optimizer, schedule), back off once, and skip the
  batches implicated; after ``max_rollbacks`` rollbacks, raise.
* ``"ignore"``: commit every update, bad or not: the unguarded loop, for
  reproducing a failure.

Counters saturate instead of overflowing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["POLICIES", "PolicyConfig", "Policy", "verdict"]

POLICIES = ("raise", "skip", "backoff", "rollback", "ignore")
_SATURATE = 2**31 - 1


_CHECKS = (("loss", "loss_finite"), ("gradients", "grads_finite"), ("weights", "weights_finite"))


def verdict(stats: dict, max_update_ratio: float | None) -> tuple[list[str], bool]:
    """What was wrong with a step: the non-finite parts, and whether its update was too large."""
    bad = [name for name, key in _CHECKS if stats.get(key, 1.0) != 1.0]
    large = max_update_ratio is not None and not stats["update_ratio"] <= max_update_ratio
    return bad, large


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of the non-finite policy (see the module docstring)."""

    on_nonfinite: str = "skip"
    backoff_factor: float = 0.5
    min_lr: float = 0.0
    grow_after: int | None = None
    max_bad_steps: int = 3
    max_rollbacks: int = 3

    def __post_init__(self):
        if self.on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {self.on_nonfinite!r}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must lie in (0, 1), got {self.backoff_factor!r}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr!r}")
        if self.grow_after is not None and self.grow_after < 1:
            raise ValueError(f"grow_after must be None or >= 1, got {self.grow_after!r}")
        if self.max_bad_steps < 1 or self.max_rollbacks < 0:
            raise ValueError("max_bad_steps must be >= 1 and max_rollbacks >= 0")


@dataclass
class Policy:
    """The policy's mutable state: back-off exponent, streaks, rollbacks."""

    config: PolicyConfig
    lr0: float
    backoffs: int = 0
    clean_streak: int = 0
    bad_streak: int = 0
    rollbacks: int = 0

    @property
    def lr(self) -> float:
        """``max(lr0 * factor**k, min_lr)``, exactly."""
        return max(self.lr0 * self.config.backoff_factor**self.backoffs, self.config.min_lr)

    def on_good(self) -> str | None:
        self.bad_streak = 0
        self.clean_streak = min(self.clean_streak + 1, _SATURATE)
        grow = self.config.grow_after
        if self.config.on_nonfinite == "backoff" and grow and self.backoffs and self.clean_streak >= grow:
            self.backoffs -= 1
            self.clean_streak = 0
            return "grew-lr"
        return None

    def on_bad(self) -> str:
        """Return the action: ``raise``, ``skipped``, ``backed-off``, ``rolled-back`` or ``applied``."""
        self.clean_streak = 0
        self.bad_streak = min(self.bad_streak + 1, _SATURATE)
        mode = self.config.on_nonfinite
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
        if self.bad_streak < self.config.max_bad_steps:
            return "skipped"
        if self.rollbacks >= self.config.max_rollbacks:
            return "raise"
        self.rollbacks += 1
        self.bad_streak = 0
        self.backoffs = min(self.backoffs + 1, _SATURATE)
        return "rolled-back"
