"""No Keras/TF/numpy global state changes through stabilize's Keras entry points."""

import logging
import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _globals():
    import keras
    from keras.src.backend.common import global_state

    loggers = [logging.getLogger(), logging.getLogger("stabilize")]
    return {
        "floatx": keras.config.floatx(),
        "dtype_policy": global_state.get_global_attribute("dtype_policy", None),
        "image_data_format": keras.config.image_data_format(),
        "python_random": random.getstate(),
        "numpy_random": repr(np.random.get_state()),
        "handlers": [list(lg.handlers) for lg in loggers],
        "levels": [lg.level for lg in loggers],
    }


def test_keras_entry_points_leave_global_state_alone():
    import keras

    import stabilize
    from stabilize import scenarios
    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    from keras.src.backend.common import global_state

    global_state.set_global_attribute("dtype_policy", None)  # as in a fresh process
    before = _globals()
    scenarios.run("high-lr", "backoff", backend="tensorflow", dtype="float32")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(16, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    model = stabilize.get_backend("tensorflow").build_mlp(stabilize.models.MLP((3, 4, 1)), "float32")
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.1), on_nonfinite="backoff")
    global_state.set_global_attribute("dtype_policy", None)  # building a model by hand fixes it: Keras's own doing
    before["dtype_policy"] = None
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, batch_size=4, verbose=0, callbacks=[cb])
    KerasTrainStep(model, keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError(), GuardSettings()).run(X, y)
    assert _globals() == before
    keras.config.set_floatx("float64")
    try:
        assert keras.layers.Dense(1).dtype == "float64"  # a later floatx still reaches new layers
    finally:
        keras.config.set_floatx("float32")
        global_state.set_global_attribute("dtype_policy", None)


def test_build_mlp_does_not_fix_the_dtype_policy():
    import stabilize
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("dtype_policy", None)
    stabilize.get_backend("tensorflow").build_mlp(stabilize.models.MLP((2, 3, 1)), "float32")
    assert global_state.get_global_attribute("dtype_policy", None) is None
