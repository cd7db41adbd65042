"""The guarded step for a native torch optimizer, shared by ``TorchGuard`` and the trainer.

After the backward pass (of one batch, or of k accumulated micro-batches):

1. with a ``GradScaler``, unscale the gradients in place;
2. on the device: the global gradient norm (after ``clip_value``), the finite
   flags of the loss(es) and of the norm, and the commit decision ``ok``;
3. one read of those numbers (the step's only device-to-host sync);
4. commit: clip by ``clip_norm`` (the coefficient ``max/(norm+1e-6)`` only when
   it is below 1), then ``optimizer.step()`` (through the scaler when there is
   one); or, when ``ok`` is false, no update at all, and the buffers and RNG
   state the forward pass changed are put back (:class:`TorchState`).

With ``max_update_ratio`` or ``verify_updates``, the update itself is
checked: the pre-step parameters and optimizer state are kept, and an update
that left non-finite weights, or whose ``‖Δw‖/‖w‖`` exceeds the bound, is
undone exactly. That costs a copy of the state and a second read per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..guard.settings import GuardSettings
from ..ops import global_norm
from ..registry import get_backend
from ..step import update_ratio
from .torch_state import TorchState, UpdateUndo

__all__ = ["TorchStep", "check_loss"]


def check_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must be a torch tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first, e.g. loss.mean()")
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad: it was computed without the model's parameters "
                         "(under torch.no_grad(), or from detached tensors)")
    return loss


class TorchStep:
    """One guarded optimizer step over a :class:`TorchState`."""

    def __init__(self, state: TorchState, settings: GuardSettings, *, verify_updates: bool = False):
        self.state, self.settings = state, settings
        self.B = get_backend("torch")
        self.verify = verify_updates or settings.max_update_ratio is not None
        self._undo = UpdateUndo(state) if self.verify else None
        self._losses: list[torch.Tensor] = []

    def backward(self, loss) -> None:
        """Backward one (micro-)batch loss, scaled by the ``GradScaler`` if there is one."""
        loss = check_loss(loss)
        self._losses.append(loss.detach())
        scaler = self.state.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, rate=None, before_unguarded=None) -> dict[str, float]:
        """Check the accumulated gradients and commit or discard; returns the step's statistics.

        ``rate(lr) -> lr``, when given, maps each group's own rate (the user's or
        the scheduler's) to the one this update uses (the back-off); the group's
        rate is put back right after, so a scheduler never sees it changed.
        ``before_unguarded(stats)`` is called when a bad step is about to be
        applied anyway (policy ``ignore``), while the weights are still the
        pre-step ones: the diagnosis runs there, and nothing is copied.
        """
        st, s = self.state, self.settings
        if not self._losses:
            raise RuntimeError("no loss was backpropagated since the last step: call backward(loss) first")
        losses, self._losses = self._losses, []
        scaler = st.scaler
        if scaler is not None:
            scaler.unscale_(st.optimizer)
        grads = [p.grad for p in st.params if p.grad is not None]
        with torch.no_grad():
            loss = losses[0].float() if len(losses) == 1 else torch.stack([l.float() for l in losses]).sum()
            norm = global_norm(grads, backend=self.B) if grads else torch.zeros((), device=loss.device)
            if s.clip_value is not None and grads:
                torch._foreach_clamp_min_(grads, -s.clip_value)  # clamping keeps NaN
                torch._foreach_clamp_max_(grads, s.clip_value)
                current = global_norm(grads, backend=self.B)
            else:
                current = norm
            loss_ok, grads_ok = torch.isfinite(loss), torch.isfinite(norm)
            buffers_ok = st.buffers_finite()  # BatchNorm statistics the forward pass just wrote
            ok = loss_ok & grads_ok & buffers_ok
            scale = scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else torch.ones((), device=loss.device)
            values = self.B.read(self.B.stack([loss, norm, loss_ok, grads_ok, ok, current, scale, buffers_ok],
                                              "float64"))
        stats = dict(zip(("loss", "grad_norm", "loss_finite", "grads_finite"), values[:4]))
        ok, current, scale = values[4] == 1.0, values[5], values[6]
        stats["buffers_finite"] = values[7]
        base = float(st.optimizer.param_groups[0]["lr"])
        stats.update(weights_finite=1.0, update_ratio=0.0, large_update=0.0, scaler_skip=0.0, loss_scale=scale,
                     lr=float(rate(base)) if rate is not None else base)
        # A scaler's own overflow: finite loss, non-finite gradients, scale still above the floor.
        if scaler is not None and not ok and stats["loss_finite"] == 1.0 and values[7] == 1.0 \
                and scale >= s.min_loss_scale:
            stats["scaler_skip"] = 1.0
        commit = ok or not s.guarded
        if not ok and commit and before_unguarded is not None:
            before_unguarded(stats)
        if commit and s.clip_norm is not None and grads and math.isfinite(current):
            coef = float(np.float32(s.clip_norm) / (np.float32(current) + np.float32(1e-6)))
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        if commit:
            commit = self._update(stats, rate)
        elif scaler is not None:
            self._scaler_update(keep=stats["scaler_skip"] == 1.0)
        if not commit and s.guarded:
            st.undo_forward()
        else:
            st.mark()
        stats["committed"] = float(commit)
        return stats

    def _update(self, stats, rate) -> bool:
        st, s = self.state, self.settings
        groups = st.optimizer.param_groups
        user_lrs = [g["lr"] for g in groups]
        if rate is not None:
            for g in groups:
                g["lr"] = rate(g["lr"])
        try:
            if self._undo is not None:
                self._undo.save()
            if st.scaler is not None:
                st.scaler.step(st.optimizer)
                st.scaler.update()
            else:
                st.optimizer.step()
        finally:
            for g, lr in zip(groups, user_lrs):
                g["lr"] = lr
        if self._undo is None:
            return True
        with torch.no_grad():
            new = [p.detach() for p in st.params]
            weights_ok = self.B.all_finite(new)
            ratio = update_ratio(self.B, new, self._undo._params)
            bound = s.max_update_ratio
            large = ~(ratio <= bound) if bound is not None else torch.zeros((), dtype=torch.bool)
            keep = weights_ok & ~large
            w_ok, r, big, keep = self.B.read(self.B.stack([weights_ok, ratio, large, keep], "float64"))
        stats.update(weights_finite=w_ok, update_ratio=r, large_update=big)
        if keep == 1.0 or not s.guarded:
            return True
        self._undo.undo()
        return False

    def _scaler_update(self, keep: bool) -> None:
        """Close the scaler's step: its overflow skip lowers the scale (``keep``); any other
        bad step leaves the scaler exactly as it was."""
        scaler = self.state.scaler
        saved = None if keep else scaler.state_dict()
        scaler.update()
        if saved is not None:
            scaler.load_state_dict(saved)

    def zero_grad(self) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)

