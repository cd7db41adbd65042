"""``TorchGuard``: guard a hand-written torch loop, one call per optimizer step.

A thin adapter: the step is :class:`~stabilize.integrations.torch_step.TorchStep`
over a :class:`~stabilize.integrations.torch_state.TorchState`, the decisions
are the :class:`~stabilize.guard.supervisor.Supervisor`'s, exactly as in
``StabilityTrainer``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import numbers
import sys

import torch

from ..data import batch_finite
from ..guard.settings import GuardSettings
from ..guard.driver import HostDriver, wants_diagnosis
from ..guard.entries import check_keywords, refuse
from ..guard.snapshots import SnapshotStore
from ..guard.supervisor import Supervisor
from ..history import History
from .torch_state import Snapshot, TorchState, optimizer_params
from .torch_deferred import DeferredStep
from .torch_step import TorchStep, Verdict
from ..names import settings_for

__all__ = ["TorchGuard", "check_model_and_optimizer", "check_scheduler"]

logger = logging.getLogger("stabilize")


# TorchGuard's own arguments besides the settings (for the closest-name hint of a wrong keyword).
_OWN = ("scaler", "scheduler", "verify_updates", "restore_rng", "loss_fn", "process_group", "sync_free")


def _ranks() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def check_scheduler(scheduler, optimizer) -> None:
    """``scheduler=`` is None or a torch scheduler built over ``optimizer``."""
    if scheduler is None:
        return
    if not isinstance(scheduler, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        raise TypeError(f"scheduler must be a torch.optim.lr_scheduler scheduler of this optimizer (or None), got "
                        f"{type(scheduler).__name__} {scheduler!r:.60}; e.g. scheduler=torch.optim.lr_scheduler."
                        f"StepLR(optimizer, step_size=10)")
    if scheduler.optimizer is not optimizer:
        raise ValueError("the scheduler was built for another optimizer: build it over the optimizer given to "
                         "TorchGuard")


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

    The step in two halves, for a loop that must act between them: ``verdict =
    guard.check(loss)`` reads the loss, the gradient norm and the buffers once
    and decides (a :class:`~stabilize.integrations.torch_step.Verdict`:
    ``ok``, ``applies``, ``stats``); ``guard.commit(verdict)`` carries it out
    under the policy, or ``guard.discard()`` drops the step. Where a framework
    has run the backward pass already (Lightning's ``manual_backward``,
    accelerate's ``backward``), ``guard.step(loss, backward=False)``.
    ``epoch=`` and ``batch=`` name the step's place in the events.

    A step that is not applied leaves the parameters, the optimizer state, the
    module buffers (BatchNorm statistics), the RNG and the loss scaler as they
    were before the step's forward pass.

    Args:
        model, optimizer: what is trained; the optimizer must hold only the model's parameters.
        scaler: a ``torch.amp.GradScaler``; the guard scales, unscales and steps
            through it. Its own overflow skips are recorded as ``"scaler"``
            events, not failures.
        scheduler: a ``torch.optim.lr_scheduler`` scheduler of this optimizer, so that a
            rollback and a checkpoint restore it too. As in ``StabilityTrainer(scheduler=)``
            it is stepped once per *applied* step: here your loop does that,
            ``if guard.step(loss): scheduler.step()`` (the guard never steps it).
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
        check_scheduler(scheduler, optimizer)
        check_keywords("TorchGuard", settings, _OWN)
        self.settings = GuardSettings(**settings_for("torch", settings, "TorchGuard"))
        values = dict(dataclasses.asdict(self.settings), scaler=scaler, verify_updates=verify_updates, ranks=_ranks())
        refuse("TorchGuard", values, settings)  # the one table (guard/entries.py)
        if sync_free:
            refuse("TorchGuard(sync_free)", values, settings, lead="sync_free=True cannot be combined with")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.state = TorchState(model, optimizer, scheduler=scheduler, scaler=scaler, restore_rng=restore_rng)
        self._step = TorchStep(self.state, self.settings, verify_updates=verify_updates, group=process_group)
        self.supervisor = Supervisor(self.settings)
        self._step.limits = self.supervisor.spike_limits
        self._deferred = None
        self._deferred_at: collections.deque = collections.deque()  # sync_free: (epoch, batch) of unread steps
        self._verdict = None  # (verdict, epoch, batch, data) of a check not yet committed
        if sync_free:
            self._deferred = DeferredStep(self.state, self.settings)
            self._deferred.limits = self.supervisor.spike_limits
        # The rollback snapshot, held only when the policy can restore it (guard/snapshots.py).
        self._snapshots = SnapshotStore(self.settings, lambda where: self.state.capture(where=where),
                                        self.state.restore, Snapshot._make)
        # The host glue (probe, bad data, observe, diagnose, restore/snapshot, stop): guard/driver.py.
        self._driver = HostDriver(self.supervisor, self._snapshots, weights_finite=self._step.weights_finite,
                                  verifies=self._step.verify)
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
            epoch, batch = self._deferred_at.popleft() if self._deferred_at else (None, None)
            decision = self._driver.judge(stats, bad_data=stats["data_finite"] == 0.0, epoch=epoch, batch=batch)
            self._driver.follow(decision, before_stop=self._step.zero_grad)

    @property
    def lr(self) -> float:
        """The rate the next update uses (the optimizer's own rate, backed off)."""
        return self.supervisor.lr(float(self.optimizer.param_groups[0]["lr"]))

    def backward(self, loss) -> None:
        """Backward one micro-batch of an accumulated step (no update)."""
        (self._deferred or self._step).backward(loss)

    def record(self, loss) -> None:
        """Count one micro-batch loss whose backward a framework has already run (no backward here):
        the next :meth:`step`/:meth:`check` with ``loss=None`` judges the sum of the recorded losses."""
        if self._deferred is not None:
            self._deferred._losses.append(loss.detach())
        else:
            self._step.record(loss)

    def step(self, loss=None, model=None, optimizer=None, batch=None, *, backward=True, epoch=None,
             data=None) -> bool:
        """Backward ``loss`` (if given), check, and step only if the step is good. Returns whether it was applied.

        ``backward=False``: the gradients are already computed (Lightning's ``manual_backward``,
        accelerate's ``backward``); ``loss`` is only read. ``epoch`` and ``batch`` (an int) name
        the step's place in the events (default: no epoch, batch = the global step). ``data``:
        the batch's ``(x, y)``, checked on a failed step (policy ``auto`` skips bad data without
        backing off) and, with ``loss_fn``, replayed for the diagnosis; ``batch=(x, y)`` is
        still read as ``data``. The same as :meth:`check` then :meth:`commit`.
        """
        if (model is not None and model is not self.model) or (optimizer is not None and optimizer is not self.optimizer):
            raise ValueError("this guard was built for another model or optimizer; build one TorchGuard per optimizer")
        if self._deferred is not None:  # decided on the device; the last step's numbers judged now
            epoch, batch, data = self._position(epoch, batch, data, read_late=True)
            self._driver.start()
            if loss is not None:
                self._deferred.backward(loss) if backward else self.record(loss)
            self.flush()
            applied = self._deferred.step(self.supervisor.rate(), data)
            self._deferred_at.append((epoch, batch))
            self._step.zero_grad()
            return applied
        return self.commit(self.check(loss, backward=backward, epoch=epoch, batch=batch, data=data))

    def check(self, loss=None, *, backward=True, epoch=None, batch=None, data=None) -> Verdict:
        """Read the loss, the gradient norm and the buffers, and decide, once; nothing applied yet.

        Returns a :class:`~stabilize.integrations.torch_step.Verdict` (``ok``: the
        step is good; ``applies``: :meth:`commit` will apply it; ``stats``: its
        numbers). Follow it with :meth:`commit` (the policy acts: apply, skip,
        back off, roll back or raise) or :meth:`discard` (drop the step; the policy
        is not told). Arguments as for :meth:`step`.

        Example:
            >>> import torch, stabilize
            >>> model = torch.nn.Linear(2, 1)
            >>> guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> verdict = guard.check(model(torch.ones(4, 2)).sum())
            >>> verdict.ok, guard.commit(verdict)
            (True, True)
        """
        if self._deferred is not None:
            raise ValueError("sync_free=True decides on the device: use guard.step(loss), not check/commit")
        if self._verdict is not None:
            raise RuntimeError("the last check was neither committed nor discarded: call guard.commit(verdict) "
                               "or guard.discard() first")
        self._driver.start()
        if loss is not None:
            self._step.backward(loss) if backward else self._step.record(loss)
        verdict = self._step.check(self.supervisor.rate())
        self._verdict = (verdict, *self._position(epoch, batch, data))
        return verdict

    def commit(self, verdict: Verdict) -> bool:
        """Carry out ``verdict`` (from :meth:`check`) under the policy; returns whether the update was applied."""
        if self._verdict is None or self._verdict[0] is not verdict:
            raise RuntimeError("commit() takes the verdict of the last guard.check(), once")
        _, epoch, batch, data = self._verdict
        self._verdict = None
        sup = self.supervisor
        stats = self._step.commit(verdict, sup.rate())
        bad_data = (lambda: self._step.on_any_rank(not batch_finite(self._step.B, data))) if data is not None else False
        replayable = self.loss_fn is not None and isinstance(data, (tuple, list)) and len(data) == 2
        diagnose = (lambda: self._diagnose(data, stats)) if replayable else None  # noqa: E731 - before the policy
        decision = self._driver.judge(stats, bad_data=bad_data, epoch=epoch, batch=batch, diagnose=diagnose)
        if replayable and wants_diagnosis(stats, decision, sup):
            self._diagnose(data, stats)
        self._driver.follow(decision, before_stop=self._step.zero_grad)
        self._step.zero_grad()
        return stats["committed"] == 1.0

    def discard(self) -> None:
        """Drop the step checked (or only backpropagated) since the last one: no update, nothing
        recorded; the gradients go, and the buffers and RNG its forward pass changed are put back."""
        self._verdict = None
        (self._deferred or self._step)._losses.clear()
        self._step.discard()

    def _position(self, epoch, batch, data, read_late=False):
        """``(epoch, batch, data)`` with the defaults of :meth:`step`; ``batch=(x, y)`` read as data.
        ``read_late`` (sync_free): a default batch stays None, to be numbered when the step is read."""
        if batch is not None and not isinstance(batch, numbers.Integral):
            if data is not None:
                raise TypeError("pass the batch's tensors as data=(x, y) and its index as batch=<int>")
            batch, data = None, batch
        if batch is None:
            return (None if epoch is None else int(epoch)), (None if read_late else self.supervisor.step), data
        return (None if epoch is None else int(epoch)), int(batch), data

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
        from .torch_checkpoint import checkpoint_state

        self.flush()  # sync_free: the last step's statistics belong to the saved history

        state = {"torch": checkpoint_state(self.state), "supervisor": self.supervisor.state_dict(),
                 "position": position}
        return save(path, state, meta={"kind": "TorchGuard", "steps": self.supervisor.step})

    def load_checkpoint(self, path) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns its ``position``.

        Everything is verified before anything changes: a missing, truncated
        or corrupted file, one written by something else (``keras_guard``, the
        trainer) or for another model or optimizer raises
        :class:`~stabilize.checkpoint.CheckpointError` naming the file and the
        mismatch, and leaves parameters, buffers, optimizer, scheduler, scaler,
        RNG, counters and history as they were. The event log (``events_path``)
        is rewritten to the checkpoint's events: one record per event across resumes.
        """
        from ..checkpoint import CheckpointError, check_policy_state, load
        from .torch_checkpoint import apply_checkpoint_state, check_checkpoint_state

        where = f"checkpoint {str(path)!r}"
        saved = load(path, kind="TorchGuard", sections={"torch", "supervisor", "position"},
                     reader="TorchGuard.load_checkpoint")
        checked = check_checkpoint_state(self.state, saved["torch"], where)
        check_policy_state(self.settings, saved["supervisor"], where)
        position = saved["position"]
        if not isinstance(position, dict) or not all(isinstance(k, str) for k in position):
            raise CheckpointError(f"{where}: its position is not a dict of names")
        apply_checkpoint_state(self.state, checked, where)
        self.supervisor.load_state_dict(saved["supervisor"])
        if self.supervisor.event_log is not None:
            self.supervisor.event_log.rewrite(self.supervisor.events)
        self._snapshots.clear()
        self._driver.start()
        return dict(position)

    def held_bytes(self) -> int:
        """Bytes the guard holds in memory across steps: the rollback snapshot (only under
        ``rollback``), the buffers a skipped step puts back, and with ``verify_updates`` the undo copy."""
        return self._snapshots.held_bytes() + (self._deferred or self._step).held_bytes()

    @contextlib.contextmanager
    def explain_errors(self, data):
        """Wrap a step's forward and loss: an exception raised there (a label or an id out of
        range raises ``IndexError`` on the CPU) gets the diagnosis of a replay of ``data``
        (``(x, y)``, with the guard's ``loss_fn``) as a note naming the values and rows.

        Example::

            with guard.explain_errors((x, y)):
                loss = loss_fn(model(x), y)
            guard.step(loss, data=(x, y))
        """
        try:
            yield
        except Exception as exc:
            if self.loss_fn is not None:
                self.state.undo_forward()
                try:
                    self.supervisor.explain(exc, self._step.B, self.model, self.loss_fn, *data, self.state.params,
                                            lr=self.lr, optimizer=self.optimizer)
                finally:
                    self.state.undo_forward()
            raise

    def _diagnose(self, batch, stats):
        """Replay ``batch`` from the pre-step weights; under gradient accumulation, when an earlier
        micro-batch had the non-finite loss and ``batch`` (the last one) did not, the replay could not
        show the fault: the diagnosis says so instead of blaming the micro-batch it was given."""
        micro = self._step.micro_finite
        if micro is not None and micro[-1] and not all(micro):
            self.supervisor.diagnosis = earlier_micro_batch(self.supervisor.step - 1, micro)
            logger.warning(self.supervisor.diagnosis.line())
            return
        x, y = batch
        try:
            self.supervisor.diagnose(self._step.B, self.model, self.loss_fn, x, y, self.state.params,
                                     optimizer=self.optimizer)
        finally:
            self.state.undo_forward()  # the replay's forward pass changed buffers and RNG


def earlier_micro_batch(step: int, micro: list[bool]):
    """The diagnosis of an accumulated step whose non-finite loss came from a micro-batch before the
    last one, which is the batch the guard was given: nothing to replay, and no cause to guess."""
    from ..diagnose import Diagnosis

    bad = [i + 1 for i, ok in enumerate(micro) if not ok]
    k = len(micro)
    where = ", ".join(str(i) for i in bad)
    return Diagnosis(
        "unknown", step, step, f"micro-batch {where} of {k}", "forward",
        evidence={"micro-batches": k, "non-finite micro-batch losses": bad},
        advice=f"the loss of micro-batch {where} of {k} was non-finite, and step(loss, data=...) was given the last "
               f"micro-batch, whose loss was finite: check that micro-batch's data (stabilize.check_finite(x)), or "
               f"run it alone through guard.step(loss, data=(x, y)) to replay and diagnose it")
