"""keras_guard's rollback snapshot: held only under rollback, where ``snapshot_to`` says, and what it costs.

A rollback from a snapshot on disk (:mod:`stabilize.checkpoint`) must put back every variable, the
optimizer's included, bitwise as the in-memory one does; ``held_bytes()`` is 0 on disk and the bytes
of the copied variables otherwise.
"""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _values(model, optimizer=None):
    import keras

    optimizer = optimizer or model.optimizer
    variables = list(model.trainable_variables) + list(model.non_trainable_variables) + list(optimizer.variables)
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in variables]


def _rolled_back(where, tmp_path):
    """A fit whose 6th batch is NaN under rollback (max_bad_steps=1, a snapshot every 2 applied steps)."""
    import keras

    import stabilize

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    X[21, 0] = np.nan  # batch 5 of 8
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    extra = {"snapshot_path": str(tmp_path / "snap.ckpt")} if where == "disk" else {}
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(0.01), on_nonfinite="rollback", max_bad_steps=1,
                                    snapshot_every=2, snapshot_to=where, **extra)
    model.compile(optimizer=opt, loss="mse")
    seen = {}

    class Spy(keras.callbacks.Callback):  # the state when the snapshot of step 4 was taken
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                seen["at_snapshot"] = _values(model)
            if batch == 5:
                seen["after_rollback"] = _values(model)
                seen["held"] = cb.held_bytes()

    model.fit(X, y, batch_size=4, shuffle=False, verbose=0, callbacks=[cb, Spy()])
    return cb, seen


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_rollback_restores_every_variable_bitwise_wherever_the_snapshot_lives(where, tmp_path):
    cb, seen = _rolled_back(where, tmp_path)
    assert [e.action for e in cb.history.events if e.kind == "nonfinite"] == ["rolled-back"]
    assert len(seen["after_rollback"]) == len(seen["at_snapshot"])
    for a, b in zip(seen["after_rollback"], seen["at_snapshot"]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    copied = sum(v.nbytes for v in seen["at_snapshot"])
    assert seen["held"] == (0 if where == "disk" else copied)
    if where == "disk":
        assert (tmp_path / "snap.ckpt").exists() and cb._snapshots.disk_bytes() > 0


def test_disk_and_device_rollbacks_end_in_the_same_state(tmp_path):
    _, on_device = _rolled_back("device", tmp_path / "a")
    (tmp_path / "b").mkdir()
    _, on_disk = _rolled_back("disk", tmp_path / "b")
    for a, b in zip(on_device["after_rollback"], on_disk["after_rollback"]):
        assert np.array_equal(a, b)


def test_trainer_reports_the_keras_snapshot_it_holds():
    import keras

    from stabilize import StabilityTrainer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    skip = StabilityTrainer(model, "mse", keras.optimizers.Adam(0.01), on_nonfinite="skip", progress=False)
    skip.fit(X, y, batch_size=4)
    assert skip.held_bytes() == 0
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(0.01)
    t = StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", progress=False)
    t.fit(X, y, batch_size=4)
    assert t.held_bytes() == sum(v.nbytes for v in _values(model, opt)) > 0
