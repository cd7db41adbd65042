"""StabilityTrainer's Keras path (KerasUpdater over the shared guarded step)."""

import numpy as np
import pytest

import zoo_keras as Z


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                             keras.layers.Dropout(0.5), keras.layers.Dense(1)])


def _optimizer():
    import keras

    return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=1, decay_rate=0.9))


def _every(model, opt):
    import keras

    return [np.array(keras.ops.convert_to_numpy(v), copy=True)
            for v in list(model.trainable_variables) + list(model.non_trainable_variables) + list(opt.variables)]


def test_trainer_skips_a_nan_batch_as_if_it_were_not_there():
    import keras

    from stabilize import StabilityTrainer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3)).astype(np.float32)
    y = (np.abs(X.sum(1, keepdims=True)) + 1.0).astype(np.float32)
    Xbad = X.copy()
    Xbad[5, 0] = np.nan  # batch 1 of 8
    keep = np.r_[0:4, 8:32]
    mape = keras.losses.MeanAbsolutePercentageError()
    control, copt = _model(), _optimizer()
    StabilityTrainer(control, mape, copt, progress=False).fit(X[keep], y[keep], batch_size=4, shuffle=False)
    model, opt = _model(), _optimizer()
    t = StabilityTrainer(model, mape, opt, progress=False)
    h = t.fit(Xbad, y, batch_size=4, shuffle=False)
    assert [(e.step, e.action) for e in h.events] == [(1, "skipped")]
    assert int(opt.iterations.numpy()) == 7  # the schedule did not advance on the skipped step
    assert Z.same(_every(model, opt), _every(control, copt))  # BN statistics and Dropout's seed state included
    before = _every(model, opt)
    p1, p2 = t.predict(X), t.predict(X)
    assert np.isfinite(p1).all() and np.array_equal(p1, p2) and Z.same(_every(model, opt), before)
