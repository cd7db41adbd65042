"""The sync-free guarded step (``TorchGuard(..., sync_free=True)``): no host sync on a GPU.

The synchronous step (:mod:`~stabilize.integrations.torch_step`) reads its
numbers from the device once per step, before it commits: a host sync that
stalls the CPU until the GPU catches up, so the next step's kernels are queued
late. Here the step is decided and committed on the device, and its numbers
are read one step later, when they are long done:

1. on the device: the global norm (one pass, :func:`~stabilize.backends.torch.global_l2`), and
   ``ok = finite(loss) & finite(norm) & finite(buffers) & ~spike``;
2. clipping by a device-side coefficient ``min(max/(norm+1e-6), 1)`` (the same
   float32 formula as the synchronous step; multiplying by 1.0 is exact);
3. commit, **selecting**, never multiplying by a 0/1 factor (NaN * 0 is NaN: a
   "skipped" update written as ``update * ok`` still corrupts Adam's moments;
   OLMo-core's skip-step optimizer has that form):

   * a fused optimizer (``torch.optim.Adam/AdamW/SGD(..., fused=True)``) gets
     ``found_inf = ~ok``, the flag its kernel already honours for GradScaler:
     parameters, moments and step count are left untouched when it is set;
   * any other optimizer: the parameters and tensor state are copied into
     buffers allocated once, the optimizer steps, and ``torch.where(ok, new,
     old)`` selects per tensor. Its state must live on the parameters'
     device (``Adam(capturable=True)``, or ``fused=True``): a CPU step count
     would need a sync to select;
   * the buffers a forward pass changed (BatchNorm statistics) are selected
     back the same way;
4. the numbers go to pinned host memory with a non-blocking copy and a CUDA
   event; the next step reads them after the event has completed (polled,
   never a blocking wait), and only then the supervisor decides what follows
   (back-off, raise, spike statistics): before that next update is queued, so
   the back-off still applies to the very next update, exactly as in the
   synchronous step.

What needs the verdict before the next update cannot run here, and is refused
up front: a ``GradScaler`` (its ``step`` reads ``found_inf`` on the host),
``rollback`` and ``spike="rewind"`` (a restore must follow the bad step),
``verify_updates`` and ``max_update_ratio``, and several ranks. The RNG draws
of a skipped step are not given back. ``step()`` returns the device flag
``applied`` (a 0-d bool tensor: ``bool()`` of it is a sync).
"""

from __future__ import annotations

import math
import time

import torch

from ..backends.torch import global_l2
from ..guard.snapshots import nbytes
from ..guard.stats import check_names, from_values
from .torch_step import check_loss, clamp

__all__ = ["DeferredStep"]

# The order of the step's vector read one step late: StepStats fields by name.
NAMES = check_names(("loss", "grad_norm", "committed", "buffers_finite", "spike", "data_finite"))


