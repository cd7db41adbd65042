"""A step that raises because a label or an id is out of range gets the ``bad-labels``
diagnosis as a note on the exception, naming the values and the rows: in the trainer,
in TorchGuard and in keras_guard (issue 19)."""

import numpy as np
import pytest

IDS = np.array([[1, 2, 3], [4, 12, 5], [6, 7, 10], [8, 9, 1]])  # ids 10 and 12 in rows 1 and 2; vocabulary 10
Y = np.array([0, 1, 0, 1])


def _note(exc) -> str:
    notes = [n for n in getattr(exc, "__notes__", ()) if n.startswith("stabilize:")]
    assert len(notes) == 1, getattr(exc, "__notes__", None)
    return notes[0]


def _assert_names_ids(note):
    assert "cause bad-labels" in note
    assert "[10, 12]" in note and "rows [1, 2]" in note and "[0, 10)" in note


def _torch_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Flatten(), torch.nn.Linear(24, 2))


def _keras_model():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), dtype="int32")
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(10, 8)(inp)))
    return keras.Model(inp, out)


def test_trainer_torch_adds_the_diagnosis_to_the_index_error():
    from conftest import load_backend

    load_backend("torch")
    import torch

    from stabilize import StabilityTrainer

    model = _torch_model()
    before = [p.detach().clone() for p in model.parameters()]
    t = StabilityTrainer(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(IndexError) as info:
        t.fit(IDS, Y, batch_size=4, shuffle=False)
    _assert_names_ids(_note(info.value))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was applied


def test_trainer_keras_adds_the_diagnosis_to_the_invalid_argument_error():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    from stabilize import StabilityTrainer

    t = StabilityTrainer(_keras_model(), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         keras.optimizers.SGD(0.1))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        t.fit(IDS, Y, batch_size=4, shuffle=False)
    _assert_names_ids(_note(info.value))


def test_torch_guard_explains_an_error_raised_in_the_forward():
    from conftest import load_backend

    load_backend("torch")
    import torch

    from stabilize import TorchGuard

    model = _torch_model()
    loss_fn = torch.nn.functional.cross_entropy
    guard = TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn)
    x, y = torch.tensor(IDS), torch.tensor(Y)
    with pytest.raises(IndexError) as info:
        with guard.explain_errors((x, y)):
            loss = loss_fn(model(x), y)
        guard.step(loss, batch=(x, y))
    _assert_names_ids(_note(info.value))
    good = torch.tensor(np.minimum(IDS, 9))  # the same guard keeps working afterwards
    with guard.explain_errors((good, y)):
        loss = loss_fn(model(good), y)
    assert guard.step(loss, batch=(good, y))


def test_keras_guard_explains_an_error_raised_in_fit():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    from stabilize import keras_guard

    model = _keras_model()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt, cb = keras_guard(keras.optimizers.SGD(0.1), diagnose_data=(IDS, Y), loss_fn=loss)
    model.compile(optimizer=opt, loss=loss)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        model.fit(IDS, Y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    _assert_names_ids(_note(info.value))
