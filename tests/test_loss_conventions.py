"""Losses follow each framework's convention: torch ``(input, target)``, Keras ``(y_true, y_pred)``.

Mean absolute percentage error is asymmetric, so a swapped call records another number.
"""

import numpy as np
import pytest

import stabilize


def _data():
    r = np.random.default_rng(0)
    X = r.normal(size=(16, 3)).astype(np.float32)
    y = (np.abs(X.sum(1, keepdims=True)) + 1.0).astype(np.float32)
    return X, y


def _mape(true, pred):
    return float(np.mean(np.abs((true - pred) / true)) * 100)


def test_torch_loss_is_called_input_then_target():
    torch = pytest.importorskip("torch")
    X, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    pred = model(torch.from_numpy(X)).detach().numpy()

    def mape(input, target):
        return torch.mean(torch.abs((target - input) / target)) * 100

    t = stabilize.StabilityTrainer(model, mape, torch.optim.SGD(model.parameters(), 1e-4), progress=False)
    h = t.fit(X, y, batch_size=16)
    np.testing.assert_allclose(h.losses[0], _mape(y, pred), rtol=1e-5)
    assert abs(h.losses[0] - _mape(pred, y)) > 1.0  # the swapped call would record this


@pytest.mark.parametrize("as_object", [True, False])
def test_keras_loss_is_called_y_true_then_y_pred(as_object):
    keras = pytest.importorskip("keras")
    X, y = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    pred = np.asarray(model(X))
    loss = keras.losses.MeanAbsolutePercentageError() if as_object else (
        lambda y_true, y_pred: keras.ops.mean(keras.ops.abs((y_true - y_pred) / y_true)) * 100)
    t = stabilize.StabilityTrainer(model, loss, keras.optimizers.SGD(1e-4), progress=False)
    h = t.fit(X, y, batch_size=16)
    np.testing.assert_allclose(h.losses[0], _mape(y, pred), rtol=1e-5)
    assert abs(h.losses[0] - _mape(pred, y)) > 1.0


def test_keras_sparse_categorical_crossentropy_trains():
    keras = pytest.importorskip("keras")
    r = np.random.default_rng(1)
    X = r.normal(size=(32, 4)).astype(np.float32)
    labels = X[:, :3].argmax(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    t = stabilize.StabilityTrainer(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                   keras.optimizers.Adam(0.1), progress=False)
    h = t.fit(X, labels, batch_size=8, epochs=8)
    assert h.committed.all() and h.losses[-4:].mean() < 0.5 * h.losses[:4].mean()
