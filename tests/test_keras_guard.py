"""keras_guard and the Keras integration: saving, RNG, metrics, schedules, ignore, mixed precision, errors."""

import numpy as np
import pytest

import zoo_keras as Z


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _data(n=32, nan_row=None):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    if nan_row is not None:
        X[nan_row, 1] = np.nan
    return X, y


def _dropout_bn():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                             keras.layers.Dropout(0.5), keras.layers.Dense(1)])


def _fit(model, opt, X, y, callbacks=(), epochs=1, batch_size=4, loss="mse", **compile_args):
    model.compile(optimizer=opt, loss=loss, **compile_args)
    return model.fit(X, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))


def test_guarded_model_saves_and_reloads(tmp_path):
    import keras

    import stabilize
    from stabilize.integrations.keras import GuardedOptimizer

    X, y = _data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])  # no Dropout: Keras does not save seed-generator states
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(0.01), clip_norm=2.0, on_nonfinite="backoff")
    _fit(model, opt, X, y, [cb])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, GuardedOptimizer)
    assert loaded.optimizer.settings == opt.settings and isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
    assert Z.same(Z.state(loaded), Z.state(model))  # weights, BN statistics, Adam moments and iterations
    _, cb2 = stabilize.keras_guard(loaded.optimizer)  # the reloaded optimizer trains only with its callback
    h = loaded.fit(X, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb2])  # and it trains on
    assert np.isfinite(h.history["loss"][0]) and int(loaded.optimizer.iterations.numpy()) == 16


@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_skipped_batch_consumes_no_rng_and_history_shows_applied_steps_only():
    import keras

    import stabilize

    X, y = _data(nan_row=5)  # batch 1 of 8
    keep = np.r_[0:4, 8:32]
    control = _dropout_bn()
    hc = _fit(control, keras.optimizers.Adam(0.01), X[keep], y[keep], epochs=2, metrics=["mae"])
    model = _dropout_bn()
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(0.01))
    h = _fit(model, opt, X, y, [cb], epochs=2, metrics=["mae"])
    assert Z.same(Z.state(model), Z.state(control))  # Dropout's seed state included
    assert h.history == hc.history  # loss and compiled metric: the mean over applied steps, no NaN
    events = cb.history.events
    assert [(e.step, e.epoch, e.batch_index, e.action) for e in events] == [(1, 0, 1, "skipped"), (9, 1, 1, "skipped")]


def test_backoff_multiplies_an_exponential_decay_schedule_and_skips_do_not_advance_it():
    import keras

    import stabilize

    X, y = _data(nan_row=5)
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    inner = keras.optimizers.SGD(sched)
    opt, cb = stabilize.keras_guard(inner, on_nonfinite="backoff", grow_after=None)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    _fit(model, opt, X, y, [cb])
    assert int(inner.iterations.numpy()) == 7  # 8 batches, one skipped
    lrs = cb.history.lrs
    assert lrs[0] == np.float32(0.1) and lrs[2] == pytest.approx(0.1 * 0.5 * 0.5, rel=1e-6)  # step 2: 1 applied, backed off
    assert isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule)  # never overwritten


def test_learning_rate_scheduler_and_reduce_on_plateau_are_not_undone():
    import keras

    import stabilize

    X, y = _data()
    inner = keras.optimizers.SGD(0.1)
    opt, cb = stabilize.keras_guard(inner, on_nonfinite="backoff")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    sched = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.01 * (epoch + 1))
    _fit(model, opt, X, y, [cb, sched], epochs=2)
    assert float(inner.learning_rate.numpy()) == np.float32(0.02)
    assert cb.history.lrs[0] == np.float32(0.01) and cb.history.lrs[-1] == np.float32(0.02)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    _fit(model, opt, X, y, [cb, plateau], epochs=2)
    assert float(inner.learning_rate.numpy()) == np.float32(0.01)  # halved after the 2nd epoch, and kept


def test_ignore_applies_every_update_without_copies():
    import keras

    import stabilize

    X, y = _data(nan_row=5)
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1), on_nonfinite="ignore")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    _fit(model, opt, X, y, [cb])
    assert int(opt.iterations.numpy()) == 8 and bool(cb.history.committed.all())
    assert not np.isfinite(model.get_weights()[0]).all()  # the NaN update was applied, as asked
    events = cb.history.events
    assert not cb._snapshots.held and cb.held_bytes() == 0  # no rollback, so no snapshot
    assert events[0].step == 1 and {e.action for e in events} == {"applied"}


def _mixed():
    import keras

    keras.utils.set_random_seed(0)
    with Z.mixed_policy():
        x = keras.Input((3,))
        h = keras.layers.Dense(8)(x)
        out = keras.layers.Dense(1, dtype="float32")(h)
        return keras.Model(x, out)


def test_mixed_precision_overflow_is_a_scaler_event_not_a_failure():
    import keras

    import stabilize

    X, y = _data()
    X *= 300.0  # float16 gradients overflow at the initial scale 2**15
    model = _mixed()
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(1e-6), on_nonfinite="backoff")
    _fit(model, opt, X, y, [cb])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras wrapped the guard
    kinds = {e.kind for e in cb.history.events}
    assert kinds == {"scaler"} and cb.supervisor.policy.backoffs == 0 and cb.history.diagnosis is None
    skips = sum(e.kind == "scaler" for e in cb.history.events)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15 / 2**skips
    assert int(opt.iterations.numpy()) == 8 - skips


