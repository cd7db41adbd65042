"""The trainer's updater for a torch model with a ``torch.optim`` optimizer.

The same guarded step as ``TorchGuard`` (:class:`TorchStep` over
:class:`TorchState`); the trainer adds the forward pass in training mode, the
loss in torch's ``(input, target)`` order, and a scheduler stepped only on
applied steps.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .torch_guard import check_model_and_optimizer
from .torch_state import Snapshot, TorchState
from .torch_step import TorchStep

__all__ = ["TorchUpdater", "train_mode", "eval_mode", "is_scheduler", "device_tensor"]


def device_tensor(arr: np.ndarray, dtype: str | None, device) -> torch.Tensor:
    """``arr`` as a tensor of ``dtype`` (None: numpy's) on ``device``."""
    return torch.as_tensor(arr, dtype=getattr(torch, dtype) if dtype else None, device=device)


def is_scheduler(obj) -> bool:
    """A torch scheduler the trainer steps once per applied step."""
    if isinstance(obj, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError("ReduceLROnPlateau steps on a validation metric, once per epoch: call "
                        "scheduler.step(val_loss) yourself between fit(epochs=1) calls")
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)


@contextlib.contextmanager
def train_mode(model):
    """Train the model in training mode (Dropout on, BatchNorm updating); leave it as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def eval_mode(model):
    """Predict in eval mode without gradients; leave the model as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class TorchUpdater:
    """Runs one guarded torch.optim step for the trainer."""

    diagnoses_before_commit = True  # ``run(..., before_unguarded)``: no pre-step copy under ``ignore``

    def __init__(self, B, model, optimizer, loss_fn, settings, *, scheduler=None, scaler=None, verify_updates=False):
        check_model_and_optimizer(model, optimizer)
        if scheduler is not None and scheduler.optimizer is not optimizer:
            raise ValueError("the scheduler was built for another optimizer")
        self.B, self.model, self.optimizer, self.loss_fn = B, model, optimizer, loss_fn
        self.scheduler = scheduler
        self.state = TorchState(model, optimizer, scheduler=scheduler, scaler=scaler)
        self.params = self.state.params
        self._step = TorchStep(self.state, settings, verify_updates=verify_updates)
        self.verifies = self._step.verify
        self.applied = 0
        self._device = self.params[0].device

    def to_tensor(self, arr: np.ndarray, dtype: str | None):
        """A batch as a tensor on the model's device (resolved once, never from the config per step)."""
        return device_tensor(arr, dtype, self._device)

    def base_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def training(self):
        with train_mode(self.model):
            self.state.mark()  # what a skipped step returns the buffers and RNG to
            self.optimizer.zero_grad(set_to_none=True)  # gradients left by the user's own code; then after each step
            yield

    def run(self, xb, yb, rate, before_unguarded=None) -> dict:
        loss = self.loss_fn(self.model(xb), yb)
        self._step.backward(loss)
        stats = self._step.step(rate, before_unguarded)
        self.optimizer.zero_grad(set_to_none=True)
        if stats["committed"] == 1.0:
            self.applied += 1
            if self.scheduler is not None:
                self.scheduler.step()
        return stats

    def capture(self, where: str = "device"):
        return self.state.capture({"applied": self.applied}, where)

    def held_bytes(self) -> int:
        return self._step.held_bytes()

    rebuild = staticmethod(Snapshot._make)  # a snapshot read back from disk (plain tuples)

    def restore(self, snap) -> None:
        self.state.restore(snap)
        self.applied = snap.extra["applied"]

    def checkpoint_state(self) -> dict:
        """The torch training state as tensors and plain values (:func:`torch_checkpoint.checkpoint_state`)."""
        from .torch_checkpoint import checkpoint_state

        return {"torch": checkpoint_state(self.state)}

    checkpoint_sections = {"torch"}

    def check_checkpoint_state(self, saved: dict, where: str = "checkpoint"):
        """Verify the torch section against the live state, changing nothing; returns what
        :meth:`apply_checkpoint_state` puts back."""
        from .torch_checkpoint import check_checkpoint_state

        return check_checkpoint_state(self.state, saved["torch"], where)

    def apply_checkpoint_state(self, checked, where: str = "checkpoint") -> None:
        from .torch_checkpoint import apply_checkpoint_state

        apply_checkpoint_state(self.state, checked, where)

    def on_any_rank(self, flag: bool) -> bool:
        return self._step.on_any_rank(flag)

    def weights_finite(self) -> bool:
        return self._step.weights_finite()  # reduced across ranks when distributed

    def predict(self, xb) -> np.ndarray:
        with eval_mode(self.model):
            return np.asarray(self.B.to_numpy(self.model(xb)), dtype=np.float64)

    def buffers_finite(self) -> bool:
        return bool(self.state.buffers_finite())
