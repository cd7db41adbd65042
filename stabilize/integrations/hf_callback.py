"""``stabilize.hf.StabilityCallback``: the guarded torch step inside a Hugging Face ``transformers.Trainer``.

Example:
    >>> from transformers import Trainer  # doctest: +SKIP
    >>> import stabilize.hf
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[stabilize.hf.StabilityCallback(on_nonfinite="skip")])

How it sits in the Trainer's loop (transformers 4.46+ / 5.x, accelerate under it):

* ``on_train_begin``: the guard is built over the model and the torch optimizer inside the
  ``AcceleratedOptimizer``; a forward hook on the model records each training micro-batch's
  ``outputs.loss`` (no Trainer callback receives the loss);
* ``on_step_begin`` (first micro-batch of a ``gradient_accumulation_steps`` window): the buffers
  and the RNG are marked, so a step that is not applied gives back its dropout draws;
* ``on_pre_optimizer_step`` (after the Trainer's ``max_grad_norm`` clip, before its
  ``optimizer.step()``): :meth:`TorchGuard.step(backward=False) <stabilize.TorchGuard.step>`
  runs the whole guarded step, then leaves every ``.grad`` as None, so the Trainer's own step moves
  nothing;
* ``on_optimizer_step``: a step not applied is reported the way the Trainer already understands,
  the accelerate overflow flag (``accelerator.optimizer_step_was_skipped``), so it does not step
  its LR scheduler; parameters, optimizer state and schedule stay exactly as they were;
* ``on_log``: the counters (``stabilize/skipped``, ...) join the entry the Trainer has just
  appended to ``state.log_history``, and the ``logs`` dict passed on to the callbacks after this one.

What the Trainer does not give, and how this is handled:

* the loss: read from the model's output by a forward hook. A loss computed outside the model
  (a custom ``compute_loss``) is not seen: the step is then refused with a clear error;
* the gradient norm before clipping: the Trainer clips by ``max_grad_norm`` (default 1.0) before
  any callback runs, so the guard sees the clipped gradients. A NaN or inf gradient still shows
  (``clip_grad_norm_`` turns the gradients NaN), and a loss spike still shows; to have gradient-norm
  spikes seen and clipped by the guard, pass ``max_grad_norm=0`` and the callback's ``clip_norm``;
* the skip of the scheduler step: only through accelerate's private ``_is_overflow`` flag;
* the report_to loggers (TensorBoard, W&B) are called before user callbacks; to have the counters
  there too, put this callback first: ``trainer.callback_handler.callbacks.insert(0, cb)``.

``fp16=True`` (accelerate's GradScaler) is refused: its overflow skips would reach the policy as
failures. The guard's state rides in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``)
and is read back on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .adapters import GUARD_ARGS, check_settings, step_metrics

__all__ = ["StabilityCallback"]


def _model_loss(output):
    """The ``loss`` of a model output (a ``ModelOutput``, a dict, or a tuple whose first entry it is), or None."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("loss") if hasattr(output, "get") else None
    return getattr(output, "loss", None)


class StabilityCallback(TrainerCallback, ExportableState):
    """Guard every optimizer step of a ``transformers.Trainer``: a bad step is never applied, and changes nothing.

    Args:
        log: add the guard's counters to the Trainer's logs (``stabilize/loss``, ``grad_norm``, ``lr``,
            ``applied``, ``skipped``, ``spikes``, ``backoffs``, ``events``).
        **settings: :class:`~stabilize.guard.settings.GuardSettings` and ``verify_updates`` /
            ``restore_rng``, checked now with :class:`~stabilize.TorchGuard`'s messages.

    After ``train()``, ``callback.guard`` is the :class:`~stabilize.TorchGuard` (``.history``).
    """

    def __init__(self, *, log: bool = True, **settings):
        self._settings = check_settings("the Hugging Face StabilityCallback", dict(settings))
        self.log = log
        self.guard = None
        self.applied = None
        self._loaded = None  # guard state from a checkpoint (trainer_state.json), applied on train begin
        self._hook = None

    # -- building the guard ------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        from .torch_guard import TorchGuard

        if getattr(args, "fp16", False):
            raise ValueError("fp16=True steps through accelerate's GradScaler, whose overflow skips the guard "
                             "would count as failures: use bf16=True or float32")
        torch_opt = getattr(optimizer, "optimizer", optimizer)
        settings = dict(self._settings)
        kwargs_ = {k: settings.pop(k) for k in GUARD_ARGS if k in settings}
        self.guard = TorchGuard(model, torch_opt, scheduler=lr_scheduler, **kwargs_, **settings)
        self._accelerated = optimizer if optimizer is not torch_opt else None
        saved = self._loaded
        if saved is None and state.global_step > 0:  # resumed: the checkpoint's trainer_state.json
            entry = (state.stateful_callbacks or {}).get(type(self).__name__)
            entry = entry[0] if isinstance(entry, list) else entry
            saved = (entry or {}).get("attributes", {}).get("_loaded")
        if saved is not None:
            self.guard.supervisor.load_state_dict(saved)
            self._loaded = None
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            loss = _model_loss(output)
            if torch.is_tensor(loss) and loss.requires_grad:
                self.guard.record(loss)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- the loop ----------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        self.guard.state.mark()  # the window's first micro-batch: what a skipped step gives back

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.guard._step.pending:
            raise ValueError("StabilityCallback saw no loss this step: it reads outputs.loss from the model's "
                             "forward pass, and this model returned none (pass labels), or the loss is computed "
                             "outside the model (a custom compute_loss): use TorchGuard in that loop instead")
        epoch = int(math.floor(state.epoch or 0.0))
        self.applied = self.guard.step(backward=False, epoch=epoch, batch=state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        acc = self._accelerated
        if acc is not None and getattr(acc, "scaler", None) is None:
            # the Trainer's own test for "do not step the scheduler" (accelerate has no public setter)
            acc._is_overflow = not self.applied

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log or self.guard is None or not self.guard.supervisor.rows:
            return
        metrics = step_metrics(self.guard, bool(self.applied))
        if logs is not None:
            logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        """For ``trainer_state.json``: the settings (``args``) and the guard's counters, rows and events."""
        saved = self.guard.supervisor.state_dict() if self.guard is not None else self._loaded
        return {"args": dict(self._settings, log=self.log), "attributes": {"_loaded": saved}}