def test_a_collapsed_loss_scale_goes_to_the_policy():
    import keras

    import stabilize

    X, y = _data()
    X *= 300.0
    model = _mixed()
    # max_bad_steps=10: every one of the 8 batches overflows; with the default 3 the run would stop at the
    # third (a failure every batch repeats at the same weights: backing off cannot cure it)
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(1e-6), on_nonfinite="backoff", min_loss_scale=2.0**15,
                                    max_bad_steps=10)
    _fit(model, opt, X, y, [cb])
    events = cb.history.events
    assert events and {e.kind for e in events} == {"nonfinite"} and events[0].action == "backed-off"
    assert events[0].nonfinite == ("gradients",)


def test_guard_holding_a_loss_scale_optimizer_in_a_float32_model_and_refused_double_scaling():
    import keras

    import stabilize

    X, y = _data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    _fit(model, opt, X, y, [cb])
    assert int(opt.iterations.numpy()) == 8 and cb.history.events == []
    opt, cb = stabilize.keras_guard(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    with pytest.raises(ValueError, match="auto_scale_loss=False"):
        _fit(_mixed(), opt, X, y, [cb])


def test_max_update_ratio_measures_the_clipped_update():
    import keras

    import stabilize

    X, y = _data()
    y *= 100.0
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.5), clip_norm=1.0, on_nonfinite="backoff",
                                    max_update_ratio=0.5)
    _fit(model, opt, X, y, [cb])
    ratios = cb.history.update_ratios
    assert int(opt.iterations.numpy()) == 8 - len(cb.history.events)
    assert bool(cb.history.committed[ratios <= 0.5].all()) and not bool(cb.history.committed[ratios > 0.5].any())
    assert int(opt.iterations.numpy()) >= 4  # clipping keeps the applied update small: it trains


def test_indexed_slices_dispatch_to_tensorflow():
    import tensorflow as tf

    import stabilize

    g = tf.IndexedSlices(tf.constant([[3.0, 0.0], [0.0, 4.0]]), tf.constant([1, 1]), tf.constant([1000, 2]))
    assert stabilize.backend_for(g).name == "tensorflow"
    assert float(stabilize.global_norm([g])) == 5.0
    from stabilize.integrations.keras_optimizer import global_norm

    assert float(global_norm([g])) == 5.0  # duplicate rows summed, no dense table


def test_trainer_step_predict_and_snapshots_leave_state_alone():
    import keras

    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    X, y = _data()
    model = _dropout_bn()
    step = KerasTrainStep(model, keras.optimizers.Adam(0.01), keras.losses.MeanAbsolutePercentageError(),
                          GuardSettings())
    step.run(X[:4], y[:4])
    snap = step.capture()
    kept = [a.copy() for a in snap]
    before = Z.state(model)
    p1, p2 = step.predict(X), step.predict(X)
    assert np.array_equal(p1, p2) and Z.same(Z.state(model), before)
    step.run(X[4:8], y[4:8])
    assert not Z.same(Z.state(model), before) and Z.same(step.capture(), snap) is False
    step.restore(snap)
    assert Z.same(step.capture(), snap) and step.weights_finite()
    step.run(X[4:8], y[4:8])
    assert not Z.same(step.capture(), snap) and Z.same(snap, kept)  # live variables moved on; the snapshot did not


def test_clear_errors():
    import keras
    import torch

    import stabilize
    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    with pytest.raises(TypeError, match="keras optimizer instance"):
        stabilize.keras_guard("adam")
    with pytest.raises(TypeError, match="TorchGuard"):
        stabilize.keras_guard(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="keras.Model"):
        KerasTrainStep(torch.nn.Linear(2, 1), keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError(), GuardSettings())
    with pytest.raises(ValueError, match="clip_norm"):
        stabilize.keras_guard(keras.optimizers.SGD(0.1), clip_norm=-1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    _, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="compile the model with the optimizer keras_guard returned"):
        _fit(model, keras.optimizers.SGD(0.1), *_data(), [cb])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        _fit(model, opt, *_data(), [cb], steps_per_execution=2)
    step = KerasTrainStep(model, keras.optimizers.SGD(0.1), lambda t, p: (t - p) ** 2, GuardSettings())
    with pytest.raises(ValueError, match="scalar"):
        step.run(*_data())


def test_first_bad_step_is_diagnosed_from_diagnose_data():
    import keras

    import stabilize

    X, y = _data(nan_row=5)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1), diagnose_data=(X, y),
                                    loss_fn=keras.losses.MeanSquaredError())
    _fit(model, opt, X, y, [cb])
    d = cb.history.diagnosis
    assert d is not None and d.cause == "dirty-data" and "(5, 1)" in str(d)


def test_auto_policy_skips_a_non_finite_batch_without_backing_off():
    import keras

    import stabilize

    X, y = _data(nan_row=5)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1), on_nonfinite="auto")
    _fit(model, opt, X, y, [cb])
    assert [(e.step, e.action) for e in cb.history.events] == [(1, "skipped")]
    assert cb.supervisor.policy.backoffs == 0 and int(opt.iterations.numpy()) == 7


def test_a_model_built_by_its_first_step_is_guarded_too():
    import keras

    import stabilize

    X, y = _data()
    X[5, 1], X[21, 0] = np.nan, np.inf
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(1)])  # no Input
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(0.01))
    h = _fit(model, opt, X, y, [cb], epochs=2, metrics=["mae"])
    assert [e.step for e in cb.history.events] == [1, 5, 9, 13]
    assert all(np.isfinite(v).all() for v in h.history.values())
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in model.variables)
