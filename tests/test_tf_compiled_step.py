"""The TensorFlow step is traced once, and the policy's inputs reach it as variables.

Each TF entry point (``StabilityTrainer`` with a Keras optimizer, with a
``stabilize.optim`` spec, and ``keras_guard`` in ``model.fit``) compiles its
step with ``tf.function``. The learning rate and the back-off factor are
variables the compiled step reads, so a back-off changes the rate without a
retrace, and a second ``fit`` reuses the same trace. The rate a back-off sets
is checked where it matters: in the weights after one SGD step, against a
float64 numpy reference.
"""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


N, BATCH, LR = 160, 8, 0.125  # 20 batches; 0.125 and its back-off 0.0625 are exact in float32 and float64


def _data(bad_batch=None):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 3))
    y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.25
    if bad_batch is not None:
        X[bad_batch * BATCH + 1, 2] = np.nan
    return X.astype(np.float32), y.astype(np.float32)


def _model(dtype="float32"):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,), dtype=dtype), keras.layers.Dense(8, activation="tanh", dtype=dtype),
                             keras.layers.Dense(1, dtype=dtype)])


def _tf_functions(fn, depth=0, seen=None):
    """The ``tf.function`` objects in a Keras ``train_function``'s closure (the traced step)."""
    seen = set() if seen is None else seen
    if id(fn) in seen or depth > 4:
        return []
    seen.add(id(fn))
    if hasattr(fn, "experimental_get_tracing_count"):
        return [fn]
    found = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if callable(value):
            found += _tf_functions(value, depth + 1, seen)
    return found


def _trainer(native, **settings):
    import keras
    import tensorflow as tf

    from stabilize import StabilityTrainer
    from stabilize.optim import SGD

    opt = keras.optimizers.SGD(LR) if native else SGD(lr=LR)
    mse = lambda y_true, y_pred: tf.reduce_mean(tf.square(y_pred - y_true))
    return StabilityTrainer(_model(settings.pop("dtype", "float32")), mse, opt, progress=False, **settings)


def _traces(t) -> int:
    step = t.updater.step._step if hasattr(t.updater, "step") else t.updater._step
    return step.experimental_get_tracing_count()


@pytest.mark.parametrize("native", [True, False], ids=["keras-optimizer", "neutral-sgd"])
def test_trainer_traces_once_across_a_backoff_and_a_second_fit(native):
    X, y = _data()
    t = _trainer(native, clip_norm=1.0, on_nonfinite="backoff", grow_after=None)
    h = t.fit(X, y, batch_size=BATCH, shuffle=False)
    assert len(h.losses) == 20 and h.events == [] and _traces(t) == 1
    Xbad, _ = _data(bad_batch=4)
    h = t.fit(Xbad, y, batch_size=BATCH, shuffle=False)
    assert [(e.step - 20, e.action) for e in h.events] == [(4, "backed-off")]
    assert h.lrs[:5].tolist() == [LR] * 5 and h.lrs[5:].tolist() == [LR / 2] * 15  # the rate the step used changed ...
    assert _traces(t) == 1  # ... with no new trace
    t.fit(X, y, batch_size=BATCH, shuffle=False)
    assert _traces(t) == 1 and t.current_lr() == LR / 2


def test_keras_guard_in_fit_traces_once_across_a_backoff_and_a_second_fit():
    import keras

    from stabilize import keras_guard

    X, y = _data()
    model = _model()
    opt, cb = keras_guard(keras.optimizers.SGD(LR), clip_norm=1.0, on_nonfinite="backoff", grow_after=None)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])
    assert len(cb.history.losses) == 20 and cb.tracing_count == 1
    compiled = _tf_functions(model.train_function)
    assert all(f.experimental_get_tracing_count() == 1 for f in compiled)
    Xbad, _ = _data(bad_batch=4)
    model.fit(Xbad, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])
    h = cb.history
    assert [(e.step - 20, e.action) for e in h.events] == [(4, "backed-off")]
    assert h.lrs[20:25].tolist() == [LR] * 5 and h.lrs[25:].tolist() == [LR / 2] * 15
    assert float(opt.state.lr_factor.numpy()) == 0.5
    model.fit(X, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])
    assert cb.tracing_count == 1 and len(cb.history.losses) == 60
    assert all(f.experimental_get_tracing_count() == 1 for f in _tf_functions(model.train_function))


def _sgd_reference(weights, x, y, lr):
    """One float64 SGD step of MSE through Dense(8, tanh) -> Dense(1), by hand."""
    w1, b1, w2, b2 = (np.asarray(w, dtype=np.float64) for w in weights)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    h = np.tanh(x @ w1 + b1)
    d_out = 2.0 * (h @ w2 + b2 - y) / y.size
    d_h = (d_out @ w2.T) * (1.0 - h**2)
    grads = [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]
    return [w - lr * g for w, g in zip((w1, b1, w2, b2), grads)]


def _weights(model):
    return [np.array(v.numpy(), dtype=np.float64) for v in model.trainable_variables]


def _close(got, want) -> bool:
    return all(np.allclose(g, w, rtol=1e-12, atol=1e-14) for g, w in zip(got, want))


@pytest.mark.parametrize("native", [True, False], ids=["keras-optimizer", "neutral-sgd"])
def test_a_backoff_lowers_the_rate_the_compiled_trainer_step_uses(native):
    X, y = _data(bad_batch=0)
    t = _trainer(native, on_nonfinite="backoff", grow_after=None, dtype="float64")
    before = _weights(t.model)
    h = t.fit(X[: 2 * BATCH].astype(np.float64), y[: 2 * BATCH].astype(np.float64), batch_size=BATCH, shuffle=False)
    assert [(e.step, e.action) for e in h.events] == [(0, "backed-off")] and h.lrs.tolist() == [LR, LR / 2]
    xb, yb = X[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH]
    after = _weights(t.model)
    assert _close(after, _sgd_reference(before, xb, yb, LR / 2))
    assert not _close(after, _sgd_reference(before, xb, yb, LR))
    assert _traces(t) == 1


def test_a_backoff_lowers_the_rate_keras_guard_uses_in_fit():
    import keras

    from stabilize import keras_guard

    X, y = _data(bad_batch=0)
    model = _model("float64")
    before = _weights(model)
    opt, cb = keras_guard(keras.optimizers.SGD(LR), on_nonfinite="backoff", grow_after=None)
    model.compile(optimizer=opt, loss=keras.losses.MeanSquaredError(dtype="float64"))  # Keras's default: floatx
    model.fit(X[: 2 * BATCH].astype(np.float64), y[: 2 * BATCH].astype(np.float64), batch_size=BATCH,
              shuffle=False, verbose=0, callbacks=[cb])
    h = cb.history
    assert [(e.step, e.action) for e in h.events] == [(0, "backed-off")] and h.lrs.tolist() == [LR, LR / 2]
    xb, yb = X[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH]
    after = _weights(model)
    assert _close(after, _sgd_reference(before, xb, yb, LR / 2))
    assert not _close(after, _sgd_reference(before, xb, yb, LR))
    assert cb.tracing_count == 1
