"""``stabilize.lightning.StabilityCallback``: the guarded torch step inside a Lightning ``Trainer``.

Example:
    >>> import lightning.pytorch as L, stabilize.lightning  # doctest: +SKIP
    >>> trainer = L.Trainer(callbacks=[stabilize.lightning.StabilityCallback(on_nonfinite="skip", spike="skip")])

How it sits in Lightning's loop (lightning 2.x; automatic and manual optimization alike):

* ``on_train_batch_start``, first micro-batch of an accumulation window: the buffers (BatchNorm
  statistics) and the RNG are marked, so a step that is not applied gives them back;
* ``on_before_backward``: the (micro-)batch loss is recorded (Lightning passes it, divided by
  ``accumulate_grad_batches``); nothing else happens during accumulation;
* ``on_before_optimizer_step`` (after the window's last backward, before Lightning clips and
  steps): :meth:`TorchGuard.step(backward=False) <stabilize.TorchGuard.step>` runs the whole
  guarded step: the check, the clip, the update at the backed-off rate, or the skip. It leaves
  every ``.grad`` as None, so Lightning's own ``optimizer.step()`` that follows moves nothing;
* ``on_train_batch_end``: Lightning has stepped the ``interval="step"`` schedulers by then; after a
  step that was not applied they are put back (state and rates), so the schedule advances only
  on applied steps. ``interval="epoch"`` schedulers step once per epoch, as without the callback;
  ``ReduceLROnPlateau`` is left to Lightning. The metrics go to ``pl_module.log``.

``gradient_clip_val`` is taken over: the guard clips (by norm, or by value with
``gradient_clip_algorithm="value"``) inside its step, with the same formula as
``clip_grad_norm_`` (the norm summed in float64), and Lightning's clip that follows sees no
gradients. Give the bound once: on the Trainer or as the callback's ``clip_norm``/``clip_value``.

A ``training_step`` that returns None (Lightning's own way to skip) is completed as a skip: the
BatchNorm statistics and RNG draws of its forward pass are put back, and the scheduler too.

Under ``strategy="ddp"`` the guard's flags and norms are all-reduced inside the step's one read:
every rank takes the same decision. ``precision="16-mixed"`` (Lightning's GradScaler) is refused:
the scaler's own overflow skips would reach the policy as failures.
"""

from __future__ import annotations

import lightning.pytorch as pl

from .adapters import GUARD_ARGS, SchedulerHold, check_settings, step_metrics

__all__ = ["StabilityCallback"]


class StabilityCallback(pl.Callback):
    """Guard every optimizer step of a Lightning ``Trainer``: a bad step is never applied, and changes nothing.

    Args:
        verify_updates, restore_rng, loss_fn: as for :class:`~stabilize.TorchGuard`.
        log: write the step's metrics (``stabilize/loss``, ``grad_norm``, ``lr``, ``applied``,
            ``skipped``, ``spikes``, ``backoffs``, ``events``) with ``pl_module.log``, so they reach
            the loggers the Trainer has (CSV, TensorBoard, W&B).
        **settings: :class:`~stabilize.guard.settings.GuardSettings`, checked now (``clip_norm``,
            ``on_nonfinite``, ``spike``, ``events_path``, ...).

    After ``fit``, ``callback.guard`` is the :class:`~stabilize.TorchGuard` (``.history``);
    ``callback.applied`` says whether the last optimizer step was applied (manual optimization:
    step your scheduler with ``if callback.applied: sch.step()``). The guard's counters and
    history ride in Lightning checkpoints (:meth:`state_dict`), and resume continues exactly.
    """

    def __init__(self, *, log: bool = True, **settings):
        self._settings = check_settings("the Lightning StabilityCallback", dict(settings))
        self.log = log
        self.guard = None
        self.applied = None
        self._loaded = None  # guard state from a checkpoint, applied once the guard exists
        self._open = False  # a window of micro-batches is marked
        self._batches: list = []
        self._held = None
        self._stepped = False

    # -- building the guard ------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        from .torch_guard import TorchGuard

        if len(trainer.optimizers) != 1:
            raise ValueError(f"StabilityCallback guards one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}: train each with its own TorchGuard in manual optimization")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("precision='16-mixed' steps through Lightning's GradScaler, whose overflow skips the "
                             "guard would count as failures: use precision='bf16-mixed' or '32-true'")
        settings = dict(self._settings)
        if trainer.gradient_clip_val:  # taken over: see the module docstring
            key = "clip_value" if trainer.gradient_clip_algorithm == "value" else "clip_norm"
            if settings.get(key) is not None:
                raise ValueError(f"the clip is given twice: Trainer(gradient_clip_val={trainer.gradient_clip_val}) "
                                 f"and StabilityCallback({key}={settings[key]}); give it once")
            settings[key] = float(trainer.gradient_clip_val)
        optimizer = trainer.optimizers[0]
        step_schedulers = [c.scheduler for c in trainer.lr_scheduler_configs
                           if c.interval == "step" and not c.reduce_on_plateau]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        kwargs = {k: settings.pop(k) for k in GUARD_ARGS if k in settings}
        self.guard = TorchGuard(pl_module, optimizer, scheduler=schedulers[0] if len(schedulers) == 1 else None,
                                **kwargs, **settings)
        self._held = SchedulerHold(step_schedulers, optimizer)
        if self._loaded is not None:
            self.guard.supervisor.load_state_dict(self._loaded)
            self._loaded = None

    # -- the loop ----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        self._open = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._open:  # the window's first micro-batch: what a skipped step gives back
            self.guard.state.mark()
            self._open, self._batches = True, []
        self._batches.append(batch)
        self._position = (trainer.current_epoch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        self.guard.record(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if optimizer is not self.guard.optimizer:
            raise ValueError("StabilityCallback was built for the first optimizer of configure_optimizers")
        data, self._batches, self._open = self._batches, [], False
        if not self.guard._step.pending:  # training_step returned None: Lightning skips; undo its forward too
            self.guard.discard()
            self._held.hold()
            return
        epoch, batch = self._position
        self.applied = self.guard.step(backward=False, epoch=epoch, batch=batch, data=data)
        if not self.applied:
            self._held.hold()  # Lightning steps its schedulers next; put back at batch end
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._held.put_back()
        if self._stepped and self.log:
            pl_module.log_dict(step_metrics(self.guard, self.applied), on_step=True, on_epoch=False,
                               batch_size=1, sync_dist=False)
        self._stepped = False

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The guard's counters, rows and events (plain values), saved in Lightning checkpoints."""
        if self.guard is not None:
            return {"supervisor": self.guard.supervisor.state_dict()}
        return {"supervisor": self._loaded} if self._loaded is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("supervisor")
        if saved is None:
            return
        if self.guard is not None:
            self.guard.supervisor.load_state_dict(saved)
        else:
            self._loaded = saved
