"""A Keras user guards their own keras.Model with StabilityTrainer.

The custom loss masks non-finite values with where(is_finite(...)) (the masked-loss scenario):
the printed loss looks fine while the gradients are NaN. The guard sees the
NaN gradients and skips those steps; a plain loop would have NaN weights.

Run: python examples/keras_user.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from stabilize import StabilityTrainer
from stabilize.optim import Adam

rng = np.random.default_rng(0)
X = rng.normal(size=(512, 4)).astype(np.float32)
y = (3.0 + X @ np.array([[0.3], [-0.2], [0.1], [0.2]])).astype(np.float32)
y[[7, 99]] = 0.0  # zero targets: the relative error below is inf there


def masked_relative_error(pred, target):
    err = tf.square((pred - target) / target)
    return tf.reduce_mean(tf.where(tf.math.is_finite(err), err, tf.zeros_like(err)))


model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
trainer = StabilityTrainer(model, masked_relative_error, Adam(lr=1e-2), on_nonfinite="skip")
history = trainer.fit(tf.data.Dataset.from_tensor_slices((X, y)).batch(64), epochs=5)

print(history.report())
assert all(np.isfinite(w).all() for w in model.get_weights()), "a NaN update was applied"
