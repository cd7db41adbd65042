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


def test_trainer_step_update_ratio_is_measured_on_the_applied_update_and_undone_exactly():
    import keras

    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    model, opt = _model(), keras.optimizers.SGD(0.1)
    loose = KerasTrainStep(model, opt, keras.losses.MeanSquaredError(), GuardSettings(max_update_ratio=10.0))
    stats = loose.run(X, y)
    assert stats["committed"] == 1.0 and 0.0 < stats["update_ratio"] < 10.0
    tight = KerasTrainStep(model, opt, keras.losses.MeanSquaredError(), GuardSettings(max_update_ratio=1e-9))
    before = _every(model, opt)
    stats = tight.run(X, y)
    assert stats["large_update"] == 1.0 and stats["committed"] == 0.0 and stats["update_ratio"] > 1e-9
    assert Z.same(_every(model, opt), before)  # weights, BN statistics, seed state and iterations put back


def _breaking_fit(policy):
    import keras

    import stabilize

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True) * 1e4
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(1e36), on_nonfinite=policy, snapshot_every=1)
    model.compile(optimizer=opt, loss="mse")
    return model, cb, lambda: model.fit(X, y, batch_size=4, shuffle=False, verbose=0, callbacks=[cb])


def test_fit_recovers_weights_an_update_made_non_finite():
    model, cb, fit = _breaking_fit("rollback")
    fit()
    assert all(np.isfinite(w).all() for w in model.get_weights())  # back to the last snapshot, not left broken
    assert any("weights" in e.nonfinite for e in cb.history.events)
    assert cb.held_bytes() == sum(np.asarray(v).nbytes for v in _every(model, model.optimizer))


@pytest.mark.parametrize("policy", ["skip", "backoff"])
def test_weights_an_update_broke_stop_the_fit_when_no_snapshot_is_held(policy):
    """Only rollback holds a snapshot: under skip, weights a native Keras update made non-finite stop the
    fit at the step that finds them, and the error names the two ways out."""
    import stabilize

    model, cb, fit = _breaking_fit(policy)
    with pytest.raises(stabilize.NonFiniteError, match=r"holds no snapshot to restore: pass on_nonfinite='rollback'"
                                                       r".*verify_updates=True") as err:
        fit()
    assert cb.held_bytes() == 0 and not cb._snapshots.held
    last = err.value.report.events[-1]
    assert last.action == "raised" and "weights" in last.nonfinite


def test_back_off_factor_multiplies_the_schedule_on_the_device():
    import keras
    import tensorflow as tf

    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    mse = keras.losses.MeanSquaredError()

    def dense():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])

    plain, popt = dense(), keras.optimizers.SGD(0.05)
    with tf.GradientTape() as tape:
        loss = mse(y, plain(X, training=True))
    popt.apply(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables)
    model = dense()
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    step = KerasTrainStep(model, keras.optimizers.SGD(sched), mse, GuardSettings(on_nonfinite="backoff"))
    assert step.run(X, y, lr_factor=0.5)["committed"] == 1.0
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(plain.trainable_variables, model.trainable_variables))
    assert isinstance(step.guard.inner_optimizer._learning_rate, keras.optimizers.schedules.ExponentialDecay)


def test_a_spec_optimizer_on_a_model_with_state_names_that_state():
    import keras

    import stabilize
    from stabilize.optim import SGD

    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(8), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"holds state outside its parameters \(seed_generator(_\d+)?/seed_generator_state\)"
                                         r".*pass a native optimizer"):
        stabilize.StabilityTrainer(model, "mse", SGD(lr=0.1))
