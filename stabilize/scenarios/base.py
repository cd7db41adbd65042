"""The scenario machinery: a ``Case`` is everything one run needs; ``Trajectory`` is what it gives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Case", "Trajectory", "Scenario"]


@dataclass
class Case:
    """One runnable variant: data, model, loss, optimizer and trainer settings.

    ``expect`` is ``"diverge"`` (a non-finite loss, gradient or weight must
    occur), ``"finite"`` (none may, and the final loss must be below ``bound``),
    ``"guarded"`` (bad steps occur, are skipped, and the run still ends finite
    below ``bound``) or ``"stall"`` (finite, with learning stopped: see the
    scenario's probe).
    """

    model: Any
    loss: Callable
    optimizer: Any
    x: Any
    y: Any
    expect: str
    epochs: int = 10
    batch_size: int = 32
    shuffle: bool = True
    bound: float | None = None
    trainer_kwargs: dict = field(default_factory=dict)
    stop_on_nonfinite: bool = True
    probe: Callable | None = None  # probe(trainer, case) -> dict of extra facts
    preflight: Callable | None = None  # preflight(case) -> (case, facts) before training
    note: str = ""
    facts: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    """The result of ``stabilize.scenarios.run``.

    Attributes:
        losses, grad_norms: per attempted step (float64).
        first_nonfinite_step: the first step with a non-finite loss, gradient
            or candidate weight, or None.
        final_loss: the loss of the last applied step.
        events: the trainer's events.
        bound: the stated bound on ``final_loss`` for a finite variant.
        facts: what the scenario measured besides the curves (probe, preflight).
    """

    scenario: str
    variant: str
    backend: str
    dtype: str
    device: str
    expect: str
    losses: np.ndarray
    grad_norms: np.ndarray
    first_nonfinite_step: int | None
    final_loss: float
    events: list
    bound: float | None
    facts: dict
    history: Any = None

    @property
    def ok(self) -> bool:
        """Whether the run shows what its variant claims."""
        if self.expect == "diverge":
            return self.first_nonfinite_step is not None
        finite = self.first_nonfinite_step is None and bool(np.all(np.isfinite(self.losses)))
        if self.expect == "stall":
            return finite and bool(self.facts.get("stalled", False))
        if self.expect == "guarded":  # bad steps met and skipped; nothing bad applied
            applied = self.history.committed if self.history is not None else np.ones(0, bool)
            return (bool(self.events) and bool(np.all(np.isfinite(self.losses[applied])))
                    and bool(self.facts.get("weights_finite_at_end")) and self.final_loss < self.bound)
        return finite and self.bound is not None and self.final_loss < self.bound


@dataclass(frozen=True)
class Scenario:
    """A document's failure: its id, seed file, summary and variant builders."""

    name: str
    seeds: tuple[str, ...]
    summary: str
    variants: dict  # variant name -> builder(dtype) -> Case
