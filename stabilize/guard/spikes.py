"""Loss-spike detection: running mean and variance, a z-score, a warm-up; no framework.

Large runs rarely die of a NaN first: a finite loss jumps by orders of
magnitude and the run diverges a few hundred steps later. Three answers are
public:

* **ZClip** (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training"): keep an exponential moving mean and variance of the
  gradient norm; a norm whose z-score exceeds a threshold is clipped to
  ``mean + z * std`` instead of a fixed bound (``spike="clip"``).
* **Skip the step** (OLMo-core's skip-step optimizer; dion #79 skips on
  every rank): the update is not applied (``spike="skip"``).
* **Rewind** (PaLM, Chowdhery et al. 2022, §5.1): restart from a checkpoint
  about 100 steps before the spike and skip the next 200–500 batches
  (``spike="rewind"``).

:class:`SpikeDetector` only answers "how high may the next loss and gradient
norm go" (:meth:`limits`), before the step, as two plain numbers; the device
compares the step's values with them inside the step's one read, so the
verdict costs no extra sync, and under data parallelism (where the loss and
norm are already reduced across ranks) it is the same on every rank.

Only values that were accepted update the statistics, so a spike does not
inflate the threshold that should catch the next one. During the warm-up
(``spike_warmup`` accepted steps) nothing is flagged; the statistics start
as the plain mean and variance of the warm-up values, as ZClip does. The
standard deviation is floored at ``1e-3 * |mean|`` so that a quiet stretch,
whose variance collapses, does not flag ordinary noise.

Example:
    >>> from stabilize.guard.settings import GuardSettings
    >>> det = SpikeDetector(GuardSettings(spike="skip", spike_warmup=3))
    >>> for loss in (1.0, 1.1, 0.9, 1.0):
    ...     det.update(loss, 1.0)
    >>> loss_max, norm_max = det.limits()
    >>> 1.0 < loss_max < 10.0
    True
"""

from __future__ import annotations

import math

from .settings import GuardSettings

__all__ = ["SpikeDetector"]

_FLOOR = 1e-3  # the smallest std, relative to the mean


class _Running:
    """An exponential moving mean and variance, started from a plain warm-up mean and variance."""

    def __init__(self, alpha: float, warmup: int):
        self.alpha, self.warmup = alpha, warmup
        self.count, self.mean, self.var = 0, 0.0, 0.0
        self._sum = self._sq = 0.0

    @property
    def ready(self) -> bool:
        return self.count >= self.warmup

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self.count += 1
        if self.count <= self.warmup:
            self._sum += x
            self._sq += x * x
            self.mean = self._sum / self.count
            self.var = max(self._sq / self.count - self.mean**2, 0.0)
            return
        delta = x - self.mean  # West's incremental EMA of the variance
        self.mean += self.alpha * delta
        self.var = (1.0 - self.alpha) * (self.var + self.alpha * delta * delta)

    def std(self) -> float:
        return max(math.sqrt(self.var), _FLOOR * abs(self.mean))

    def limit(self, z: float) -> float:
        return self.mean + z * self.std() if self.ready else math.inf

    def zscore(self, x: float) -> float:
        return (x - self.mean) / self.std() if self.ready and self.std() > 0 else 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var, "sum": self._sum, "sq": self._sq}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.var, self._sum, self._sq = (int(s["count"]), float(s["mean"]), float(s["var"]),
                                                                 float(s["sum"]), float(s["sq"]))


class SpikeDetector:
    """Running statistics of the accepted losses and gradient norms, and the limits they imply."""

    def __init__(self, settings: GuardSettings):
        self.settings = settings
        self.loss = _Running(settings.spike_alpha, settings.spike_warmup)
        self.norm = _Running(settings.spike_alpha, settings.spike_warmup)
        self.spikes = 0

    def limits(self) -> tuple[float, float]:
        """``(loss_max, norm_max)`` for the next step; ``inf`` while warming up."""
        z = self.settings.spike_z
        return self.loss.limit(z), self.norm.limit(z)

    def is_spike(self, loss: float, norm: float) -> bool:
        """Whether finite values exceed the current limits (the device's verdict, recomputed for tests)."""
        loss_max, norm_max = self.limits()
        return (math.isfinite(loss) and loss > loss_max) or (math.isfinite(norm) and norm > norm_max)

    def zscores(self, loss: float, norm: float) -> tuple[float, float]:
        return self.loss.zscore(loss), self.norm.zscore(norm)

    def update(self, loss: float, norm: float) -> None:
        """Feed an accepted step (for ``clip``, the norm after clipping, as ZClip does)."""
        self.loss.update(loss)
        self.norm.update(norm)

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "norm": self.norm.state_dict(), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.norm.load_state_dict(state["norm"])
        self.spikes = int(state["spikes"])
