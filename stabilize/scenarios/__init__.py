"""The scenario catalogue: every document's failure as a runnable, deterministic case.

Example:
    >>> from stabilize import scenarios
    >>> scenarios.names()[:2]
    ['unscaled-inputs', 'log-zero']
    >>> scenarios.variants("log-zero")
    ['diverging', 'clipped', 'fixed']
"""

from __future__ import annotations

import numpy as np

from .base import Case, Scenario, Trajectory
from .catalogue import SCENARIOS

__all__ = ["names", "variants", "describe", "build", "run", "Trajectory", "Case", "Scenario"]


def names() -> list[str]:
    """The scenario ids, in catalogue order."""
    return list(SCENARIOS)


def _scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def variants(name: str) -> list[str]:
    """The variants of scenario ``name``."""
    return list(_scenario(name).variants)


def describe(name: str) -> Scenario:
    return _scenario(name)


def build(name: str, variant: str) -> Case:
    """The :class:`Case` (data, model, loss, optimizer, settings) of one variant."""
    scenario = _scenario(name)
    if variant not in scenario.variants:
        raise KeyError(f"scenario {name!r} has no variant {variant!r}; it has: {', '.join(scenario.variants)}")
    return scenario.variants[variant]()


def run(name: str, variant: str, backend: str | None = None, dtype: str = "float64",
        device: str | None = None, progress: bool = False) -> Trajectory:
    """Run one variant and return its :class:`Trajectory`.

    Args:
        name, variant: see :func:`names` and :func:`variants`.
        backend: ``torch``, ``tensorflow`` (default: the configured backend).
        dtype: ``float64`` (default) or ``float32``.
        device: torch device (default: CUDA when available, see the config).
    """
    from ..trainer import StabilityTrainer

    case = build(name, variant)
    facts = dict(case.facts)
    if case.preflight is not None:
        case, found = case.preflight(case)
        facts.update(found)
    kwargs = {"on_nonfinite": "ignore"} if case.expect == "diverge" else {}
    kwargs.update(case.trainer_kwargs)
    trainer = StabilityTrainer(case.model, case.loss, case.optimizer, backend=backend, dtype=dtype,
                               device=device, progress=progress, **kwargs)
    history = trainer.fit(case.x, case.y, epochs=case.epochs, batch_size=case.batch_size, shuffle=case.shuffle,
                          seed=0, stop_on_nonfinite=case.stop_on_nonfinite and case.expect == "diverge")
    if case.probe is not None:
        facts.update(case.probe(trainer, case))
    if "losses_all_finite" in facts:
        facts["losses_all_finite"] = bool(np.all(np.isfinite(history.losses)))
    if case.expect == "guarded":
        facts["weights_finite_at_end"] = bool(all(np.isfinite(w).all() for w in trainer.get_weights()))
    dev = str(getattr(trainer.params[0], "device", "cpu"))
    if "/device:" in dev:  # TensorFlow spells it /job:localhost/.../device:CPU:0
        kind, _, index = dev.rsplit("/device:", 1)[1].partition(":")
        dev = kind.lower() if kind == "CPU" else f"{kind.lower()}:{index}"
    return Trajectory(name, variant, trainer.backend.name, trainer.dtype, dev, case.expect, history.losses,
                      history.grad_norms, history.first_nonfinite_step, history.final_loss, history.events,
                      case.bound, facts, history)
