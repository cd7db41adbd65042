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

__all__ = ["keras_guard"]

logger = logging.getLogger("stabilize")


def __getattr__(name):
    if name == "TorchGuard":
        from .integrations.torch_guard import TorchGuard

        return TorchGuard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keras_guard(optimizer, *, diagnose_data=None, loss_fn=None, **settings):
    """Guard Keras ``model.fit``: returns ``(guarded_optimizer, callback)``.

    See :func:`stabilize.integrations.keras_guard.keras_guard` (loaded on first use).

    Example::

        opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-3), clip_norm=1.0, on_nonfinite="backoff")
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, y, callbacks=[cb])
        print(cb.history.report())
    """
    from .integrations.keras_guard import keras_guard as _keras_guard

    return _keras_guard(optimizer, diagnose_data=diagnose_data, loss_fn=loss_fn, **settings)
