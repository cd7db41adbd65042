"""The trainer's Keras path: ``KerasTrainStep`` and the ``KerasUpdater`` that ``StabilityTrainer`` drives.

The step is compiled once with ``tf.function``: ``model(x, training=True)``,
the loss called the Keras way ``loss_fn(y_true, y_pred)``, the gradients, and
the very same guarded ``apply`` and :meth:`StepState.finish` that
``keras_guard`` runs inside ``model.fit``. Snapshots are host copies of every
variable (trainable, non-trainable, optimizer) and never share storage.

The policy's input, the back-off factor, is a variable the step reads
(:meth:`StepState.set_factor` assigns it only when it changes), and the step
returns the user's rate it read with its statistics: a good step costs one
call of the compiled step and one read of its row, and it is traced once per
input signature, not once per rate.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from ..guard.settings import GuardSettings
from ..guard.supervisor import Rate
from .keras_guard import check_optimizer
from .keras_optimizer import GuardedOptimizer, Protected, all_finite, copy_values
from .keras_stepstate import ROW

__all__ = ["KerasTrainStep", "KerasUpdater"]


class KerasTrainStep:
    """The trainer's Keras step: ``model(x, training=True)``, ``loss_fn(y_true, y_pred)``, guarded apply.

    Args:
        model: a ``keras.Model``.
        optimizer: a keras optimizer instance (a ``LossScaleOptimizer`` for mixed precision).
        loss_fn: called the Keras way, ``loss_fn(y_true, y_pred)``; must return a scalar.
        settings: the :class:`GuardSettings`.
    """

    def __init__(self, model, optimizer, loss_fn, settings: GuardSettings):
        if not isinstance(model, keras.Model):
            raise TypeError(f"KerasTrainStep needs a keras.Model, got {type(model).__name__}")
        check_optimizer(optimizer, "KerasTrainStep")
        if isinstance(optimizer, GuardedOptimizer):
            optimizer = optimizer.inner_optimizer
        self.model, self.loss_fn, self.settings = model, loss_fn, settings
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError("the model has no trainable parameters")
        if optimizer.built:
            known = {id(v) for v in getattr(optimizer, "_trainable_variables", [])}
            if not all(id(v) in known for v in self.variables):
                raise ValueError("the optimizer was built for other variables than this model's; pass a fresh optimizer")
        self.guard = GuardedOptimizer(optimizer, settings)
        self.guard.build(self.variables)
        self.guard.watch_buffers(model.non_trainable_variables)
        self.protected = Protected(model.non_trainable_variables if settings.guarded else [])  # ignore: no copies
        import tensorflow as tf  # gradients and compilation: Keras on TensorFlow has no backend-neutral tape

        self._tf = tf
        # No autograph, as in Keras's own fit: the step branches with ops.cond only, and converting
        # every function it calls would make the one trace several times slower.
        self._step = tf.function(self._traced, reduce_retracing=True, autograph=False)
        self._concrete = {}  # (shape, dtype) of x and y -> the concrete step the tf.function chose for them

    def _call(self, x, y):
        """Run the compiled step. The first call of an input signature goes through the tf.function
        (which traces it, or picks the function it traced for a like signature); later ones call that
        concrete function directly: the tf.function's own dispatch (binding the arguments, their trace
        types, the cache lookup) costs as much host time per step as the rest of the trainer's step."""
        tf = self._tf
        if not (type(x) is type(y) and isinstance(x, tf.Tensor)):  # a dict, a numpy array, ...: as given
            return self._step(x, y)
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        fn = self._concrete.get(key)
        if fn is None:
            out = self._step(x, y)
            self._concrete[key] = self._step.get_concrete_function(x, y)
            return out
        return fn(x, y)

    def _traced(self, x, y):
        state = self.guard.state
        state.begin()
        with self._tf.GradientTape() as tape:
            pred = self.model(x, training=True)
            loss = self.loss_fn(y, pred)
            if self.model.losses:
                loss = loss + ops.sum(ops.stack([ops.cast(r, loss.dtype) for r in self.model.losses]))
            if len(loss.shape) != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it, e.g. with ops.mean")
            scaled = self.guard.scale_loss(loss)
        grads = tape.gradient(scaled, self.variables)
        self.guard.apply(grads, self.variables)
        state.finish(self.protected)
        return ops.convert_to_tensor(state.stats)

    def run(self, x, y, lr_factor: float | Rate = 1.0, limits: tuple[float, float] | None = None) -> dict:
        """One guarded step; returns the statistics (``committed`` as the device decided) and
        ``base_lr``, the user's rate the step read before the rate was applied. ``lr_factor``: the
        Supervisor's whole :class:`Rate`, or a plain back-off factor. ``limits``: the spike
        detector's ``(loss_max, norm_max)`` (both assigned only when they change)."""
        state = self.guard.state
        state.set_rate(lr_factor if isinstance(lr_factor, Rate) else Rate(float(lr_factor)))
        state.set_limits(limits)
        stats = dict(zip(ROW, np.asarray(self._call(x, y)).tolist()))  # Python floats, read in one transfer
        if limits is not None:
            stats.update(state.limits_now())
        return stats

    @property
    def tracing_count(self) -> int:
        """How many times the compiled step was traced (once per input signature)."""
        return self._step.experimental_get_tracing_count()

    def _all(self):
        return self.variables + list(self.model.non_trainable_variables) + list(self.guard.variables)

    def capture(self) -> list[np.ndarray]:
        """A snapshot of every variable (trainable, non-trainable, optimizer), sharing no storage."""
        return copy_values(self._all())

    def restore(self, snapshot) -> None:
        for v, saved in zip(self._all(), snapshot):
            v.assign(saved)
        self.protected.sync_now()

    def weights_finite(self) -> bool:
        return bool(ops.convert_to_numpy(all_finite(self.variables)))

    def predict(self, x):
        """Inference-mode outputs as numpy (a dict or list of them for such models); no state changes."""
        out = self.model(x, training=False)
        return keras.tree.map_structure(lambda t: np.asarray(ops.convert_to_numpy(t)), out)


