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
from typing import NamedTuple

import numpy as np
import torch

from ..guard.settings import GuardSettings
from ..guard.stats import row, scaler_overflow
from ..backends.torch import global_l2
from ..registry import get_backend
from ..distributed import combine
from ..step import update_ratio
from .torch_distributed import TorchReducer, local
from .torch_state import TorchState, UpdateUndo

__all__ = ["TorchStep", "Verdict", "check_loss"]


class Verdict(NamedTuple):
    """What :meth:`TorchStep.check` found, before anything is applied (``TorchGuard.check`` returns it).

    Attributes:
        ok: the step is good: the loss, the gradient norm and the module buffers are finite (on
            every rank), and no spike is held back (``spike="skip"``).
        applies: :meth:`TorchStep.commit` will apply the update: ``ok``, or the policy is
            ``"ignore"``. An update checked afterwards (``verify_updates``) may still be undone.
        stats: the step's numbers, as floats: ``loss`` (the sum over the micro-batches),
            ``grad_norm`` (the global L2 norm before clipping), ``loss_finite``,
            ``grads_finite``, ``buffers_finite``, ``spike`` (1.0 / 0.0), ``lr`` (the rate the
            update uses, backed off), ``loss_scale``, ``scaler_skip``, and with spike detection
            ``loss_max`` / ``norm_max``.
        grads, current, limits: for :meth:`TorchStep.commit`: the gradients, their norm after
            ``clip_value``, the spike limits.
    """

    ok: bool
    applies: bool
    stats: dict
    grads: list
    current: float
    limits: tuple | None


