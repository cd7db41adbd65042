"""A small Keras model zoo for the guard tests: tiny, seeded, CPU-fast.

Each entry builds a fresh model (same weights for the same seed), its loss and
its data: ``Case(name, build, loss, x, y)``. ``x``/``y`` are numpy (dicts for
the two-input model). ``inject`` writes one kind of fault into a copy of the
data; ``state`` reads every variable of a compiled model as numpy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

BATCH = 4
N = 8 * BATCH  # 8 batches per epoch
BIG = 1e4  # marks the rows of the batch whose loss is made inf (finite gradients)


@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    loss: Any
    x: Any
    y: Any
    mixed: bool = False


def _cnn():
    import keras

    return keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dropout(0.25),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])


def _lstm():
    import keras

    return keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4), keras.layers.Dense(1)])


def _mha():
    import keras

    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(tokens)  # padding 0 is masked in attention
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(1)(h))


def _two_inputs():
    import keras

    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    h = keras.layers.BatchNormalization()(h)
    return keras.Model({"a": a, "b": b}, {"reg": keras.layers.Dense(1, name="reg")(h),
                                          "cls": keras.layers.Dense(1, activation="sigmoid", name="cls")(h)})


@contextlib.contextmanager
def mixed_policy():
    """Keras's global dtype policy set to mixed_float16 while models are built, then put back exactly."""
    import keras
    from keras.src.backend.common import global_state

    before = global_state.get_global_attribute("dtype_policy", None)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        global_state.set_global_attribute("dtype_policy", before)


def _mixed():
    import keras

    with mixed_policy():  # the model's own policy: compile wraps its optimizer in a LossScaleOptimizer
        x = keras.Input((3,))
        h = keras.layers.Dense(4, activation="relu")(x)
        h = keras.layers.BatchNormalization()(h)
        out = keras.layers.Dense(1, dtype="float32")(h)  # the output in float32, as Keras advises
        return keras.Model(x, out)


def _loss_with_marker(base):
    """``base`` plus an inf that carries no gradient when the batch holds a marked target."""
    from keras import ops

    def loss(y_true, y_pred):
        flag = ops.max(ops.abs(ops.cast(y_true, "float32"))) > BIG / 2
        return base(y_true, y_pred) + ops.stop_gradient(ops.where(flag, float("inf"), 0.0))

    return loss


def cases() -> list[Case]:
    import keras

    rng = np.random.default_rng(0)
    mse = keras.losses.MeanSquaredError()
    img = rng.normal(size=(N, 6, 6, 1)).astype(np.float32)
    seq = rng.normal(size=(N, 5, 3)).astype(np.float32)
    tok = rng.integers(1, 10, size=(N, 6)).astype(np.int32)
    tok[:, 4:] = 0  # padding
    a, b = rng.normal(size=(N, 3)).astype(np.float32), rng.normal(size=(N, 2)).astype(np.float32)
    y1 = lambda arr: arr.reshape(N, -1).mean(1, keepdims=True).astype(np.float32)
    mixed_x = rng.normal(size=(N, 3)).astype(np.float32)
    bce = keras.losses.BinaryCrossentropy()
    return [
        Case("cnn_bn_dropout", _cnn, _loss_with_marker(mse), img, y1(img)),
        Case("lstm", _lstm, _loss_with_marker(mse), seq, y1(seq)),
        Case("mha_masked", _mha, _loss_with_marker(mse), tok, (tok[:, :1] / 10).astype(np.float32)),
        Case("two_inputs_dict", _two_inputs, {"reg": _loss_with_marker(mse), "cls": bce},
             {"a": a, "b": b}, {"reg": y1(a), "cls": (a[:, :1] > 0).astype(np.float32)}),
        Case("mixed_float16", _mixed, _loss_with_marker(mse), mixed_x, y1(mixed_x), mixed=True),
    ]


def inject(case: Case, kind: str, batch: int):
    """A copy of ``(x, y)`` with a fault in batch ``batch``: ``"batch"`` (NaN input) or ``"loss"`` (inf loss)."""
    x = {k: v.copy() for k, v in case.x.items()} if isinstance(case.x, dict) else case.x.copy()
    y = {k: v.copy() for k, v in case.y.items()} if isinstance(case.y, dict) else case.y.copy()
    row = batch * BATCH
    if kind == "batch":
        if case.name == "mha_masked":  # token ids cannot be NaN: poison the target instead
            y[row, 0] = np.nan
        else:
            target = x["a"] if isinstance(x, dict) else x
            target.reshape(N, -1)[row, 0] = np.nan
    elif kind == "loss":
        (y["reg"] if isinstance(y, dict) else y)[row, 0] = BIG
    else:
        raise ValueError(kind)
    return x, y


def state(model) -> list[np.ndarray]:
    """Every variable of a compiled model: trainable, non-trainable, optimizer (iterations, scale)."""
    import keras

    variables = list(model.trainable_variables) + list(model.non_trainable_variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in variables]


def same(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=False) for x, y in zip(a, b))
