"""Fault injectors for the trainer tests: a switch the test flips between steps.

Each works inside tf.function (the switch is a backend variable read at run
time) and in eager torch alike.
"""

from __future__ import annotations

import numpy as np

import stabilize
from stabilize.optim import SGD, Adam


class Switch:
    """A 0-d backend variable: 0 = no fault, 1 = NaN, 2 = +inf."""

    def __init__(self, backend: str, dtype: str):
        self.B = stabilize.get_backend(backend)
        self.dtype = dtype
        self.var = self.B.variable(self.B.convert(np.array(0.0), dtype))

    def set(self, value: float):
        self.B.assign(self.var, self.B.convert(np.array(value), self.dtype))

    def poison(self, like):
        """0 when off; NaN or inf (per the switch) when on, broadcast like ``like``."""
        B = self.B
        bad = B.where(self.var > 1.5, B.full_like(self.var, np.inf), B.full_like(self.var, np.nan))
        return B.where(self.var > 0.5, bad, B.full_like(self.var, 0.0)) * B.full_like(like, 1.0)


def faulty_loss(switch: Switch):
    """MSE plus a term that is NaN/inf while the switch is on."""

    def loss(pred, target):
        return stabilize.safe_mse(pred, target) + stabilize.get_backend(switch.B.name).sum(switch.poison(pred[:1, :1]))

    return loss


def gradient_fault(switch: Switch, base_loss, param_ref: list):
    """A loss whose value is exact but whose gradient for ONE element of param_ref[0] is NaN/inf while on."""
    B = switch.B

    def forward(p):
        return B.sum(p) * 0.0, (p,)

    def backward(saved, dy):
        (p,) = saved
        mask = B.convert(np.eye(1, int(np.prod(B.shape(p))), 0).reshape(B.shape(p)), B.dtype(p))
        return (mask * switch.poison(p),)

    op = B.custom_grad(forward, backward)

    def loss(pred, target):
        return base_loss(pred, target) + op(param_ref[0])

    return loss


class FaultySGD(SGD):
    """SGD whose candidate update puts NaN/inf into one weight element while the switch is on."""

    def __init__(self, switch, **kw):
        super().__init__(**kw)
        object.__setattr__(self, "_switch", switch)

    def update(self, B, params, grads, state, lr):
        new, st = super().update(B, params, grads, state, lr)
        p = new[0]
        mask = B.convert(np.eye(1, int(np.prod(B.shape(p))), 0).reshape(B.shape(p)), B.dtype(p))
        new = [p + mask * self._switch.poison(p)] + list(new[1:])
        return new, st


__all__ = ["Switch", "faulty_loss", "gradient_fault", "FaultySGD", "Adam"]
