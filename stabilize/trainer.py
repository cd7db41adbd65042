"""``StabilityTrainer``: a training loop whose every step is guarded.

The loop is framework-free: an *updater* from :mod:`stabilize.integrations`
runs one guarded step on the device and returns its statistics (the commit
decision included); the :class:`~stabilize.guard.supervisor.Supervisor` turns
them into a decision (skip, back off, roll back, raise), exactly as for the
drop-in guards. This module adds the data (:mod:`stabilize.data`), rollback
snapshots, the progress bar and the diagnosis of the first failed step.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Callable

import numpy as np

from . import logs
from .frameworks import framework_of as _framework_of, has_batchnorm as _has_batchnorm, resolve_loss
from .frameworks import input_features as _input_features, state_buffer_names
from .data import Batch, batch_finite, batches, check_arrays, nonfinite_rows, rows_of
from .guard.driver import HostDriver, wants_diagnosis
from .guard.entries import check_keywords, refuse
from .guard.replay import replay_failed_step
from .guard.settings import GuardSettings
from .guard.snapshots import SnapshotStore
from .guard.stats import nonfinite_parts
from .guard.supervisor import Supervisor
from .history import History
from .models import MLP
from .names import scheduler_from, settings_for
from .optim import OptimizerSpec
from .registry import get_backend
from .resume import Shuffle

__all__ = ["StabilityTrainer"]

logger = logging.getLogger("stabilize")


class StabilityTrainer:
    """Train with every step checked, and bad steps skipped, backed off or rolled back.

    Args:
        model: an :class:`~stabilize.models.MLP` spec, a ``torch.nn.Module`` or a ``keras.Model``
            (of any output structure, if the loss takes it).
        loss: ``"mse"`` (:func:`stabilize.safe_mse`), ``"cross_entropy"``
            (:func:`stabilize.safe_cross_entropy`), or a callable in the framework's
            own order: ``loss(input, target)`` for torch, ``loss(y_true, y_pred)``
            for Keras (a keras model, or a ``keras.losses`` object).
        optimizer: :class:`stabilize.optim.SGD` / :class:`~stabilize.optim.Adam`, a
            ``torch.optim`` optimizer over the model's parameters, or a keras optimizer
            (its rate may be a ``LearningRateSchedule``).
        backend, dtype, device: for an MLP spec: where and how to build it.
        scheduler: a ``torch.optim.lr_scheduler`` scheduler (stepped once per applied
            step), or ``scheduler(applied_steps) -> factor`` for a stabilize.optim spec;
            the same keyword as ``TorchGuard``'s. Back-off multiplies the rate the
            scheduler gives; a skipped step does not advance it. ``schedule=`` is its
            old name: it still works, with a ``DeprecationWarning``.
        scaler, verify_updates: torch: a ``GradScaler``; check each applied update and undo
            a bad one exactly (a copy of the state per step; see ``TorchGuard``).
        progress: show a tqdm bar (default: only on a terminal). diagnose: replay the first failed
            step and attach a :class:`~stabilize.diagnose.Diagnosis` (nothing is traced until then).
        **settings: :class:`~stabilize.guard.settings.GuardSettings` (``clip_norm``,
            ``on_nonfinite``, the back-off, rollback, update-bound, spike and alarm settings).

    Example:
        >>> import numpy as np
        >>> from stabilize import StabilityTrainer
        >>> from stabilize.models import MLP
        >>> from stabilize.optim import SGD
        >>> X = np.random.default_rng(0).normal(size=(64, 2)); y = X.sum(1, keepdims=True)
        >>> t = StabilityTrainer(MLP((2, 8, 1)), "mse", SGD(lr=0.05), backend="torch", dtype="float64")
        >>> h = t.fit(X, y, epochs=5, batch_size=16)
        >>> h.first_nonfinite_step is None and h.losses[-1] < h.losses[0]
        True
    """

    def __init__(self, model, loss: str | Callable = "mse", optimizer=None, *, backend: str | None = None,
                 dtype: str | None = None, device: str | None = None, scheduler=None, scaler=None,
                 verify_updates: bool = False, progress: bool | None = None, diagnose: bool = True,
                 schedule=None, **settings):
        check_keywords("StabilityTrainer", settings, ("backend", "dtype", "device", "scheduler", "scaler",
                                                      "verify_updates", "progress", "diagnose", "schedule"))
        schedule = scheduler_from(scheduler, schedule, "StabilityTrainer")
        self.settings = GuardSettings(**settings_for(_framework_of(model) if not isinstance(model, MLP) else None,
                                                     settings, "StabilityTrainer"))
        if optimizer is None:
            raise TypeError("pass an optimizer, e.g. stabilize.optim.SGD(lr=0.01) or a torch.optim optimizer")
        self.progress, self.diagnose = progress, diagnose
        self._spec = model if isinstance(model, MLP) else None
        if self._spec is not None:
            self.backend = get_backend(backend)
            self.model = self.backend.build_mlp(self._spec, dtype or "float32", device)
            framework = None
        else:
            framework = _framework_of(model)
            if framework is None:
                raise TypeError(f"model must be a stabilize.models.MLP spec, a torch.nn.Module or a keras.Model; "
                                f"got {type(model).__name__}")
            if backend is not None and get_backend(backend).name != framework:
                raise ValueError(f"a {framework} model cannot run on backend {backend!r}; drop backend=")
            self.backend = get_backend(framework)
            self.model = model
        self.loss_fn = resolve_loss(loss, framework)
        self.optimizer = optimizer
        self.updater = self._updater(framework, schedule, scaler, verify_updates)
        self.params = self.updater.params
        self.dtype = self.backend.dtype(self.params[0])
        self.supervisor = Supervisor(self.settings, replays=True)  # see _step: decision.replay
        if self.settings.spike is not None:  # the device compares each step with the detector's limits
            holder = self.updater if hasattr(self.updater, "limits") else getattr(self.updater, "_step", None)
            if holder is None or not hasattr(holder, "limits"):
                raise ValueError("spike= is wired for stabilize.optim specs, torch.optim and keras optimizers")
            holder.limits = self.supervisor.spike_limits
        self.policy = self.supervisor.policy
        # The rollback snapshot, held only when the policy can restore it (guard/snapshots.py).
        self._snapshots = SnapshotStore(self.settings, self.updater.capture, self.updater.restore,
                                        getattr(self.updater, "rebuild", None))
        self._native = not isinstance(optimizer, OptimizerSpec)
        self._epoch, self._resume = 0, None  # the global epoch; an interrupted fit to finish (stabilize.resume)
        self._shuffle = Shuffle()
        self._driver = HostDriver(self.supervisor, self._snapshots, weights_finite=self.updater.weights_finite,
                                  native=self._native, verifies=getattr(self.updater, "verifies", False))
        self._independent: bool | None = None  # may single rows be left out? (see _rows_independent)

    # -- setup ----------------------------------------------------------------
    def _updater(self, framework, schedule, scaler, verify_updates):
        B, opt = self.backend, self.optimizer
        options = {"scaler": scaler, "verify_updates": verify_updates}  # checked against the one table
        if isinstance(opt, OptimizerSpec):
            refuse("trainer-neutral", options, lead="StabilityTrainer with a stabilize.optim spec cannot take")
            if schedule is not None and not callable(schedule):
                raise TypeError("with a stabilize.optim spec, scheduler is scheduler(applied_steps) -> factor")
            held = state_buffer_names(self.model)
            if held:
                raise ValueError(f"the model holds state outside its parameters ({', '.join(held[:4])}"
                                 f"{', ...' if len(held) > 4 else ''}), which a stabilize.optim spec cannot put back "
                                 f"after a bad step: pass a native optimizer (torch.optim or keras) instead")
            from .integrations.neutral import NeutralUpdater

            params = B.parameters(self.model)
            if not params:
                raise ValueError("the model has no trainable parameters")
            forward = (lambda x: self.model(x, training=True)) if framework == "tensorflow" else self.model
            return NeutralUpdater(B, self.model, params, opt, self.loss_fn, self.settings, schedule, forward)
        torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
        if B.name == "torch" and torch is not None and isinstance(opt, torch.optim.Optimizer):
            from .integrations.torch_updater import TorchUpdater, is_scheduler

            if schedule is not None and not is_scheduler(schedule):
                raise TypeError("with a torch optimizer, scheduler must be a torch.optim.lr_scheduler scheduler")
            return TorchUpdater(B, self.model, opt, self.loss_fn, self.settings, scheduler=schedule, scaler=scaler,
                                verify_updates=verify_updates)
        if B.name == "tensorflow" and keras is not None and isinstance(opt, keras.optimizers.Optimizer):
            if schedule is not None:
                raise TypeError("with a keras optimizer, give the schedule as its learning_rate "
                                "(a keras.optimizers.schedules.LearningRateSchedule)")
            refuse("trainer-keras", options, lead="StabilityTrainer with a keras optimizer cannot take")
            from .integrations.keras_updater import KerasUpdater

            return KerasUpdater(B, self.model, opt, self.loss_fn, self.settings)
        raise TypeError(f"optimizer must be a stabilize.optim spec (SGD, Adam), a torch.optim optimizer for a torch "
                        f"model or a keras optimizer for a keras model; got {type(opt).__name__} for backend {B.name}")

    # -- what the scenarios and users read ----------------------------------------
    @property
    def step_count(self) -> int:
        return self.supervisor.step

    @property
    def applied_steps(self) -> int:
        return self.updater.applied

    @property
    def state_vars(self) -> list:
        """The optimizer state of a stabilize.optim spec, as backend variables (empty for native optimizers)."""
        return getattr(self.updater, "state_vars", [])

    skipped_rows = property(lambda self: self.supervisor.skip_rows, doc="rows a rollback left out in this fit")
    skipped_positions = property(lambda self: self.supervisor.skip_positions, doc="(epoch, batch) left out")

    def current_lr(self) -> float:
        """The rate the next step will use: the schedule's, backed off."""
        return self.supervisor.lr(self.updater.base_lr())

    # -- data ---------------------------------------------------------------------
    def _convert(self, xb):
        B = self.backend
        if isinstance(xb, dict):
            if self._spec is not None:  # a spec takes one matrix: columns in key order
                cols = [np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in xb.values()]
                return B.convert(np.concatenate(cols, axis=1), self.dtype)
            return {k: self._convert(v) for k, v in xb.items()}
        if B.is_tensor(xb):
            return xb
        arr = np.asarray(xb)
        return self.updater.to_tensor(arr, self.dtype if arr.dtype.kind == "f" else None)

    # -- fit ----------------------------------------------------------------------
    def fit(self, x, y=None, *, epochs: int = 1, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
            max_steps: int | None = None, stop_on_nonfinite: bool = False, drop_last: bool = False,
            checkpoint_path=None, checkpoint_every: int | None = None, checkpoint_epochs: bool | None = None) -> History:
        """Train and return the :class:`~stabilize.history.History` of this call.

        Args:
            x: inputs (an array, or a dict of arrays), or a DataLoader / ``tf.data.Dataset`` /
                iterable of ``(x, y)`` batches with ``y=None``.
            y: targets for array inputs.
            epochs, batch_size, shuffle: the usual; shuffling is a numpy permutation under
                ``seed`` and the *global* epoch (the ``e``-th permutation of
                ``default_rng(seed)``), so every backend sees the same batches and separate
                ``fit`` calls chain like one: ``fit(epochs=1)`` twice equals ``fit(epochs=2)``.
            max_steps: stop after this many attempted steps.
            stop_on_nonfinite: stop at the first non-finite step (for reproducing failures).
            drop_last: leave out a last batch smaller than ``batch_size`` (needed by
                BatchNorm when it would hold one row).
            checkpoint_path: where this call saves checkpoints (:meth:`save_checkpoint`):
                every ``checkpoint_every`` steps and, with ``checkpoint_epochs`` (the default
                when ``checkpoint_every`` is not given), at each epoch's end. After a crash,
                :meth:`load_checkpoint` and the same ``fit`` call finish the interrupted call
                bit-identically (:mod:`stabilize.resume`): same batches, RNG and records.
        """
        from .resume import check_continuation

        check_arrays(x, y, batch_size, epochs, _input_features(self._spec or self.model))
        if y is not None and not drop_last and rows_of(x) % batch_size == 1 and _has_batchnorm(self.model):
            raise ValueError(f"the last batch would hold 1 row ({rows_of(x)} rows, batch_size={batch_size}), and "
                             f"BatchNorm cannot train on one row: pass drop_last=True or change batch_size")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
        if (checkpoint_every is not None or checkpoint_epochs) and checkpoint_path is None:
            raise ValueError("checkpoint_every/checkpoint_epochs need checkpoint_path=, the file to save to")
        if checkpoint_epochs is None:
            checkpoint_epochs = checkpoint_path is not None and checkpoint_every is None
        sup = self.supervisor
        call = dict(batch_size=batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                    rows=len(y) if y is not None else None)
        resume = self._resume
        if resume is not None:  # finish the fit a mid-fit checkpoint was taken in
            check_continuation(resume, **call)
            self._resume = None
            first, end, start, skip_before = resume["epoch"], resume["end"], resume["start"], resume["batch"]
            epoch_skip = set(resume["epoch_skip"])
        else:
            first, end, start, skip_before = self._epoch, self._epoch + epochs, sup.step, 0
            sup.skip_rows.clear()  # what a rollback leaves out is named within one fit's data
            sup.skip_positions.clear()
            epoch_skip = None
        self._driver.start()
        total = (end - first) * math.ceil(len(y) / batch_size) if y is not None else None
        if max_steps is not None:
            total = min(total, max_steps) if total else max_steps
        bar = logs.progress_bar(total, self.progress)

        def position(epoch, batch):
            return dict(call, epoch=epoch, batch=batch, end=end, start=start, epoch_skip=sorted(epoch_skip))

        try:
            with self.updater.training():
                for epoch in range(first, end):
                    self._epoch = epoch
                    if epoch_skip is None or epoch != first:
                        epoch_skip = set(sup.skip_rows)  # the rows this epoch's order leaves out
                    rng = self._shuffle.rng(seed=seed, epoch=epoch, n=len(y)) if y is not None and shuffle else None
                    for batch in batches(x, y, batch_size=batch_size, shuffle=shuffle, rng=rng, epoch=epoch,
                                         skip_rows=epoch_skip, skip_positions=sup.skip_positions,
                                         drop_last=drop_last, whole=self._independent is False
                                         or getattr(self.model, "rows_independent", True) is False):
                        if epoch == first and batch.position < skip_before:
                            continue  # trained before the checkpoint this fit resumes from
                        if max_steps is not None and sup.step - start >= max_steps:
                            self._epoch = epoch + 1
                            return sup.history(start)
                        if sup.leaves_out(epoch=epoch, batch=batch.position):  # after a spike rewind
                            continue
                        if self._step(batch, epoch, bar) and stop_on_nonfinite:
                            self._epoch = epoch + 1
                            return sup.history(start)
                        if checkpoint_every is not None and (sup.step - start) % checkpoint_every == 0:
                            self._save(checkpoint_path, position(epoch, batch.position + 1))
                    if checkpoint_epochs and epoch + 1 < end:
                        epoch_skip = set(sup.skip_rows)
                        self._epoch = epoch + 1
                        self._save(checkpoint_path, position(epoch + 1, 0))
                if self._native and sup.step > start and not self.updater.weights_finite():
                    # The last native update has no next step to reveal it: look once, now.
                    self._step_failed_after_the_fact(end - 1)
            self._epoch = end
            if checkpoint_epochs:
                self._save(checkpoint_path, None)
            return sup.history(start)
        finally:
            if bar is not None:
                bar.close()

    def abandon_fit(self) -> None:
        """Forget the interrupted fit a mid-fit checkpoint was loaded from: the next fit starts anew
        (at the checkpoint's global epoch)."""
        self._resume = None

    def _step(self, batch: Batch, epoch: int, bar) -> bool:
        """One guarded step and what follows it; returns whether it was bad."""
        sup, updater = self.supervisor, self.updater
        pending = self.diagnose and sup.diagnosis is None and not self.settings.guarded
        xb, yb = self._convert(batch.x), self._convert(batch.y)
        hook = pre = None
        if pending and getattr(updater, "diagnoses_before_commit", False):
            # ``ignore`` with torch.optim: the bad step is diagnosed before its update is applied
            hook = lambda stats: self._diagnose(xb, yb, None, dict(stats, batch=batch.position))  # noqa: E731
        elif pending:  # the other updaters commit on the device: keep the pre-step state until a diagnosis
            pre = updater.capture()
        try:
            rate = sup.rate()  # the whole rate, applied as given (on the device for Keras)
            stats = updater.run(xb, yb, rate, hook) if hook is not None else updater.run(xb, yb, rate)
        except Exception as exc:  # the user's forward or loss raised (labels out of range, a shape)
            self._explain(exc, xb, yb, batch)
            raise

        whole = []

        def bad_data():  # only for a failed step: array data names the offending rows, read on the host
            if batch.rows is not None:
                faulty = nonfinite_rows(batch.x, batch.y)
                found, rows = bool(faulty.any()), batch.rows[faulty] if faulty.any() else batch.rows
            else:
                found, rows = not batch_finite(self.backend, xb, yb), batch.rows
            if hasattr(updater, "on_any_rank"):  # the same verdict on every rank
                found = updater.on_any_rank(found)
            if found and batch.rows is not None and sup.wants_snapshot and not self._rows_independent(batch, rows):
                whole.append(True)  # never leave single rows out of a batch whose rows depend on each other
                rows = batch.rows
            return found, rows

        diagnose = (lambda: self._diagnose(xb, yb, pre)) if self.diagnose and hook is None else None  # noqa: E731
        decision = self._driver.judge(stats, bad_data=bad_data, epoch=epoch, batch=batch.position,
                                      position=(epoch, batch.position), rows=batch.rows, diagnose=diagnose)
        if whole and decision.action == "rolled-back":
            sup.left_out_whole(epoch=epoch, batch=batch.position)
        if self.diagnose and hook is None and wants_diagnosis(stats, decision, sup):
            self._diagnose(xb, yb, pre)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{stats['lr']:.3g}", skipped=sup.not_applied,
                            spikes=sup.spikes.spikes if sup.spikes is not None else 0)
        self._driver.follow(decision, replay=lambda: replay_failed_step(updater, sup, xb, yb))
        return bool(nonfinite_parts(stats))

    def _rows_independent(self, batch: Batch, faulty) -> bool:
        """Whether single rows may be left out of this model's batches: not when the model says so
        (``rows_independent = False``: a full-graph GNN, a set model, batch statistics it relies on)
        or when its forward fails on the batch without those rows (asked once, at the first rollback)."""
        declared = getattr(self.model, "rows_independent", None)
        if declared is not None:
            return bool(declared)
        if self._independent is None:
            keep = ~np.isin(batch.rows, faulty)
            take = lambda v: np.asarray(v)[keep]  # noqa: E731
            xb = {k: take(v) for k, v in batch.x.items()} if isinstance(batch.x, dict) else take(batch.x)
            try:
                out = self.updater.predict(self._convert(xb))
                self._independent = len(out) == int(keep.sum())
            except Exception:  # noqa: BLE001 - the forward cannot take the batch without the rows
                self._independent = False
        return self._independent

    def _explain(self, exc, xb, yb, batch):
        """A step raised: put back what its forward pass changed, and add the diagnosis of the
        replay to the exception (a label out of range raises on the CPU, and is NaN on a GPU)."""
        state = getattr(self.updater, "state", None)
        if state is not None:
            state.undo_forward()
        if not self.diagnose:
            return
        try:
            self.supervisor.explain(exc, self.backend, self.model, self.loss_fn, xb, yb, self.params,
                                    lr=self.current_lr(), optimizer=self.optimizer if self._native else None)
        finally:
            if state is not None:
                state.undo_forward()  # the replay's forward pass changed buffers and RNG

    def _step_failed_after_the_fact(self, epoch):
        sup = self.supervisor
        last = dict(sup.rows[-1])
        last.update(committed=0.0, weights_broken=1.0)
        sup.rows.pop()  # the step is recorded again, now with what it did to the weights
        decision = sup.observe(last, epoch=epoch, batch=last.get("batch", 0))
        if decision.restore:
            self._restore_snapshot()
        if decision.stop:
            sup.raise_for(decision)

    def _restore_snapshot(self):
        self._snapshots.restore()

    def held_bytes(self) -> int:
        """Bytes the guard holds in memory across steps: the rollback snapshot (only under
        ``rollback`` or ``spike="rewind"``), plus an update's undo copy with ``verify_updates``."""
        return self._snapshots.held_bytes() + getattr(self.updater, "held_bytes", lambda: 0)()

    def _diagnose(self, xb, yb, pre, pending=None):
        """Replay the failing step from its pre-step state (see :mod:`stabilize.diagnose`)."""
        updater = self.updater
        current = None
        if pre is not None:  # the unguarded step was applied: put the pre-step state back for the replay
            current = updater.capture()
            updater.restore(pre)
        try:
            self.supervisor.diagnose(self.backend, self.model, self.loss_fn, xb, yb, self.params, pending=pending,
                                     optimizer=self.optimizer if self._native else None)
        finally:
            if current is not None:
                updater.restore(current)
            elif hasattr(updater, "state"):
                updater.state.undo_forward()  # the replay's forward pass changed buffers and RNG
        return self.supervisor.diagnosis

    # -- durable state ------------------------------------------------------------------
    def save_checkpoint(self, path):
        """Save the whole training state to ``path`` atomically (:mod:`stabilize.checkpoint`; torch, or
        keras with a keras optimizer): parameters, buffers, optimizer, scheduler, loss scaler, policy
        counters, history, the rows a rollback left out, every RNG and the global epoch. ``fit`` again
        with the same ``seed`` after loading continues exactly as an uninterrupted run would; the
        event log starts beside the first checkpoint unless ``events_path`` is set."""
        from .resume import save_trainer

        return save_trainer(self, path, None)

    def _save(self, path, fit_position):
        from .resume import save_trainer

        save_trainer(self, path, fit_position)

    def load_checkpoint(self, path) -> None:
        """Restore what :meth:`save_checkpoint` (or a ``fit`` with ``checkpoint_path``) wrote.

        Everything is verified before anything changes: a bad, foreign or mismatched file raises
        :class:`~stabilize.checkpoint.CheckpointError` naming it and leaves the trainer as it was."""
        from .resume import load_trainer

        load_trainer(self, path)

    def _updater_checkpoints(self):
        if not hasattr(self.updater, "checkpoint_state"):
            raise NotImplementedError("checkpoints of StabilityTrainer are written for torch.optim and keras "
                                      "optimizers; for a stabilize.optim spec, save the model with its framework")
        return self.updater

    # -- after training -------------------------------------------------------------
    @property
    def history(self) -> History:
        """Every step of every ``fit`` so far."""
        return self.supervisor.history()

    def predict(self, x, batch_size: int = 1024) -> np.ndarray:
        """The model's outputs for array (or dict) inputs, as float64 numpy, in eval/inference mode."""
        n = rows_of(x)
        outs = []
        for start in range(0, n, batch_size):
            xb = {k: np.asarray(v)[start : start + batch_size] for k, v in x.items()} if isinstance(x, dict) \
                else np.asarray(x)[start : start + batch_size]
            outs.append(self.updater.predict(self._convert(xb)))
        return np.concatenate(outs, axis=0)

    def get_weights(self) -> list[np.ndarray]:
        """The current parameters as numpy arrays (in the spec's order for an MLP)."""
        return [self.backend.to_numpy(p) for p in self.params]