class KerasUpdater:
    """What :class:`~stabilize.StabilityTrainer` drives for a keras model with a keras optimizer.

    ``loss_fn`` is the trainer's ``loss(pred, target)``; it is handed to the
    step back in Keras's order. ``applied`` counts committed steps.
    """

    def __init__(self, B, model, optimizer, loss_fn, settings: GuardSettings):
        self.B = B
        self.step = KerasTrainStep(model, optimizer, lambda y_true, y_pred: loss_fn(y_pred, y_true), settings)
        self.model, self.optimizer = model, optimizer
        self.params = B.parameters(model)  # the tf.Variables under the Keras variables, for diagnosis and get_weights
        self.applied = 0
        # ``limits() -> (loss_max, norm_max) | None``: the trainer sets the Supervisor's ``spike_limits``
        self.limits = None

    def to_tensor(self, arr: np.ndarray, dtype: str | None):
        """A batch as a backend tensor, on the device the parameters live on."""
        return self.B.convert(arr, dtype)

    def base_lr(self) -> float:
        """The optimizer's own rate now (a schedule evaluated at its ``iterations``)."""
        return float(ops.convert_to_numpy(self.optimizer.learning_rate))

    @contextlib.contextmanager
    def training(self):
        self.step.protected.sync_now()  # the user may have changed the model between fits
        yield

    def run(self, xb, yb, rate) -> dict:
        """One step at ``rate``: the Supervisor's whole :class:`Rate` goes to the device as it is, and the
        recorded rate is :meth:`Rate.apply` of the base the step read (no read before it). Another
        callable ``rate(base) -> lr`` costs a read of the rate first."""
        limits = self.limits() if self.limits is not None else None
        if isinstance(rate, Rate):
            stats = self.step.run(xb, yb, rate, limits)
            lr = rate.apply(stats.pop("base_lr"))
        else:
            base = self.base_lr()
            lr = rate(base)
            stats = self.step.run(xb, yb, 1.0 if lr == base or not base else lr / base, limits)
            stats.pop("base_lr")
        stats["lr"] = lr
        if stats["committed"] == 1.0:
            self.applied += 1
        return stats

    def capture(self, where: str = "device"):
        """Host copies of every variable (``where`` is moot: Keras snapshots are numpy arrays)."""
        return self.step.capture(), self.applied

    def restore(self, snap) -> None:
        values, applied = snap  # a tuple, or a list read back from a disk snapshot
        self.applied = int(applied)
        self.step.restore(values)

    def weights_finite(self) -> bool:
        return self.step.weights_finite()

    # -- checkpoints (StabilityTrainer.save_checkpoint / load_checkpoint) ------------
    def _groups(self) -> dict:
        from .keras_state import model_variables, optimizer_variables

        return {"model": model_variables(self.model), "optimizer": optimizer_variables(self.optimizer, self.model)}

    def checkpoint_state(self) -> dict:
        """``{"keras": ...}``: model and optimizer variables and the numpy/Python/Keras RNG, as arrays
        and plain values."""
        from .keras_state import rng_state, variables_state

        return {"keras": {"variables": variables_state(self._groups()), "rng": rng_state()}}

    checkpoint_sections = {"keras"}

    def check_checkpoint_state(self, saved: dict, where: str = "checkpoint"):
        """Verify the keras section against the live variables and generators, changing nothing."""
        from ..checkpoint import CheckpointError
        from .keras_state import check_rng_state, check_variables_state

        state = saved["keras"]
        if not isinstance(state, dict) or set(state) != {"variables", "rng"}:
            raise CheckpointError(f"{where}: its keras section is not a keras StabilityTrainer's state")
        groups = self._groups()
        check_variables_state(groups, state["variables"], where)
        return groups, state["variables"], check_rng_state(state["rng"], where)

    def apply_checkpoint_state(self, checked, where: str = "checkpoint") -> None:
        from .keras_state import apply_rng_state, assign_variables_state

        groups, variables, rng = checked
        assign_variables_state(groups, variables)
        apply_rng_state(rng)
        self.step.protected.sync_now()

    def predict(self, xb):
        out = self.step.predict(xb)
        return np.asarray(out, dtype=np.float64) if isinstance(out, np.ndarray) else out
