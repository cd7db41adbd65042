"""The trainer's updater for ``stabilize.optim`` specs: the same update math on every backend.

The step (:func:`stabilize.step.make_step`) computes the candidate update,
checks it and commits it with ``where(ok, new, old)`` on the device; the
optimizer state lives in backend variables created here. The models it drives
(the MLP spec, or plain torch/keras models) hold no buffers the step must
protect beyond what ``make_step`` commits.

The rate and the spike limits are backend variables the step reads (on
TensorFlow, inside the compiled step, so a new rate never retraces it). They
are assigned only when their value changes: a back-off or a schedule does, a
good step at a constant rate costs no assignment.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..guard.snapshots import host_copy
from ..guard.stats import from_values
from ..step import NAMES, flatten_state, make_step

__all__ = ["NeutralUpdater"]


class NeutralUpdater:
    """Runs a :class:`~stabilize.optim.OptimizerSpec` step for the trainer."""

    def __init__(self, B, model, params, optimizer, loss_fn, settings, schedule=None, forward=None):
        self.B, self.model, self.params, self.optimizer = B, model, params, optimizer
        self.schedule = schedule
        self.applied = 0  # the schedule's clock: applied steps only
        template = optimizer.init(B, params)
        _, values = flatten_state(template)
        self.state_vars = [B.variable(v) for v in values]
        self._lr_var = B.variable(B.state_scalar(optimizer.lr, params[0]))
        self._set = {"lr": float(optimizer.lr), "loss_max": float("inf"), "norm_max": float("inf")}  # last assigned
        # The spike detector's limits, set before each step (``limits() -> (loss_max, norm_max) | None``,
        # the Supervisor's ``spike_limits``); the step compares on the device.
        self.limits = None
        self._loss_max = B.variable(self._limit(float("inf")))  # float64: compared in float64 on the device
        self._norm_max = B.variable(self._limit(float("inf")))
        self._step = make_step(B, forward or model, loss_fn, params, optimizer, template, self.state_vars,
                               clip_norm=settings.clip_norm, clip_value=settings.clip_value,
                               max_update_ratio=settings.max_update_ratio, guard=settings.guarded,
                               spike=settings.spike)

    def to_tensor(self, arr: np.ndarray, dtype: str | None):
        """A batch as a backend tensor, on the device the parameters live on."""
        if self.B.name == "torch":  # the parameters' device, resolved once (no config read per batch)
            from .torch_updater import device_tensor

            return device_tensor(arr, dtype, self.params[0].device)
        return self.B.convert(arr, dtype)

    def base_lr(self) -> float:
        factor = self.schedule(self.applied) if self.schedule is not None else 1.0
        return self.optimizer.lr * factor

    def _limit(self, value: float):
        """A spike limit as a float64 scalar on the parameters' device."""
        if self.B.name == "torch":  # on the parameters' device, never rounded through their dtype
            from .torch_updater import device_tensor

            return device_tensor(np.asarray(value, dtype=np.float64), "float64", self.params[0].device)
        return self.B.convert(value, "float64")

    def _set_scalar(self, name: str, var, value: float) -> None:
        """Assign ``value`` to the step's input ``var`` only when it differs from what was last assigned."""
        if value != self._set[name]:
            self.B.assign(var, self._limit(value) if name != "lr" else self.B.state_scalar(value, self.params[0]))
            self._set[name] = value

    def run(self, xb, yb, rate) -> dict:
        B = self.B
        lr = rate(self.base_lr())
        self._set_scalar("lr", self._lr_var, lr)
        limits = self.limits() if self.limits is not None else None
        if limits is not None:
            self._set_scalar("loss_max", self._loss_max, limits[0])
            self._set_scalar("norm_max", self._norm_max, limits[1])
        values = B.read(self._step(xb, yb, self._lr_var, self._loss_max, self._norm_max))
        stats = from_values(NAMES, values, lr=lr)
        if limits is not None:
            stats["loss_max"], stats["norm_max"] = limits
        if stats["committed"] == 1.0:
            self.applied += 1
        return stats

    def training(self):
        return contextlib.nullcontext()

    def capture(self, where: str = "device"):
        B = self.B
        snap = ([B.copy(p) for p in self.params], [B.copy(v) for v in self.state_vars], self.applied)
        return host_copy(snap) if where == "host" else snap

    def restore(self, snap) -> None:
        B = self.B
        params, state, applied = snap
        for p, saved in zip(self.params, params):
            B.assign(p, saved)
        for v, saved in zip(self.state_vars, state):
            B.assign(v, saved)
        self.applied = applied

    def weights_finite(self) -> bool:
        B = self.B
        return bool(B.read(B.stack([B.all_finite(self.params)], "float64"))[0])

    def predict(self, xb) -> np.ndarray:
        if self.B.name == "torch":
            from .torch_updater import eval_mode

            with eval_mode(self.model):
                return np.asarray(self.B.to_numpy(self.model(xb)), dtype=np.float64)
        return np.asarray(self.B.to_numpy(self.model(xb, training=False)), dtype=np.float64)
