"""The trainer's updater for a Keras model with a Keras optimizer.

The step runs compiled (``tf.function``, traced once per input signature):
forward in training mode, the loss in Keras's ``(y_true, y_pred)`` order,
gradients, ``clip_grads``, the finite checks, and the optimizer applied under
``cond`` only when the step is good. Non-trainable variables (BatchNorm's
moving statistics, seed-generator states) that the forward pass changed are
put back when it is not.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..guard.supervisor import STAT_FIELDS

__all__ = ["KerasUpdater"]


class KerasUpdater:
    """Runs one guarded Keras-optimizer step for the trainer."""

    def __init__(self, B, model, optimizer, loss_fn, settings):
        import tensorflow as tf

        from ..ops import clip_grads, global_norm

        self.B, self.model, self.optimizer = B, model, optimizer
        self.params = B.parameters(model)
        variables = list(model.trainable_variables)
        optimizer.build(variables)
        self._factor = tf.Variable(1.0, dtype=tf.float64, trainable=False)
        lr = optimizer.learning_rate
        self._schedule = not hasattr(lr, "assign")
        self._lr_var = None if self._schedule else optimizer._learning_rate
        self._shadow = [tf.Variable(v.value, trainable=False) for v in model.non_trainable_variables]
        guard = settings.guarded
        clip_norm, clip_value = settings.clip_norm, settings.clip_value
        non_trainable = list(model.non_trainable_variables)
        shadow = self._shadow

        @tf.function(reduce_retracing=True)
        def step(x, y, user_lr):
            with tf.GradientTape() as tape:
                loss = loss_fn(model(x, training=True), y)
            grads = tape.gradient(loss, self.params)
            grads = [tf.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
            if clip_norm is None and clip_value is None:
                norm = global_norm(grads)
            else:
                grads, norm = clip_grads(grads, max_norm=clip_norm, max_value=clip_value)
            loss_ok, grads_ok = tf.math.is_finite(loss), tf.math.is_finite(norm)
            commit = (loss_ok & grads_ok) if guard else tf.constant(True)

            def apply():
                if self._lr_var is not None:  # back-off on top of the optimizer's own rate, for this update only
                    self._lr_var.assign(tf.cast(user_lr * self._factor, self._lr_var.dtype))
                optimizer.apply(grads, variables)
                if self._lr_var is not None:
                    self._lr_var.assign(tf.cast(user_lr, self._lr_var.dtype))
                for s, v in zip(shadow, non_trainable):
                    s.assign(v)
                return tf.constant(True)

            def discard():
                for s, v in zip(shadow, non_trainable):
                    v.assign(s)
                return tf.constant(False)

            tf.cond(commit, apply, discard)
            f64 = lambda t: tf.cast(t, tf.float64)
            zero = tf.constant(0.0, tf.float64)
            return tf.stack([f64(loss), f64(norm), f64(loss_ok), f64(grads_ok), tf.constant(1.0, tf.float64),
                             zero, zero, zero, f64(commit)])

        self._step = step
        self.applied = 0

    def to_tensor(self, arr: np.ndarray, dtype: str | None):
        """A batch as a backend tensor, on the device the parameters live on."""
        return self.B.convert(arr, dtype)

    def base_lr(self) -> float:
        return float(np.asarray(self.optimizer.learning_rate))

    @contextlib.contextmanager
    def training(self):
        for s, v in zip(self._shadow, self.model.non_trainable_variables):
            s.assign(v)
        yield

    def run(self, xb, yb, rate) -> dict:
        import tensorflow as tf

        base = self.base_lr()
        lr = rate(base)
        self._factor.assign(lr / base if base else 1.0)
        user_lr = tf.constant(base if self._lr_var is None else float(self._lr_var.numpy()), tf.float64)
        stats = dict(zip(STAT_FIELDS, self.B.read(self._step(xb, yb, user_lr))))
        stats["lr"] = lr
        if stats["committed"] == 1.0:
            self.applied += 1
        return stats

    def capture(self):
        return ([v.numpy().copy() for v in self.model.variables],
                [v.numpy().copy() for v in self.optimizer.variables], self.applied)

    def restore(self, snap) -> None:
        weights, opt_vars, applied = snap
        for v, w in zip(self.model.variables, weights):
            v.assign(w)
        for v, w in zip(self.optimizer.variables, opt_vars):
            v.assign(w)
        for s, v in zip(self._shadow, self.model.non_trainable_variables):
            s.assign(v)
        self.applied = applied

    def weights_finite(self) -> bool:
        B = self.B
        return bool(B.read(B.stack([B.all_finite(self.params)], "float64"))[0])

    def predict(self, xb) -> np.ndarray:
        return np.asarray(self.B.to_numpy(self.model(xb, training=False)), dtype=np.float64)