def clamp(grads, bound) -> None:
    """Clamp every gradient element to ``[-bound, bound]`` in place (``clip_value``)."""
    torch._foreach_clamp_min_(grads, -bound)  # clamping keeps NaN
    torch._foreach_clamp_max_(grads, bound)


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
        self.micro_finite: list[bool] | None = None  # a failed accumulated step: each micro-batch loss finite?
        # ``limits() -> (loss_max, norm_max) | None``: the spike detector's bounds for this step
        # (the Supervisor's ``spike_limits``), compared on the device inside the one read.
        self.limits = None

    def backward(self, loss) -> None:
        """Backward one (micro-)batch loss, scaled by the ``GradScaler`` if there is one."""
        loss = check_loss(loss)
        self._losses.append(loss.detach().reshape(()))
        scaler = self.state.scaler
        if self.reducer is None:
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return
        with self.reducer.guarding("backward (DDP's gradient all-reduce)"):  # a dead rank: RankLostError
            (scaler.scale(loss) if scaler is not None else loss).backward()

    def record(self, loss) -> None:
        """Count a (micro-)batch loss whose backward the caller (a framework) has already run."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            check_loss(loss)  # the same clear errors as for backward
        self._losses.append(loss.detach().reshape(()))

    @property
    def pending(self) -> bool:
        """Whether a loss was backpropagated (or recorded) since the last step."""
        return bool(self._losses)

    def step(self, rate=None, before_unguarded=None) -> dict[str, float]:
        """Check the accumulated gradients and commit or discard; returns the step's statistics.

        ``rate(lr) -> lr``, when given, maps each group's own rate (the user's or
        the scheduler's) to the one this update uses (the back-off); the group's
        rate is put back right after, so a scheduler never sees it changed.
        ``before_unguarded(stats)`` is called when a bad step is about to be
        applied anyway (policy ``ignore``), while the weights are still the
        pre-step ones: the diagnosis runs there, and nothing is copied.
        """
        return self.commit(self.check(rate), rate, before_unguarded)

    def check(self, rate=None) -> "Verdict":
        """Measure the accumulated gradients and the losses (the step's one read) and decide; nothing
        is applied or put back yet (:meth:`commit`, :meth:`discard`)."""
        st, s = self.state, self.settings
        if not self._losses:
            raise RuntimeError("no loss was backpropagated since the last step: call backward(loss) first")
        losses, self._losses = self._losses, []
        scaler = st.scaler
        if scaler is not None:
            scaler.unscale_(st.optimizer)
        grads = [p.grad for p in st.params if p.grad is not None]
        with torch.no_grad():
            loss = losses[0] if len(losses) == 1 else torch.stack([l.float() for l in losses]).sum()
            values = self._measure(loss, grads)
        loss_v, norm, current, loss_ok, buffers_ok, scale = values
        grads_ok = math.isfinite(norm)
        loss_ok = loss_ok and math.isfinite(loss_v)
        limits = self.limits() if self.limits is not None else None
        spike = limits is not None and loss_ok and grads_ok and (loss_v > limits[0] or norm > limits[1])
        ok = loss_ok and grads_ok and buffers_ok and not (spike and s.spike in ("skip", "rewind"))
        base = float(st.optimizer.param_groups[0]["lr"])
        stats = {"loss": loss_v, "grad_norm": norm, "loss_finite": float(loss_ok), "grads_finite": float(grads_ok),
                 "buffers_finite": float(buffers_ok), "spike": float(spike), "weights_finite": 1.0,
                 "loss_scale": scale, "lr": float(rate(base)) if rate is not None else base,
                 # A scaler's own overflow (the one rule: non-finite gradients, a finite loss, the scale
                 # still above the floor); a finite spike held back is the policy's, never the scaler's.
                 "scaler_skip": float(scaler is not None and not ok
                                      and scaler_overflow(loss_ok, grads_ok, buffers_ok, scale, s.min_loss_scale))}
        if limits is not None:
            stats["loss_max"], stats["norm_max"] = limits
        # A failed step of several micro-batches: which ones had a non-finite loss (one read, only now),
        # so that a diagnosis never replays a micro-batch that cannot show the fault.
        self.micro_finite = [bool(v) for v in torch.isfinite(torch.stack([x.double() for x in losses])).tolist()] \
            if not ok and len(losses) > 1 else None
        return Verdict(ok, ok or not s.guarded, stats, grads, current, limits)

    def commit(self, verdict: "Verdict", rate=None, before_unguarded=None) -> dict[str, float]:
        """Carry out ``verdict``: clip and update when it applies, else put back what the forward
        pass changed; returns the step's statistics with ``committed``."""
        st, s = self.state, self.settings
        stats, grads, current, limits = dict(verdict.stats), verdict.grads, verdict.current, verdict.limits
        ok, commit, spike = verdict.ok, verdict.applies, stats["spike"] == 1.0
        if not ok and commit and before_unguarded is not None:
            before_unguarded(stats)
        bound = s.clip_norm
        if spike and s.spike == "clip":  # ZClip: clip to the running mean + z * std
            bound = limits[1] if bound is None else min(bound, limits[1])
        if commit and bound is not None and grads and math.isfinite(current):
            coef = float(np.float32(bound) / (np.float32(current) + np.float32(1e-6)))
            if coef < 1.0:
                torch._foreach_mul_([local(g) for g in grads], coef)
        if commit:
            commit = self._update(stats, rate)
        elif st.scaler is not None:
            self._scaler_update(keep=stats["scaler_skip"] == 1.0)
        if not commit and s.guarded:
            st.undo_forward()
        else:
            st.mark()
        stats["committed"] = float(commit)
        return row(stats)

    def discard(self) -> None:
        """Drop the step: no update; the gradients and recorded losses go, and the buffers and RNG
        the forward pass changed are put back. With a ``GradScaler``, its step is not closed."""
        self._losses.clear()
        self.state.undo_forward()
        self.zero_grad()

    def _measure(self, loss, grads) -> tuple:
        """The step's numbers in one read from the device: ``(loss, norm, current, loss_ok,
        buffers_ok, scale)``. ``norm`` is the global L2 norm of the gradients (``current``: after
        ``clip_value``), partial norms in one pass combined in float64
        (:func:`~stabilize.backends.torch.global_l2`); it is non-finite exactly when a gradient
        is. With ranks, one all-reduce comes first."""
        s, st = self.settings, self.state
        scaled = st.scaler is not None and st.scaler.is_enabled()
        clamps = s.clip_value is not None and bool(grads)  # not ``clamp``: that is the helper called below
        dev = loss.device
        if self.reducer is not None:  # every number below is then the same on every rank
            pre = cur = TorchReducer.sumsq(grads, dev)
            if clamps:
                clamp([local(g) for g in grads], s.clip_value)  # the local shards, in place
                cur = TorchReducer.sumsq(grads, dev)
            vec = self.reducer.all_reduce([loss, ~torch.isfinite(loss), ~st.buffers_finite(), *pre, *cur])
            loss, norm, current, loss_ok, _, buffers_ok = combine(vec, self.reducer.world, torch.sqrt, torch.isfinite)
            parts = [loss, norm, current, loss_ok, buffers_ok]
        else:  # the flags are read from the numbers themselves: fewer kernels, the same verdict
            norm = current = global_l2(grads, dev)
            if clamps:
                clamp(grads, s.clip_value)
                current = global_l2(grads, dev)
            parts = [loss, norm, current] if clamps else [loss, norm]
            if st.has_float_buffers:
                parts.append(st.buffers_finite())  # BatchNorm statistics the forward pass just wrote
        if scaled:
            parts.append(st.scaler._get_scale_async())
        out = self.B.read(torch.stack([p if p.dtype == torch.float64 else p.to(torch.float64) for p in parts]))
        scale = out.pop() if scaled else 1.0
        if self.reducer is not None:
            return out[0], out[1], out[2], out[3] == 1.0, out[4] == 1.0, scale
        current = out[2] if clamps else out[1]
        buffers_ok = out[-1] == 1.0 if st.has_float_buffers else True
        return out[0], out[1], current, True, buffers_ok, scale


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

    def held_bytes(self) -> int:
        """Bytes kept across steps: the buffers a skipped step puts back, and the undo copy of
        the parameters and optimizer state when updates are verified."""
        return self.state.held_bytes() + (self._undo.held_bytes() if self._undo is not None else 0)

    def zero_grad(self) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)

