"""``TorchGuard``: guard a hand-written torch loop, one call per optimizer step.

A thin adapter: the step is :class:`~stabilize.integrations.torch_step.TorchStep`
over a :class:`~stabilize.integrations.torch_state.TorchState`, the decisions
are the :class:`~stabilize.guard.supervisor.Supervisor`'s, exactly as in
``StabilityTrainer``.
"""

from __future__ import annotations

import contextlib

import logging
import sys

import torch

from ..data import batch_finite
from ..guard.settings import GuardSettings
from ..guard.snapshots import SnapshotStore
from ..guard.supervisor import Supervisor
from ..history import History
from .torch_state import Snapshot, TorchState, optimizer_params
from .torch_deferred import DeferredStep
from .torch_step import TorchStep

__all__ = ["TorchGuard", "check_model_and_optimizer"]

logger = logging.getLogger("stabilize")


def check_model_and_optimizer(model, optimizer) -> None:
    """Clear errors for what the guard cannot work with."""
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        raise TypeError("TorchGuard guards torch models; for a keras model use stabilize.keras_guard(optimizer)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the model's parameters, "
                        f"got {type(optimizer).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    own = {id(p) for p in model.parameters()}
    foreign = [p for p in optimizer_params(optimizer) if id(p) not in own]
    if foreign:
        raise ValueError(f"the optimizer holds {len(foreign)} parameter(s) that are not the model's: build it "
                         f"over this model's parameters, e.g. torch.optim.Adam(model.parameters())")


class TorchGuard:
    """Guard a hand-written torch loop: a bad step is never applied, and changes nothing.

    Example:
        >>> import torch, stabilize
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = stabilize.TorchGuard(model, opt, clip_norm=1.0, on_nonfinite="backoff")
        >>> x, y = torch.randn(8, 2), torch.full((8, 1), float("nan"))
        >>> guard.step(torch.nn.functional.mse_loss(model(x), y))
        False
        >>> guard.history.events[0].action
        'backed-off'

    ``guard.step(loss)`` replaces ``loss.backward(); optimizer.step();
    optimizer.zero_grad()``. With gradient accumulation, call
    ``guard.backward(loss)`` for each micro-batch and ``guard.step(loss)`` for
    the last: the check happens once, at the optimizer step. Keep a scheduler in
    step with ``if guard.step(loss): scheduler.step()``.

    A step that is not applied leaves the parameters, the optimizer state, the
    module buffers (BatchNorm statistics), the RNG and the loss scaler as they
    were before the step's forward pass.

    Args:
        model, optimizer: what is trained; the optimizer must hold only the model's parameters.
        scaler: a ``torch.amp.GradScaler``; the guard scales, unscales and steps
            through it. Its own overflow skips are recorded as ``"scaler"``
            events, not failures.
        scheduler: optional, so that a rollback restores its state too.
        restore_rng: a step that is not applied gives back the RNG draws made
            since the last applied step (Dropout, and anything else drawn in
            between), so a faulted run equals the run without that batch. With
            several guards on one RNG (a GAN), pass False: one guard's skip
            would otherwise rewind the other's draws.
        verify_updates: check every applied update (weights finite, and
            ``max_update_ratio``) and undo it exactly if bad; costs a copy of
            the parameters and optimizer state per step. Without it, weights an
            update broke are restored from the last snapshot (the event says how
            many steps that loses) under ``on_nonfinite="rollback"``; under the
            other policies the run stops there (no snapshot is held).
        sync_free: decide and commit on the device, read the statistics one step
            late: no host sync per step on a GPU (:mod:`~stabilize.integrations.torch_deferred`).
            :meth:`step` then returns a 0-d device bool (``bool()`` of it syncs); the
            last step is read by :meth:`flush` (``history`` flushes too). Needs no
            GradScaler, rollback, rewind, update checks or ranks; a fused optimizer
            (``fused=True``) skips inside its kernel, others are selected per tensor.
        loss_fn: ``loss_fn(pred, target)``; with ``batch=(x, y)`` given to
            :meth:`step`, the first bad step is replayed and diagnosed.
        process_group: with torch.distributed, the group whose ranks decide
            together (default: the default group). Every decision (skip,
            back-off, rollback, raise, the clip coefficient) is then the same
            on every rank; only rank 0 prints.
        **settings: :class:`~stabilize.guard.settings.GuardSettings` (clip_norm,
            clip_value, on_nonfinite, backoff_factor, min_lr, grow_after,
            max_bad_steps, max_rollbacks, snapshot_every, snapshot_to, snapshot_path, max_update_ratio,
            min_loss_scale, distributed, spike, spike_z, spike_warmup, spike_alpha, skip_alarm,
            skip_alarm_fraction, skip_alarm_window, events_path).
    """

    def __init__(self, model=None, optimizer=None, *, scaler=None, scheduler=None, verify_updates=False,
                 restore_rng=True, loss_fn=None, process_group=None, sync_free=False, **settings):
        if model is None or optimizer is None:
            raise TypeError("TorchGuard needs the model and its optimizer: TorchGuard(model, optimizer, **settings), "
                            "then guard.step(loss) in the loop")
        check_model_and_optimizer(model, optimizer)
        self.settings = GuardSettings(**settings)
        if self.settings.spike == "rewind":  # the guard does not own the data loop
            raise ValueError("spike='rewind' leaves batches out, which needs StabilityTrainer's data loop; "
                             "use spike='skip' or 'clip' with TorchGuard")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.state = TorchState(model, optimizer, scheduler=scheduler, scaler=scaler, restore_rng=restore_rng)
        self._step = TorchStep(self.state, self.settings, verify_updates=verify_updates, group=process_group)
        self.supervisor = Supervisor(self.settings)
        self._step.limits = self.supervisor.spike_limits
        self._deferred = None
        if sync_free:
            if verify_updates:
                raise ValueError("sync_free=True cannot be combined with verify_updates (each update is read "
                                 "back before it stays): use one or the other")
            self._deferred = DeferredStep(self.state, self.settings)
            self._deferred.limits = self.supervisor.spike_limits
        # The rollback snapshot, held only when the policy can restore it (guard/snapshots.py).
        self._snapshots = SnapshotStore(self.settings, lambda where: self.state.capture(where=where),
                                        self.state.restore, Snapshot._make)
        self.state.mark()  # a forward pass from here on can be undone

    @property
    def history(self) -> History:
        self.flush()
        return self.supervisor.history()

    def flush(self) -> None:
        """``sync_free``: read and judge the steps not yet read (call after the loop; raises
        ``NonFiniteError`` as the next step would have). Without ``sync_free``: nothing to do."""
        if self._deferred is None:
            return
        for stats in self._deferred.collect():
            bad_data = stats["committed"] != 1.0 and stats.pop("data_finite") != 1.0
            decision = self.supervisor.observe(stats, epoch=0, batch=self.supervisor.step, bad_data=bad_data)
            if decision.stop:
                self._step.zero_grad()
                self.supervisor.raise_for(decision)

    @property
    def lr(self) -> float:
        """The rate the next update uses (the optimizer's own rate, backed off)."""
        return self.supervisor.lr(float(self.optimizer.param_groups[0]["lr"]))

    def backward(self, loss) -> None:
        """Backward one micro-batch of an accumulated step (no update)."""
        (self._deferred or self._step).backward(loss)

    def step(self, loss=None, model=None, optimizer=None, batch=None) -> bool:
        """Backward ``loss`` (if given), check, and step only if the step is good. Returns whether it was applied."""
        if (model is not None and model is not self.model) or (optimizer is not None and optimizer is not self.optimizer):
            raise ValueError("this guard was built for another model or optimizer; build one TorchGuard per optimizer")
        if self.supervisor.keeps_snapshot and not self._snapshots.held:
            self._take_snapshot()
        if self._deferred is not None:  # decided on the device; the last step's numbers judged now
            if loss is not None:
                self._deferred.backward(loss)
            self.flush()
            applied = self._deferred.step(self.supervisor.lr, batch)
            self._step.zero_grad()
            return applied
        if loss is not None:
            self._step.backward(loss)
        sup = self.supervisor
        stats = self._step.step(sup.lr)
        if stats["committed"] != 1.0 and (stats["loss_finite"] != 1.0 or stats["grads_finite"] != 1.0) \
                and stats["scaler_skip"] != 1.0 and not self._weights_finite():
            stats["weights_broken"] = 1.0  # only now, on a failed step: did an earlier update break the weights?
        bad_data = stats["committed"] != 1.0 and batch is not None and \
            self._step.on_any_rank(not batch_finite(self._step.B, *batch))
        diagnose = (lambda: self._diagnose(batch, stats)) if batch is not None and self.loss_fn is not None else None
        decision = sup.observe(stats, epoch=0, batch=sup.step, bad_data=bad_data, diagnose=diagnose)
        if decision.action not in ("applied", "scaler-skip") and sup.diagnosis is None and batch is not None \
                and self.loss_fn is not None:
            self._diagnose(batch, stats)
        if decision.restore:
            self._snapshots.restore()
        if decision.snapshot and (self._step.verify or self._weights_finite()):  # never keep weights an update broke
            self._take_snapshot()
        self._step.zero_grad()
        if decision.stop:
            sup.raise_for(decision)
        return stats["committed"] == 1.0

    # -- durable state ---------------------------------------------------------------
    def save_checkpoint(self, path, **position):
        """Save the whole training state to ``path`` atomically (:mod:`stabilize.checkpoint`).

        Model parameters and buffers, optimizer, scheduler, loss scaler, the
        policy's counters and the history, every RNG (torch, numpy, Python),
        and ``position``: whatever names your place in the data (``epoch=...,
        batch=...``), returned by :meth:`load_checkpoint`. With several ranks,
        call it on every rank with a per-rank path (or only on rank 0 for DDP,
        whose replicas are identical).
        """
        from ..checkpoint import save
        from .torch_state import checkpoint_state

        self.flush()  # sync_free: the last step's statistics belong to the saved history

        state = {"torch": checkpoint_state(self.state), "supervisor": self.supervisor.state_dict(),
                 "position": position}
        return save(path, state, meta={"kind": "TorchGuard", "steps": self.supervisor.step})

    def load_checkpoint(self, path) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns its ``position``.

        A missing, truncated or corrupted file, or one from another model,
        raises :class:`~stabilize.checkpoint.CheckpointError` and leaves the
        live state untouched.
        """
        from ..checkpoint import load
        from .torch_state import load_checkpoint_state

        saved = load(path)
        load_checkpoint_state(self.state, saved["torch"], f"checkpoint {str(path)!r}")
        self.supervisor.load_state_dict(saved["supervisor"])
        self._snapshots.clear()
        if self.supervisor.keeps_snapshot:
            self._take_snapshot()
        return dict(saved["position"])

    def held_bytes(self) -> int:
        """Bytes the guard holds in memory across steps: the rollback snapshot (only under
        ``rollback``), the buffers a skipped step puts back, and with ``verify_updates`` the undo copy."""
        return self._snapshots.held_bytes() + (self._deferred or self._step).held_bytes()

    def _take_snapshot(self) -> None:
        self._snapshots.take()
        self.supervisor.snapshot_taken()

    def _weights_finite(self) -> bool:
        return self._step.weights_finite()  # reduced across ranks when distributed

    @contextlib.contextmanager
    def explain_errors(self, batch):
        """Wrap a step's forward and loss: an exception raised there (a label or an id out of
        range raises ``IndexError`` on the CPU) gets the diagnosis of a replay of ``batch``
        (``(x, y)``, with the guard's ``loss_fn``) as a note naming the values and rows.

        Example::

            with guard.explain_errors((x, y)):
                loss = loss_fn(model(x), y)
            guard.step(loss, batch=(x, y))
        """
        try:
            yield
        except Exception as exc:
            if self.loss_fn is not None:
                self.state.undo_forward()
                try:
                    self.supervisor.explain(exc, self._step.B, self.model, self.loss_fn, *batch, self.state.params,
                                            lr=self.lr, optimizer=self.optimizer)
                finally:
                    self.state.undo_forward()
            raise

    def _diagnose(self, batch, stats):
        x, y = batch
        try:
            self.supervisor.diagnose(self._step.B, self.model, self.loss_fn, x, y, self.state.params,
                                     optimizer=self.optimizer)
        finally:
            self.state.undo_forward()  # the replay's forward pass changed buffers and RNG
