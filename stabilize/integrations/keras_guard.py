"""``keras_guard``: the guarded optimizer plus a ``model.fit`` callback that runs the policy.

It runs the same device code as the trainer's ``KerasTrainStep`` (:mod:`.keras_optimizer`): the guarded
optimizer's ``apply`` forms ``committed``, and :meth:`StepState.finish` keeps
or puts back what the forward pass changed. Both hand the step's statistics
to the same host loop body, :class:`~stabilize.guard.supervisor.Supervisor`.

A rollback snapshot (numpy copies of every variable, or a file with
``snapshot_to="disk"``; :mod:`~stabilize.guard.snapshots`) is held only under
``on_nonfinite="rollback"``: under the other policies, weights that a Keras
update made non-finite stop the fit with an error naming the ways out.
``spike="skip"``/``"clip"`` are judged on the device; ``"rewind"`` needs the
trainer's data loop and is refused here.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
from keras import ops

from ..guard.driver import HostDriver, wants_diagnosis
from ..guard.entries import check_keywords, refuse
from ..guard.settings import GuardSettings
from ..guard.snapshots import SnapshotStore
from ..guard.supervisor import Supervisor
from .keras_optimizer import GuardedOptimizer, Protected, _scaler, all_finite, copy_values
from ..names import settings_for

__all__ = ["StabilizeGuard", "check_optimizer", "keras_guard"]


def check_optimizer(optimizer, what: str):
    if isinstance(optimizer, str):
        raise TypeError(f"{what} needs a keras optimizer instance, e.g. {what}(keras.optimizers.Adam(1e-3)); "
                        f"got the string {optimizer!r}")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        hint = " (for a torch optimizer use stabilize.TorchGuard)" if type(optimizer).__module__.startswith("torch") else ""
        raise TypeError(f"{what} needs a keras optimizer instance, e.g. keras.optimizers.Adam(1e-3){hint}; "
                        f"got {type(optimizer).__name__}")


class StabilizeGuard(keras.callbacks.Callback):
    """Applies the policy between ``model.fit`` steps; ``history`` holds the record.

    On ``set_model`` it wraps the model's ``train_step`` (on this model object
    only) so that, inside the compiled step, non-trainable variables (BatchNorm
    statistics, seed-generator states) and the loss tracker and compiled
    metrics are put back after a step that was not committed: Keras's progress
    bar and ``History`` show the mean over applied steps.
    """

    def __init__(self, guarded: GuardedOptimizer, diagnose_data=None, loss_fn=None):
        super().__init__()
        self.guarded = guarded
        self.settings = guarded.settings
        refuse("keras_guard", dataclasses.asdict(self.settings))  # the one table (guard/entries.py)
        self.supervisor = Supervisor(self.settings)
        self.diagnose_data, self.loss_fn = diagnose_data, loss_fn
        self._epoch = 0
        # The rollback snapshot, held only under on_nonfinite="rollback" (guard/snapshots.py): host
        # numpy copies for "device" and "host" alike, a durable file for "disk".
        self._snapshots = SnapshotStore(self.settings, lambda where: copy_values(self._variables()), self._restore_values)
        self._driver = HostDriver(self.supervisor, self._snapshots, weights_finite=lambda: not self._weights_broken())
        self._protected = self._outer = self._outer_protected = None
        self._outer_loss = None
        self.tracing_count = 0  # traces of fit's step (one per replica under a strategy); 1 per model and signature

    @property
    def history(self):
        return self.supervisor.history()

    # -- wiring ---------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "optimizer", None) is not None:
            self._install(model)

    def _install(self, model):
        if not isinstance(model, keras.Model):
            raise TypeError(f"keras_guard's callback needs a keras.Model, got {type(model).__name__}; "
                            "for a torch model use stabilize.TorchGuard")
        opt, outer = model.optimizer, None
        if opt is not self.guarded:
            if isinstance(opt, keras.optimizers.LossScaleOptimizer) and opt.inner_optimizer is self.guarded:
                outer = opt  # mixed_float16: Keras wrapped the guard in a LossScaleOptimizer at compile
            else:
                raise ValueError("compile the model with the optimizer keras_guard returned: "
                                 "opt, cb = keras_guard(...); model.compile(optimizer=opt, ...); model.fit(..., callbacks=[cb])")
        if outer is not None and _scaler(self.guarded.inner_optimizer) is not None:
            raise ValueError("the model's dtype policy is mixed_float16, so Keras wrapped the guard, which already holds "
                             "a LossScaleOptimizer, in a second one (the loss would be scaled twice): compile with "
                             "model.compile(..., auto_scale_loss=False), or give keras_guard the plain optimizer")
        if model.__dict__.get("_stabilize_guard") is self:
            return
        if not opt.built and model.trainable_variables:
            opt.build(model.trainable_variables)
        self.guarded.watch_buffers(lambda: model.non_trainable_variables)  # read when apply is traced
        self._protected = self._outer_protected = None  # made when the step is first traced
        if outer is not None:
            self._outer = outer
            scale_loss = type(outer).scale_loss.__get__(outer)

            def capture(loss):  # the loss for the check: the scaler's own scale_loss never reaches the guard
                self._outer_loss = loss
                object.__setattr__(self.guarded, "_captured_loss", loss)
                return scale_loss(loss)

            object.__setattr__(outer, "scale_loss", capture)
        train_step = type(model).train_step.__get__(model)

        state = self.guarded.ensure_state()
        state.tracks_apply = outer is not None  # only a scaler around the guard may skip its apply

        def guarded_train_step(data):  # Python runs here only while fit's step is traced
            self.tracing_count += 1
            state.begin(data)  # whether the batch is finite: every policy counts failures on finite data
            logs = train_step(data)  # builds the model, the optimizer and the compiled metrics on the first trace
            self._shadow(model, outer)
            scale = None if outer is None else outer.dynamic_scale
            state.finish(self._protected, self._outer_protected, loss=self._outer_loss, scale=scale,
                         min_loss_scale=self.settings.min_loss_scale,
                         base_lr=None if outer is None else self.guarded.user_rate())  # a skip left iterations alone
            if isinstance(logs, dict):  # the metrics as they are now: a skipped step left them as before
                fresh = model.get_metrics_result()
                logs = {k: fresh.get(k, v) for k, v in logs.items()}
            return logs

        object.__setattr__(model, "train_step", guarded_train_step)
        object.__setattr__(model, "_stabilize_guard", self)
        object.__setattr__(model, "train_function", None)  # rebuilt by fit around the wrapped step

    def _shadow(self, model, outer):
        """Shadow copies of what the forward pass may change: non-trainable and metric variables
        (and an outer loss scaler's). Made while the step is traced, once Keras has built everything."""
        if not self.settings.guarded:  # "ignore": every update is committed, nothing to put back, no copies
            self._protected = Protected([])
            self._outer_protected = None if outer is None else Protected([])
            return
        variables = list(model.non_trainable_variables) + list(model.metrics_variables)
        if self._protected is not None and len(self._protected.variables) == len(variables):
            return
        import tensorflow as tf  # variables must be made outside the trace; keras.ops has no init_scope

        with tf.init_scope():
            self._protected = Protected(variables)
            self._outer_protected = None if outer is None else Protected(outer._variables)

    # -- the fit loop ---------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._install(self.model)
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError("keras_guard judges every step between steps: compile with steps_per_execution=1")
        strategy = getattr(self.model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            # fit has built the model and its metrics: make the shadows now, as a variable made while
            # the step is traced makes tf.function trace it a second time
            self._shadow(self.model, self._outer)
        self._sync_shadows()
        self._set_inputs()
        self._driver.start()
        self._explain_errors(self.model)

    def _explain_errors(self, model):
        """A step that raises (a label or an id out of range: ``InvalidArgumentError``) gets the
        diagnosis of a replay of ``diagnose_data`` as a note; wraps this model's train function only."""
        step = getattr(model, "train_function", None)
        if step is None or self.diagnose_data is None or self.loss_fn is None or getattr(step, "_stabilize", None):
            return

        def explained(iterator):
            try:
                return step(iterator)
            except Exception as exc:
                self._maybe_diagnose(explain=exc)
                raise

        explained._stabilize = True
        model.train_function = explained

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._sync_shadows()  # fit has just reset the metrics

    def on_train_batch_end(self, batch, logs=None):
        sup, state = self.supervisor, self.guarded.state
        stats = state.read()  # one transfer: the statistics and the user's rate the step read
        stats["lr"] = sup.lr(stats.pop("base_lr"))
        if sup.spikes is not None:
            stats.update(state.limits_now())  # the limits this step was judged against
        decision = self._driver.judge(stats, bad_data=lambda: int(ops.convert_to_numpy(state.data_ok)) == 0,
                                      epoch=self._epoch, batch=batch, diagnose=self._maybe_diagnose)
        self._decide(decision, stats)

    def on_train_end(self, logs=None):
        found = self._driver.last_step_broke()  # the last update has no next step to reveal broken weights
        if found is not None:
            self._decide(*found)

    def _weights_broken(self) -> bool:
        return not bool(ops.convert_to_numpy(all_finite(self.model.trainable_variables)))

    def _decide(self, decision, stats):
        sup = self.supervisor
        if wants_diagnosis(stats, decision, sup):
            self._maybe_diagnose()
        if decision.action == "scaler-skip" and sup.keeps_snapshot and sup.steps_since_snapshot() == 0:
            self._take()  # the snapshot held every applied step: keep it current (the scaler lowered its scale)
        self._set_inputs()
        self._driver.follow(decision, before_stop=lambda: setattr(self.model, "stop_training", True))

    # -- state ----------------------------------------------------------------------
    def _variables(self):
        m = self.model
        return list(m.trainable_variables) + list(m.non_trainable_variables) + list(m.optimizer.variables)

    def _set_inputs(self):
        """The policy's inputs to the next step: eager assigns only when they change."""
        self.guarded.state.set_rate(self.supervisor.rate())
        self.guarded.state.set_limits(self.supervisor.spike_limits())

    def _take(self):
        self._driver.take_snapshot()

    def _restore_values(self, snapshot):
        for v, saved in zip(self._variables(), snapshot):
            v.assign(saved)
        self._sync_shadows()

    def held_bytes(self) -> int:
        """Bytes this guard holds in memory across steps: the rollback snapshot (only under
        ``on_nonfinite="rollback"``, and 0 with ``snapshot_to="disk"``)."""
        return self._snapshots.held_bytes()

    def _sync_shadows(self):
        for p in (self._protected, self._outer_protected):
            if p is not None:
                p.sync_now()

    # -- checkpoints ----------------------------------------------------------------
    def save_checkpoint(self, path, **position):
        """Save the whole training state to ``path`` atomically (:mod:`stabilize.checkpoint`, npz + JSON):
        the model's variables (non-trainable and seed states included), the optimizer's (``iterations``,
        loss scale), the policy's counters and history, numpy/Python/Keras RNG, and ``position`` (whatever
        names your place in the data), returned by :meth:`load_checkpoint`."""
        from ..checkpoint import save
        from .keras_state import rng_state, variables_state

        model = self._need_model(None)
        state = {"keras": variables_state(self._groups(model)), "supervisor": self.supervisor.state_dict(),
                 "rng": rng_state(), "position": position}
        return save(path, state, meta={"kind": "keras_guard", "steps": self.supervisor.step})

    def load_checkpoint(self, path, model=None) -> dict:
        """Restore what :meth:`save_checkpoint` wrote into ``model`` (compiled with this guard's optimizer;
        default: the model this callback was last used with); returns the saved ``position``.

        A missing, truncated or corrupted file, or one of another model, raises
        :class:`~stabilize.checkpoint.CheckpointError` and changes nothing.
        """
        from ..checkpoint import CheckpointError, load
        from ..resume import check_policy_state
        from .keras_state import apply_rng_state, assign_variables_state, check_rng_state, check_variables_state

        model = self._need_model(model)
        where = f"checkpoint {str(path)!r}"
        saved = load(path, kind="keras_guard", sections={"keras", "supervisor", "rng", "position"},
                     reader="keras_guard's load_checkpoint")
        groups = self._groups(model)
        check_variables_state(groups, saved["keras"], where)  # everything checked before anything changes
        rng = check_rng_state(saved["rng"], where)
        check_policy_state(self.settings, saved["supervisor"], where)
        position = saved["position"]
        if not isinstance(position, dict) or not all(isinstance(k, str) for k in position):
            raise CheckpointError(f"{where}: its position is not a dict of names")
        assign_variables_state(groups, saved["keras"])
        self.supervisor.load_state_dict(saved["supervisor"])
        if self.supervisor.event_log is not None:
            self.supervisor.event_log.rewrite(self.supervisor.events)
        apply_rng_state(rng)
        self._set_inputs()
        self._snapshots.clear()  # the next fit takes a fresh rollback snapshot
        self._sync_shadows()
        return dict(position)

    def _need_model(self, model):
        if model is not None and model is not self.model:
            strategy = getattr(model, "distribute_strategy", None)  # tf.distribute: variables made in its scope
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                self.set_model(model)
        if self.model is None or getattr(self.model, "optimizer", None) is None:
            raise ValueError("pass the model compiled with this guard's optimizer: cb.load_checkpoint(path, model=model)")
        return self.model

    def _groups(self, model) -> dict:
        from .keras_state import model_variables, optimizer_variables

        return {"model": model_variables(model), "optimizer": optimizer_variables(model.optimizer, model)}

    def _maybe_diagnose(self, explain=None):
        """Replay ``diagnose_data`` through the model at the first bad step (the weights are the pre-step
        ones), or after a step raised ``explain`` (then the diagnosis is added to it as a note)."""
        sup = self.supervisor
        if (sup.diagnosis is not None and explain is None) or self.diagnose_data is None or self.loss_fn is None:
            return
        from ..registry import get_backend

        B = get_backend("tensorflow")
        loss = self.loss_fn
        if isinstance(loss, keras.losses.Loss) or getattr(loss, "__module__", "").startswith("keras"):
            loss = lambda pred, target, f=loss: f(target, pred)  # Keras order: (y_true, y_pred)
        x, y = self.diagnose_data
        if explain is not None:
            sup.explain(explain, B, self.model, loss, B.convert(x), B.convert(y), B.parameters(self.model))
        else:
            sup.diagnose(B, self.model, loss, B.convert(x), B.convert(y), B.parameters(self.model))


def keras_guard(optimizer, *, diagnose_data=None, loss_fn=None, **settings):
    """Guard Keras ``model.fit``: returns ``(guarded_optimizer, callback)``.

    Example::

        opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-3), clip_norm=1.0, on_nonfinite="backoff")
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, y, callbacks=[cb])
        print(cb.history.report())

    ``settings`` are :class:`~stabilize.guard.settings.GuardSettings` fields; Keras's own
    ``clipnorm``/``clipvalue`` are accepted for ``clip_norm``/``clip_value``. Given a
    ``GuardedOptimizer`` (a reloaded model's ``model.optimizer``), it returns that
    optimizer with a new callback: the optimizer refuses to train without one.
    ``diagnose_data=(x, y)`` with ``loss_fn`` replays the data through the
    model at the first bad step and attaches a diagnosis.
    """
    check_optimizer(optimizer, "keras_guard")
    refuse("keras_guard", settings, settings)  # the one table (replay=, torch's scaler=), before anything is built
    check_keywords("keras_guard", settings)
    if isinstance(optimizer, GuardedOptimizer):  # a reloaded model's optimizer: a callback for it
        if settings:
            raise ValueError(f"this optimizer is already guarded with its own settings; pass no settings "
                             f"(got {sorted(settings)}): _, cb = stabilize.keras_guard(model.optimizer)")
        return optimizer, StabilizeGuard(optimizer, diagnose_data, loss_fn)
    guarded = GuardedOptimizer(optimizer, GuardSettings(**settings_for("tensorflow", settings, "keras_guard")))
    return guarded, StabilizeGuard(guarded, diagnose_data, loss_fn)
