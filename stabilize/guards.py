"""Drop-in guards for loops you keep: a hand-written torch loop, and Keras ``model.fit``.

Both are thin adapters over the guarded-step core (:mod:`stabilize.guard`),
with the very same settings, policy and records as ``StabilityTrainer``:

* :class:`~stabilize.integrations.torch_guard.TorchGuard`:
  ``guard = TorchGuard(model, optimizer, ...)``, then ``guard.step(loss)``
  replaces ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
* :func:`keras_guard`: returns ``(optimizer, callback)``. The optimizer wraps
  yours and skips a bad update inside the compiled train step (a callback
  alone runs after the update has happened); the callback applies the policy
  (back-off, rollback, raise) between steps and records the events.

``TorchGuard`` is loaded on first use (``stabilize.TorchGuard``), so importing
stabilize imports no framework.
"""

from __future__ import annotations

import logging


from .guard.settings import GuardSettings
from .guard.supervisor import Supervisor
from .history import History
from .registry import get_backend

__all__ = ["keras_guard"]

logger = logging.getLogger("stabilize")


def __getattr__(name):
    if name == "TorchGuard":
        from .integrations.torch_guard import TorchGuard

        return TorchGuard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keras_guard(optimizer, *, diagnose_data=None, loss_fn=None, **settings):
    """Guard Keras ``model.fit``: returns ``(guarded_optimizer, callback)``.

    Example::

        opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.5), on_nonfinite="backoff")
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, y, callbacks=[cb])
        print(cb.history.report())

    ``diagnose_data=(x, y)`` with ``loss_fn(y_true, y_pred)`` lets the callback
    replay the data through the model when the first bad step happens and
    attach a diagnosis (Keras does not hand the failing batch to callbacks).
    ``**settings`` are :class:`~stabilize.guard.settings.GuardSettings`.
    """
    import keras

    from .backends.tensorflow import make_guarded_optimizer

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"keras_guard wraps a keras optimizer instance, e.g. keras.optimizers.Adam(1e-3); "
                        f"got {type(optimizer).__name__} {optimizer!r}")
    config = GuardSettings(**settings)
    guarded = make_guarded_optimizer(optimizer, clip_norm=config.clip_norm, clip_value=config.clip_value,
                                     max_update_ratio=config.max_update_ratio)

    class StabilizeGuard(keras.callbacks.Callback):
        """Applies the stabilize policy after each batch; ``history`` holds the record."""

        def __init__(self):
            super().__init__()
            self.supervisor = Supervisor(config)
            self._lr0 = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            self._snapshot = None
            self._epoch = 0

        @property
        def history(self) -> History:
            return self.supervisor.history()

        def on_train_begin(self, logs=None):
            if config.on_nonfinite == "rollback":
                self._take()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def _take(self):
            self._snapshot = ([v.numpy() for v in self.model.weights], [v.numpy() for v in optimizer.variables])
            self.supervisor.snapshot_taken()

        def on_train_batch_end(self, batch, logs=None):
            values = [float(v) for v in keras.ops.convert_to_numpy(guarded.stabilize_stats)]
            stats = dict(zip(("loss", "grad_norm", "loss_finite", "grads_finite", "weights_finite", "update_ratio",
                              "committed"), values))
            loss = (logs or {}).get("loss")
            stats["loss"] = float("nan") if loss is None else float(loss)
            stats["lr"] = self.supervisor.lr(self._lr0)
            sup = self.supervisor
            decision = sup.observe(stats, epoch=self._epoch, batch=batch)
            if decision.action not in ("applied", "scaler-skip") and sup.diagnosis is None \
                    and diagnose_data is not None and loss_fn is not None:
                x, y = diagnose_data
                B = get_backend("tensorflow")
                sup.diagnose(B, self.model, lambda p, t: loss_fn(t, p), B.convert(x), B.convert(y),
                             B.parameters(self.model))
            if decision.snapshot:
                self._take()
            elif decision.restore:
                weights, opt_vars = self._snapshot
                self.model.set_weights(weights)
                for v, s in zip(optimizer.variables, opt_vars):
                    v.assign(s)
            optimizer.learning_rate.assign(sup.lr(self._lr0))
            if decision.stop:
                self.model.stop_training = True
                sup.raise_for(decision)

    return guarded, StabilizeGuard()
