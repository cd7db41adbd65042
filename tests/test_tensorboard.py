"""``stabilize.tensorboard.attach``: a guard's per-step scalars and events in TensorBoard event files,
read back with TensorBoard's own reader (TorchGuard with a torch SummaryWriter, keras_guard next to
``keras.callbacks.TensorBoard``, the trainer with a directory)."""

import numpy as np
import pytest

import stabilize
import stabilize.tensorboard

pytest.importorskip("tensorboard")


def _read(folder):
    """{tag: [(step, value)]} for scalars and tensor summaries, and the text events, of a log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    texts = []
    from tensorboard.util import tensor_util

    for t in acc.Tags()["tensors"]:
        for e in acc.Tensors(t):
            value = tensor_util.make_ndarray(e.tensor_proto)
            if value.dtype.kind in "SO":
                texts.append((e.step, value.item().decode() if value.ndim == 0 else value.ravel()[0].decode()))
            else:
                out.setdefault(t, []).append((e.step, float(value)))
    return out, texts


def test_torch_guard_writes_scalars_and_events(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="backoff")
    writer = SummaryWriter(str(tmp_path))
    stabilize.tensorboard.attach(guard, writer)
    for i in range(5):
        x = torch.randn(8, 3)
        y = torch.full((8, 1), float("nan")) if i == 2 else x.sum(1, keepdim=True)
        guard.step(torch.nn.functional.mse_loss(model(x), y))
    writer.close()
    scalars, texts = _read(tmp_path)
    assert scalars["stabilize/skipped"] == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert [v for _, v in scalars["stabilize/applied"]] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [v for _, v in scalars["stabilize/backoffs"]] == [0.0, 0.0, 1.0, 1.0, 1.0]
    rows = guard.supervisor.rows
    assert [v for _, v in scalars["stabilize/grad_norm"]][:2] == [np.float32(r["grad_norm"]) for r in rows[:2]]
    assert np.isnan(scalars["stabilize/loss"][2][1])
    assert [(s, "backed-off" in t) for s, t in texts] == [(2, True)]


def test_keras_guard_writes_beside_the_keras_tensorboard_callback(tmp_path):
    keras = pytest.importorskip("keras")

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3)).astype("float32")
    y = X.sum(1, keepdims=True)
    X[9, 1] = np.nan  # batch 1 of 4
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.05), on_nonfinite="skip")
    stabilize.tensorboard.attach((opt, cb), tmp_path)  # the folder keras.callbacks.TensorBoard(log_dir) uses
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[cb, keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")])
    scalars, texts = _read(tmp_path / "train")
    assert scalars["stabilize/skipped"] == [(0, 0.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert [s for s, t in texts if "skipped" in t] == [1]


def test_trainer_writes_to_a_directory(tmp_path):
    pytest.importorskip("torch")
    from stabilize.models import MLP
    from stabilize.optim import SGD

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 2))
    y = X.sum(1, keepdims=True)
    y[17] = np.nan  # batch 2 of 4
    trainer = stabilize.StabilityTrainer(MLP((2, 1), seed=0), "mse", SGD(lr=0.05), backend="torch", dtype="float64",
                                         progress=False, on_nonfinite="skip")
    stabilize.tensorboard.attach(trainer, tmp_path)
    trainer.fit(X, y, epochs=1, batch_size=8, seed=0, shuffle=False)
    for listen in trainer.supervisor.listeners:
        listen.writer.flush()
    scalars, _ = _read(tmp_path)
    assert [v for _, v in scalars["stabilize/skipped"]] == [0.0, 0.0, 1.0, 1.0]


def test_a_wrong_writer_is_refused():
    with pytest.raises(TypeError, match="attach\\(\\) takes a TorchGuard"):
        stabilize.tensorboard.attach(object(), "runs")
    with pytest.raises(TypeError, match="writer must be"):
        stabilize.tensorboard.TensorBoardSink(object())
