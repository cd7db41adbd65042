"""Backend-neutral model specs: the same network, from the same numpy numbers, in any framework.

``MLP`` describes layer sizes, activations and an initialisation; ``weights()``
returns the numpy arrays, and a backend's ``build_mlp`` turns them into a native
``torch.nn.Module`` or ``keras.Model`` that computes ``act(x @ W + b)`` layer by
layer. Kernels are stored as ``(in, out)`` in both, so they are the very same
arrays (torch's ``nn.Linear`` would store the transpose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["MLP", "ACTIVATIONS", "INITS"]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")
INITS = ("he", "xavier", "normal")


@dataclass(frozen=True)
class MLP:
    """A multilayer perceptron spec.

    Args:
        sizes: ``(n_in, hidden..., n_out)``.
        activation: hidden-layer activation, one of ``ACTIVATIONS``.
        output_activation: activation of the last layer (``linear`` for logits
            and regression).
        init: ``he`` (``N(0, 2/fan_in)``), ``xavier`` (``N(0, 2/(fan_in+fan_out))``)
            or ``normal`` (``N(0, init_scale²)``, the hand-written networks' choice).
        init_scale: the standard deviation for ``init="normal"``.
        seed: the numpy seed for the initial weights.
        initial_weights: explicit ``[W1, b1, W2, b2, ...]`` (overrides ``init``).

    Example:
        >>> from stabilize.models import MLP
        >>> [w.shape for w in MLP((2, 8, 1), seed=0).weights()]
        [(2, 8), (8,), (8, 1), (1,)]
    """

    sizes: Sequence[int]
    activation: str = "relu"
    output_activation: str = "linear"
    init: str = "he"
    init_scale: float = 1.0
    seed: int = 0
    initial_weights: Sequence[np.ndarray] | None = field(default=None, compare=False)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"MLP sizes must be at least (n_in, n_out), all >= 1; got {self.sizes!r}")
        object.__setattr__(self, "sizes", sizes)
        for name in ("activation", "output_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"MLP {name} must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"MLP init must be one of {INITS}, got {self.init!r}")
        if self.initial_weights is not None:
            expected = self._shapes()
            got = [tuple(np.shape(w)) for w in self.initial_weights]
            if got != expected:
                raise ValueError(f"MLP initial_weights have shapes {got}; sizes {sizes} need {expected}")

    def _shapes(self):
        out = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            out += [(fan_in, fan_out), (fan_out,)]
        return out

    @property
    def activations(self) -> tuple[str, ...]:
        n = len(self.sizes) - 1
        return (self.activation,) * (n - 1) + (self.output_activation,)

    def weights(self, dtype: str = "float64") -> list[np.ndarray]:
        """The initial ``[W1, b1, ...]`` as numpy arrays (copies: the spec is never mutated)."""
        if self.initial_weights is not None:
            return [np.array(w, dtype=dtype) for w in self.initial_weights]
        rng = np.random.default_rng(self.seed)
        out = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            std = {
                "he": np.sqrt(2.0 / fan_in),
                "xavier": np.sqrt(2.0 / (fan_in + fan_out)),
                "normal": self.init_scale,
            }[self.init]
            out.append((rng.standard_normal((fan_in, fan_out)) * std).astype(dtype))
            out.append(np.zeros(fan_out, dtype=dtype))
        return out