class DeferredStep:
    """A guarded torch step committed on the device; its statistics are read one step late."""

    def __init__(self, state, settings):
        # What this step cannot take is refused by TorchGuard from the one table (guard/entries.py).
        self.state, self.settings = state, settings
        opt = state.optimizer
        self.masked = bool(getattr(opt, "_step_supports_amp_scaling", False)) and \
            all(g.get("fused") for g in opt.param_groups)
        self.limits = None
        self._losses: list[torch.Tensor] = []
        self._pending: list[tuple] = []  # (host values, event, lr) of steps not yet read
        self._old: list[torch.Tensor] | None = None  # select mode: pre-step copies, allocated once

    def backward(self, loss) -> None:
        loss = check_loss(loss)
        self._losses.append(loss.detach())
        loss.backward()

    # -- one step on the device ---------------------------------------------------------
    def step(self, rate, batch=None) -> torch.Tensor:
        """Decide and commit on the device; ``rate(lr) -> lr`` maps each group's rate to the one this
        update uses (the back-off), put back right after. ``batch``: its tensors are checked on the
        device too (policy ``auto`` skips bad data without backing off). Returns the device flag ``applied``."""
        st, s = self.state, self.settings
        if not self._losses:
            raise RuntimeError("no loss was backpropagated since the last step: call backward(loss) first")
        losses, self._losses = self._losses, []
        grads = [p.grad for p in st.params if p.grad is not None]
        with torch.no_grad():
            loss = losses[0].double() if len(losses) == 1 else torch.stack([x.double() for x in losses]).sum()
            dev = loss.device
            norm = global_l2(grads, dev)
            current = norm
            if s.clip_value is not None and grads:
                clamp(grads, s.clip_value)
                current = global_l2(grads, dev)
            ok = torch.isfinite(loss) & torch.isfinite(norm)
            buffers_ok = st.buffers_finite() if st.has_float_buffers else torch.ones((), dtype=torch.bool, device=dev)
            ok &= buffers_ok
            spike = torch.zeros((), dtype=torch.bool, device=dev)
            limits = self.limits() if self.limits is not None else None
            bound = s.clip_norm
            if limits is not None:
                spike = ok & ((loss > limits[0]) | (norm > limits[1]))
                if s.spike == "skip":
                    ok &= ~spike
                elif s.spike == "clip":  # ZClip: the bound is the limit on a spiking step
                    clip_at = limits[1] if bound is None else min(bound, limits[1])
                    usual = _full(bound if bound is not None else math.inf, dev)
                    bound_t = torch.where(spike, _full(clip_at, dev), usual)
                    self._clip(grads, current, bound_t)
                    bound = None
            if bound is not None and grads:
                self._clip(grads, current, _full(bound, dev))
            if not s.guarded:
                ok = torch.ones((), dtype=torch.bool, device=dev)
            self._commit(ok, rate)
            data_ok = _all_finite(batch, dev)
            values = torch.stack([loss, norm, ok.double(), buffers_ok.double(), spike.double(), data_ok.double()])
            self._post(values, rate(float(st.optimizer.param_groups[0]["lr"])))
        return ok

    @staticmethod
    def _clip(grads, current, bound):
        """``g *= min(bound/(current+1e-6), 1)`` in float32, as the synchronous step; 1.0 where the
        norm is not finite (the step is then not committed anyway)."""
        coef = bound.float() / (current.float() + 1e-6)
        coef = torch.where(torch.isfinite(current) & (coef < 1.0), coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef)

    def _commit(self, ok, rate):
        st = self.state
        opt = st.optimizer
        user = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = rate(g["lr"])
        try:
            if self.masked:
                opt.found_inf = (~ok).float()  # honoured inside the fused kernel: nothing moves when set
                opt.grad_scale = None
                try:
                    opt.step()
                finally:
                    del opt.found_inf, opt.grad_scale
            else:
                self._select_step(ok)
        finally:
            for g, rate in zip(opt.param_groups, user):
                g["lr"] = rate
        st.select_forward(ok)

    def _select_step(self, ok):
        st = self.state
        tensors = self._tensors()
        if self._old is None or len(self._old) != len(tensors):
            self._old = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self._old, [t.detach() for t in tensors])
        fresh = [p for p in st.params if p.grad is not None and not st.optimizer.state.get(p)]
        st.optimizer.step()
        if fresh:
            # This update created optimizer state, which has no "before" to select: its verdict is read
            # now (one sync, on the first step only), and state a bad step created is dropped.
            if not bool(ok):
                for p in fresh:
                    st.optimizer.state.pop(p, None)
            self._tensors()  # refuse state that a later select could not handle, now
        for t, old in zip(tensors, self._old):
            t.copy_(torch.where(ok, t, old))

    def _tensors(self) -> list[torch.Tensor]:
        st = self.state
        out = [p.data for p in st.params]
        for p in st.params:
            for value in st.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    _check_device(value, p.device)
                    out.append(value)
        return out

    def held_bytes(self) -> int:
        """Bytes kept across steps: the buffers a skipped step selects back, the pre-step copies."""
        return self.state.held_bytes() + nbytes(self._old or [])

    # -- one step late --------------------------------------------------------------------
    def _post(self, values, lr):
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        event = None
        if values.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, event, lr))

    def collect(self) -> list[dict]:
        """The statistics of every step posted so far, in order (waits, without a sync, for the
        copies to land; they were queued a step ago and are normally done)."""
        out = []
        for host, event, lr in self._pending:
            if event is not None:
                while not event.query():  # polling is not a stream sync
                    time.sleep(0)
            stats = from_values(NAMES, host.tolist(), lr=lr, loss_scale=1.0)
            stats["loss_finite"] = float(math.isfinite(stats["loss"]))
            stats["grads_finite"] = float(math.isfinite(stats["grad_norm"]))
            out.append(stats)
        self._pending.clear()
        return out


def _all_finite(batch, device) -> torch.Tensor:
    """Whether every floating tensor of ``batch`` (nested tuples, lists, dicts) is finite, on the device."""
    leaves, todo = [], [batch]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif torch.is_tensor(item) and item.is_floating_point() and item.numel():
            leaves.append(torch.isfinite(item).all())
    return torch.stack(leaves).all() if leaves else torch.ones((), dtype=torch.bool, device=device)


def _full(value: float, device) -> torch.Tensor:
    """A float32 scalar on the device by a fill kernel (``torch.tensor(value, device=...)`` would copy
    from pageable host memory: a sync)."""
    return torch.full((), value, dtype=torch.float32, device=device)


def _check_device(t, device):
    if t.device != device:
        raise ValueError("sync_free=True selects the optimizer state on the device, and this optimizer keeps a "
                         "0-d state tensor (its step count) on the CPU: build it with fused=True (Adam, AdamW, SGD) "
                         "or capturable=True")
