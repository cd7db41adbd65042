"""Cross-backend parity: run one scenario variant on several backends and compare step by step.

The bar (``BARS``): the first non-finite step is identical on every backend,
and the losses agree within ``rtol`` at every step up to it (float64: 1e-9,
float32: 1e-4). Both backends start from the same numpy weights and see the
same batches, and every formula (loss, clip, optimizer) is the same code, so
what remains is the frameworks' own matmul and elementwise rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import scenarios

__all__ = ["BARS", "ParityReport", "compare", "relative_difference"]

BARS = {"float64": 1e-9, "float32": 1e-4}


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b| / max(|a|, |b|)`` elementwise (0 where both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.abs(a - b) / scale
    return np.where(scale == 0, 0.0, out)


@dataclass
class ParityReport:
    """The comparison of one scenario variant across backends.

    Attributes:
        per_step_rel_diff: the maximum relative loss difference between the
            backends at each step compared (steps where every loss is finite,
            up to the first non-finite step).
        first_nonfinite: each backend's first non-finite step (or None).
        max_rel_diff: the maximum of ``per_step_rel_diff`` (0 if nothing compared).
        rtol: the bar used.
        ok: same first non-finite step, same step count up to it, and ``max_rel_diff <= rtol``.
    """

    scenario: str
    variant: str
    dtype: str
    backends: tuple[str, ...]
    first_nonfinite: dict
    per_step_rel_diff: np.ndarray
    max_rel_diff: float
    rtol: float
    ok: bool
    trajectories: dict = field(default_factory=dict, repr=False)

    def row(self) -> str:
        steps = " ".join(f"{b}={self.first_nonfinite[b]}" for b in self.backends)
        return (f"{self.scenario:16s} {self.variant:13s} {self.dtype:8s} {steps:30s} "
                f"{self.max_rel_diff:10.3e} {'ok' if self.ok else 'FAIL'}")


def compare(name: str, variant: str, backends=("torch", "tensorflow"), dtype: str = "float64",
            rtol: float | None = None, device: str | None = None) -> ParityReport:
    """Run ``name``/``variant`` on each backend and compare the loss trajectories.

    Example:
        >>> from stabilize import parity
        >>> parity.compare("high-lr", "diverging").ok   # doctest: +SKIP
        True
    """
    if len(backends) < 2:
        raise ValueError(f"compare needs at least two backends, got {backends!r}")
    rtol = BARS[dtype] if rtol is None else rtol
    runs = {b: scenarios.run(name, variant, backend=b, dtype=dtype, device=device if b == "torch" else None)
            for b in backends}
    firsts = {b: t.first_nonfinite_step for b, t in runs.items()}
    same_step = len(set(firsts.values())) == 1
    n = min(len(t.losses) for t in runs.values())
    stop = n if firsts[backends[0]] is None else min(n, firsts[backends[0]] + 1)
    losses = np.stack([t.losses[:stop] for t in runs.values()])
    finite = np.all(np.isfinite(losses), axis=0)
    ref = losses[0]
    diffs = np.max(np.stack([relative_difference(ref, other) for other in losses[1:]]), axis=0)
    diffs = diffs[finite]
    # Where a step's loss is non-finite, every backend must agree on which kind.
    same_kind = all(np.array_equal(np.isnan(losses[0]), np.isnan(o)) and np.array_equal(np.isinf(losses[0]), np.isinf(o))
                    for o in losses[1:])
    same_length = len({len(t.losses) for t in runs.values()}) == 1
    max_diff = float(diffs.max()) if diffs.size else 0.0
    ok = same_step and same_kind and same_length and max_diff <= rtol
    return ParityReport(name, variant, dtype, tuple(backends), firsts, diffs, max_diff, rtol, ok, runs)
