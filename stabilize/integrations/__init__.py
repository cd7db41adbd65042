"""Framework adapters over the guarded-step core (:mod:`stabilize.guard`).

Each module here may import its framework by name; nothing else in stabilize
does (``backends/`` translates primitives only). A new framework gets its
updater (how one step runs and what state it changes) and its guard here.

* ``neutral``: the ``stabilize.optim`` specs, the same update math on every backend.
* ``torch_state``, ``torch_step``, ``torch_guard``, ``torch_updater``: torch.optim
  optimizers, ``GradScaler``, schedulers, ``TorchGuard``.
* ``keras_*``: Keras optimizers, ``LossScaleOptimizer``, ``keras_guard``.
"""
