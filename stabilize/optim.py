"""Neutral optimizers: the update math written once, applied by every backend.

Keras and torch disagree on exactly the details that break parity: Keras SGD
keeps ``v = μv - lr·g`` (so a learning-rate change rescales the stored
velocity) while torch keeps ``b = μb + g`` and multiplies by lr at use; Keras
Adam adds ε to ``sqrt(v̂)`` after folding the bias correction into lr, torch
adds ε to ``sqrt(v)/sqrt(1-β2^t)``. These specs use torch's conventions, so a
torch user sees the numbers they know, and both backends compute the same ones.

A spec is an ``init``/``update`` pair in the optax style: ``init`` returns the
state, ``update`` returns new parameter and state *values* without assigning
anything, so the trainer can commit them only if every one is finite. The step
counter is a tensor, so a skipped step leaves it unchanged without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SGD", "Adam", "OptimizerSpec"]


class OptimizerSpec:
    """Base class: ``init(B, params) -> state`` and ``update(...) -> (params, state)``."""

    lr: float

    def init(self, B, params) -> dict[str, Any]:
        raise NotImplementedError

    def update(self, B, params, grads, state, lr):
        raise NotImplementedError


def _check_lr(lr):
    lr = float(lr)
    if not lr > 0:
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    return lr


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """Stochastic gradient descent with optional momentum, torch's convention.

    ``b ← μ·b + g``; ``p ← p - lr·b`` (``p - lr·(g + μ·b)`` with ``nesterov``).

    Example:
        >>> from stabilize.optim import SGD
        >>> SGD(lr=0.01, momentum=0.9).lr
        0.01
    """

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        _check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD momentum must lie in [0, 1), got {self.momentum!r}")

    def init(self, B, params):
        state = {"step": B.state_scalar(0.0, params[0])}
        if self.momentum:
            state["momentum"] = [B.zeros_like(p) for p in params]
        return state

    def update(self, B, params, grads, state, lr):
        step = state["step"] + 1.0
        if not self.momentum:
            return [p - lr * g for p, g in zip(params, grads)], {"step": step}
        bufs = [self.momentum * b + g for b, g in zip(state["momentum"], grads)]
        if self.nesterov:
            directions = [g + self.momentum * b for g, b in zip(grads, bufs)]
        else:
            directions = bufs
        new = [p - lr * d for p, d in zip(params, directions)]
        return new, {"step": step, "momentum": bufs}


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """Adam (Kingma & Ba, 2015), torch's placement of ε.

    ``m ← β1 m + (1-β1) g``; ``v ← β2 v + (1-β2) g²``;
    ``p ← p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)``.

    Example:
        >>> from stabilize.optim import Adam
        >>> Adam(lr=1e-3).eps
        1e-08
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        _check_lr(self.lr)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Adam {name} must lie in [0, 1), got {getattr(self, name)!r}")

    def init(self, B, params):
        return {
            "step": B.state_scalar(0.0, params[0]),
            "m": [B.zeros_like(p) for p in params],
            "v": [B.zeros_like(p) for p in params],
        }

    def update(self, B, params, grads, state, lr):
        step = state["step"] + 1.0
        m = [self.beta1 * m + (1.0 - self.beta1) * g for m, g in zip(state["m"], grads)]
        v = [self.beta2 * v + (1.0 - self.beta2) * g * g for v, g in zip(state["v"], grads)]
        bc1 = 1.0 - B.scalar_pow(self.beta1, step)
        bc2 = B.sqrt(1.0 - B.scalar_pow(self.beta2, step))
        new = [p - (lr / bc1) * mi / (B.sqrt(vi) / bc2 + self.eps) for p, mi, vi in zip(params, m, v)]
        return new, {"step": step, "m": m, "v": v}
