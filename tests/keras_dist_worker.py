"""Child process for tests/test_keras_distributed.py: keras_guard under MirroredStrategy on 2 logical CPUs.

Usage: python keras_dist_worker.py FAULT POLICY [CLIP_NORM [CHECKPOINT_PATH]]  (FAULT: none, nan_input, inf_loss, nan_grad, spike; POLICY: an on_nonfinite
value or "unguarded"). With WORKER_BATCHNORM=1 the model has a BatchNormalization layer; WORKER_REPLICAS=1 runs one replica. Prints one JSON line: per step, per variable, whether the replicas agree and the values.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
from keras import ops

import stabilize

fault, policy = sys.argv[1], sys.argv[2]
bad_steps = 1 if policy == "rollback" else 3
clip = None if len(sys.argv) < 4 or sys.argv[3] == "none" else float(sys.argv[3])
rng = np.random.RandomState(0)
X = rng.randn(24, 4).astype("float32")
Y = np.stack([X @ np.array([1.0, -2.0, 0.5, 1.0], "float32"), np.zeros(24, "float32")], 1)
# batch 1 (rows 8..15) is split 4/4 over the two replicas: the fault sits in replica 1's half only
if fault == "nan_input":
    X[13, 2] = np.nan
elif fault == "inf_loss":
    Y[13, 1] = 1.0  # the loss below turns inf for this row; its gradients stay finite
elif fault == "nan_grad":
    Y[13, 1] = 2.0  # the loss below stays finite for this row; its gradient is NaN (inf * 0 in sqrt's)
elif fault == "spike":  # batch 2, on both replicas: targets x30, a finite loss spike after a 2-step warm-up
    Y[16:, 0] *= 30.0


def loss(y, p):
    mse = ops.mean(ops.square(y[:, :1] - p), axis=-1)
    inf_loss = ops.stop_gradient(ops.where(ops.equal(y[:, 1], 1.0), float("inf"), 0.0))
    off = 1.0 - ops.cast(ops.equal(y[:, 1], 2.0), "float32")  # 0 on the marked row: d sqrt(0*p)/dp = NaN there
    nan_grad = ops.sqrt(ops.abs(p[:, 0]) * 0.0 + off) - off
    return mse + inf_loss + nan_grad


def replicas(v):
    return [np.asarray(x.numpy()) for x in v.value.values]


strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"][: int(os.environ.get("WORKER_REPLICAS", "2"))])
with strategy.scope():
    keras.utils.set_random_seed(0)
    bn = [keras.layers.BatchNormalization()] if os.environ.get("WORKER_BATCHNORM") else []
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), *bn, keras.layers.Dense(1)])
    inner = keras.optimizers.Adam(1e-2)
    if policy == "unguarded":
        opt, callbacks = inner, []
    else:
        # rollback: back to the snapshot taken at train begin after one bad step; the other policies keep
        # max_bad_steps=3, since one failing batch of finite data would already be "every batch repeats it"
        spike = {"spike": "skip", "spike_warmup": 2} if fault == "spike" else {}
        opt, cb = stabilize.keras_guard(inner, on_nonfinite=policy, clip_norm=clip, max_bad_steps=bad_steps, **spike)
        callbacks = [cb]
    model.compile(optimizer=opt, loss=loss)


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        vs = list(model.trainable_variables) + list(inner.variables)
        per = [replicas(v) for v in vs]
        self.steps.append({"agree": all(all(np.array_equal(r[0], x) for x in r[1:]) for r in per),
                           "values": [r[0].tolist() for r in per],
                           # per replica: Keras keeps BatchNorm statistics per replica (no sync) under Mirrored
                           "buffers": [[x.tolist() for x in replicas(v)] for v in model.non_trainable_variables],
                           "lr_factor": None if policy == "unguarded" else float(opt.state.lr_factor.numpy())})


rec = Record()
result = {"error": None, "initial": [np.asarray(v.numpy()).tolist() for v in model.trainable_variables]}
try:
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, callbacks=callbacks + [rec], verbose=0)
except stabilize.NonFiniteError as exc:
    result["error"] = type(exc).__name__
    per = [replicas(v) for v in list(model.trainable_variables) + list(inner.variables)]
    result["after_raise"] = {"agree": all(all(np.array_equal(r[0], x) for x in r[1:]) for r in per),
                             "values": [r[0].tolist() for r in per]}
result["steps"] = rec.steps
if policy != "unguarded":
    result["committed"] = [r["committed"] for r in cb.supervisor.rows]
    result["lr"] = [r["lr"] for r in cb.supervisor.rows]
    result["spike"] = [r["spike"] for r in cb.supervisor.rows]
if policy != "unguarded" and result["error"] is None and len(sys.argv) > 4:  # a checkpoint under the strategy
    path = cb.save_checkpoint(sys.argv[4], batch=len(rec.steps))
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model2 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        inner2 = keras.optimizers.Adam(1e-2)
        opt2, cb2 = stabilize.keras_guard(inner2, on_nonfinite=policy, clip_norm=clip, max_bad_steps=bad_steps)
        model2.compile(optimizer=opt2, loss=loss)
    differed = not np.array_equal(model2.trainable_variables[0].numpy(), model.trainable_variables[0].numpy())
    position = cb2.load_checkpoint(path, model=model2)
    mine = [replicas(v) for v in list(model.trainable_variables) + list(inner.variables)]
    theirs = [replicas(v) for v in list(model2.trainable_variables) + list(inner2.variables)]
    result["loaded"] = {"position": position, "differed": differed, "equal": all(all(np.array_equal(a[0], x) for x in b)
                                                           for a, b in zip(mine, theirs)) and len(mine) == len(theirs)}
print("RESULT " + json.dumps(result))
