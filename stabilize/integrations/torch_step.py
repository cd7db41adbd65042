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

With more than one torch.distributed rank, step 2 packs the local flags and
squared norms into one vector, all-reduced once before the read
(:mod:`stabilize.distributed`): every rank then takes the same decision from
the same numbers, and sharded (FSDP2) gradients give the global norm.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..guard.settings import GuardSettings
from ..ops import global_norm
from ..registry import get_backend
from ..distributed import combine
from ..step import update_ratio
from .torch_distributed import TorchReducer, local
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

    def __init__(self, state: TorchState, settings: GuardSettings, *, verify_updates: bool = False, group=None):
        self.state, self.settings = state, settings
        self.B = get_backend("torch")
        # More than one rank: flags and norms are all-reduced inside the step's one read.
        self.reducer = TorchReducer.detect(settings.distributed, group)
        self.verify = verify_updates or settings.max_update_ratio is not None
        self._undo = UpdateUndo(state) if self.verify else None
        self._losses: list[torch.Tensor] = []
        # ``limits() -> (loss_max, norm_max) | None``: the spike detector's bounds for this step
        # (the Supervisor's ``spike_limits``), compared on the device inside the one read.
        self.limits = None

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
            if self.reducer is not None:
                loss, norm, current, loss_ok, grads_ok, buffers_ok = self._reduced(loss, grads)
            else:
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
            limits = self.limits() if self.limits is not None else None
            if limits is not None:  # a finite spike: rank-consistent, since loss and norm are reduced
                spike = loss_ok & grads_ok & ((loss > limits[0]) | (norm > limits[1]))
                if s.spike in ("skip", "rewind"):
                    ok = ok & ~spike
            else:
                spike = torch.zeros((), dtype=torch.bool, device=loss.device)
            scale = scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else torch.ones((), device=loss.device)
            values = self.B.read(self.B.stack([loss, norm, loss_ok, grads_ok, ok, current, scale, buffers_ok, spike],
                                              "float64"))
        stats = dict(zip(("loss", "grad_norm", "loss_finite", "grads_finite"), values[:4]))
        ok, current, scale = values[4] == 1.0, values[5], values[6]
        stats["buffers_finite"], stats["spike"] = values[7], values[8]
        if limits is not None:
            stats["loss_max"], stats["norm_max"] = limits
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
        bound = s.clip_norm
        if stats["spike"] == 1.0 and s.spike == "clip":  # ZClip: clip to the running mean + z * std
            bound = limits[1] if bound is None else min(bound, limits[1])
        if commit and bound is not None and grads and math.isfinite(current):
            coef = float(np.float32(bound) / (np.float32(current) + np.float32(1e-6)))
            if coef < 1.0:
                torch._foreach_mul_([local(g) for g in grads], coef)
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

    def _reduced(self, loss, grads):
        """The distributed path: one all-reduce makes every number below the same on every rank."""
        s = self.settings
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        pre = TorchReducer.sumsq(grads, loss.device)
        if s.clip_value is not None and local:
            torch._foreach_clamp_min_(local, -s.clip_value)  # in place on the local shards; keeps NaN
            torch._foreach_clamp_max_(local, s.clip_value)
            cur = TorchReducer.sumsq(grads, loss.device)
        else:
            cur = pre
        buffers_ok = self.state.buffers_finite()
        vec = self.reducer.all_reduce([loss, ~torch.isfinite(loss), ~buffers_ok, *pre, *cur])
        return combine(vec, self.reducer.world, torch.sqrt, torch.isfinite)

    def on_any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (``flag`` itself without ranks): one all-reduce, made
        only on a failed step, so that a rank-local fact (bad data) gives every rank the same decision."""
        if self.reducer is None:
            return flag
        device = self.state.params[0].device
        return not bool(self.reducer.all_true([torch.tensor(not flag, device=device)])[0])

    def weights_finite(self) -> bool:
        """Whether every parameter is finite (on every rank when distributed): one read."""
        params = [local(p.detach()) for p in self.state.params]
        ok = self.B.all_finite(params)
        if self.reducer is not None:
            ok = self.reducer.all_true([ok])[0]
        return bool(self.B.read(self.B.stack([ok], "float64"))[0])

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
            if self.reducer is None:
                weights_ok = self.B.all_finite(new)
                ratio = update_ratio(self.B, new, self._undo._params)
            else:  # the same check on every rank: one more all-reduce, only when updates are verified
                weights_ok = self.B.all_finite([local(p) for p in new])
                dev = new[0].device
                d_sq = TorchReducer.sumsq(torch._foreach_sub(new, self._undo._params), dev)
                w_sq = TorchReducer.sumsq(self._undo._params, dev)
                vec = self.reducer.all_reduce([~weights_ok, *d_sq, *w_sq])
                w = self.reducer.world
                weights_ok = vec[0] == 0
                ratio = torch.sqrt(vec[1] + vec[2] / w) / (torch.sqrt(vec[3] + vec[4] / w) + 1e-12)
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
        if keep and self.reducer is not None:
            # The overflow verdict was taken across ranks: every rank's scaler backs off alike,
            # even one whose own gradients were finite (else the scales drift apart).
            for found in scaler._found_inf_per_device(self.state.optimizer).values():
                found.fill_(1.0)
        scaler.update()
        if saved is not None:
            scaler.load_state_dict(saved)

    def zero_grad(self) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)

