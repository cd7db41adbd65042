"""The contenders of ``overhead.py``, each paired with its bare twin, in torch and in Keras.

A builder returns ``(contenders, pairs)``: ``contenders`` maps a name to a
:class:`Contender` (a ``run(k)`` that trains k steps), ``pairs`` lists the
:class:`Pair` s that ``overhead.py`` times side by side. Each section has one
A/A pair, the bare loop against a second, identical bare loop: the noise floor.
Nothing here times anything.

The trainers read numpy arrays, shuffled under a seed, as a user gives them;
their twin is the bare loop over the same arrays, drawing the same permutation
and converting each batch itself. The drop-in guards run over batches already
on the device, against the bare loop over those same tensors.

The same architectures are built in both frameworks: the MLP from a
:class:`stabilize.models.MLP` spec (``get_backend(...).build_mlp``), a small
conv net, and an LSTM regressor (last hidden state into one linear unit).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

LR = 1e-3
BARE, TWIN = "bare loop", "bare loop (A/A twin)"


class Contender(NamedTuple):
    """One way of training, as a callable ``run(k)`` that trains k steps and waits for the device.

    Attributes:
        run: trains ``k`` steps (or ``steps`` when that is set) and returns once they are done.
        guarded: a stabilize guard (its memory is reported).
        holders: objects that may hold bytes across steps (``held_bytes()``), first that has it wins.
        footprint: ``() -> (parameter bytes, optimizer state bytes)`` of what it trains.
        steps: a fixed step count per run (the fresh pair, whose point is its one-time costs), not warmed up.
    """

    run: Callable[[int], None]
    guarded: bool = False
    holders: tuple = ()
    footprint: Callable[[], tuple] | None = None
    steps: int | None = None


class Pair(NamedTuple):
    """``contender`` timed against ``twin`` in every round; ``bar``: the ratio it must not exceed (None: none).
    ``aa``: the A/A pair (bare against bare), whose median must lie within 1.00 +/- 0.01."""

    contender: str
    twin: str
    bar: float | None = None
    aa: bool = False


def arrays(kind: str, cfg: dict, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` random float32 (x, y) rows for a model kind; x is channels-last for the conv net."""
    rng = np.random.default_rng(seed)
    shape = {"mlp": lambda: (cfg["sizes"][0],), "conv": lambda: (16, 16, 3),
             "lstm": lambda: (cfg["seq"], cfg["features"])}[kind]()
    return rng.normal(size=(rows, *shape)).astype(np.float32), rng.normal(size=(rows, 1)).astype(np.float32)


def batches(kind: str, cfg: dict, n: int, seed: int = 0) -> list:
    """``n`` (x, y) numpy batches of ``cfg["batch"]`` rows."""
    x, y = arrays(kind, cfg, n * cfg["batch"], seed)
    b = cfg["batch"]
    return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n)]


def shuffled(k: int, batch: int, seed: int = 0):
    """The row indices of ``k`` batches, as ``StabilityTrainer.fit(seed=seed)`` draws them over k*batch rows."""
    order = np.random.default_rng(seed).permutation(k * batch)
    return [order[i * batch:(i + 1) * batch] for i in range(k)]


def nbytes(tensors) -> int:
    """Bytes of torch tensors, tf or keras variables (from shape and dtype: nothing is read)."""
    total = 0
    for t in tensors:
        if hasattr(t, "element_size"):  # torch
            total += t.numel() * t.element_size()
        else:
            dtype = getattr(t.dtype, "as_numpy_dtype", t.dtype)  # tf.DType, or keras' dtype string
            total += math.prod(int(d) for d in t.shape) * np.dtype(dtype).itemsize
    return total


@contextlib.contextmanager
def _quiet_anomaly():
    """``torch.autograd.detect_anomaly``, without its warning that anomaly mode is slow (that is measured here)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=True):
            yield


def _sync(dev) -> None:
    """Wait for queued CUDA work, so that a round's time is the work's, not the launch's."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- torch ------------------------------------------------------------------------------------
def torch_model(kind: str, cfg: dict, dev):
    """The section's torch model on ``dev`` (seeded: every contender starts from the same weights)."""
    import torch

    import stabilize
    from stabilize.models import MLP

    torch.manual_seed(0)
    if kind == "mlp":
        return stabilize.get_backend("torch").build_mlp(MLP(cfg["sizes"], seed=0), "float32", str(dev))
    if kind == "conv":
        c = cfg.get("channels", 32)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(16 * c, 1)).to(dev)

    class LSTMRegressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(cfg["features"], cfg["hidden"], batch_first=True)
            self.head = torch.nn.Linear(cfg["hidden"], 1)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.head(h[-1])

    return LSTMRegressor().to(dev)


def torch_footprint(model, optimizer) -> Callable[[], tuple]:
    def footprint():
        state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "element_size")]
        return nbytes(model.parameters()), nbytes(state)
    return footprint


def torch_contenders(kind: str, cfg: dict, steps: int, bars: dict, references: bool = False, lr: float = LR):
    """The torch contenders and their pairs. ``bars``: the section's bar for each guard (a name
    missing there is timed without one); ``references`` adds clip_grad_norm_ and detect_anomaly."""
    import torch

    import stabilize
    from stabilize import StabilityTrainer, TorchGuard

    dev = stabilize.get_backend("torch").device()
    b = cfg["batch"]
    x_np, y_np = arrays(kind, cfg, steps * b)
    if kind == "conv":  # torch convolves channels-first
        x_np = np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))
    tb = [(torch.from_numpy(x_np[i * b:(i + 1) * b]).to(dev), torch.from_numpy(y_np[i * b:(i + 1) * b]).to(dev))
          for i in range(steps)]
    mse = torch.nn.functional.mse_loss

    def model_and_opt():
        model = torch_model(kind, cfg, dev)
        return model, torch.optim.SGD(model.parameters(), lr=lr)

    def bare(clip=False, anomaly=False):
        model, opt = model_and_opt()

        def run(k):
            with _quiet_anomaly() if anomaly else contextlib.nullcontext():
                for i in range(k):
                    x, y = tb[i % len(tb)]
                    opt.zero_grad(set_to_none=True)
                    mse(model(x), y).backward()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
            _sync(dev)
        return Contender(run, footprint=torch_footprint(model, opt))

    def bare_numpy():
        """The trainer's twin: the same numpy rows, the same permutation, converted per batch."""
        model, opt = model_and_opt()

        def run(k):
            for idx in shuffled(k, b):
                x, y = torch.as_tensor(x_np[idx], device=dev), torch.as_tensor(y_np[idx], device=dev)
                opt.zero_grad(set_to_none=True)
                mse(model(x), y).backward()
                opt.step()
            _sync(dev)
        return Contender(run, footprint=torch_footprint(model, opt))

    def trainer():
        model, opt = model_and_opt()
        t = StabilityTrainer(model, mse, opt, progress=False)  # default settings: check + skip

        def run(k):
            t.fit(x_np[:k * b], y_np[:k * b], batch_size=b)
            _sync(dev)
        return Contender(run, guarded=True, holders=(t,), footprint=torch_footprint(model, opt))

    def guard_loop(**options):
        model, opt = model_and_opt()
        guard = TorchGuard(model, opt, **options)

        def run(k):
            for i in range(k):
                x, y = tb[i % len(tb)]
                guard.step(mse(model(x), y))
            _sync(dev)
        return Contender(run, guarded=True, holders=(guard,), footprint=torch_footprint(model, opt))

    out = {BARE: bare(), TWIN: bare(), "TorchGuard in the loop": guard_loop(),
           "bare loop over numpy": bare_numpy(), "StabilityTrainer (torch.optim)": trainer()}
    pairs = [Pair(TWIN, BARE, aa=True), Pair("TorchGuard in the loop", BARE, bars.get("guard")),
             Pair("StabilityTrainer (torch.optim)", "bare loop over numpy", bars.get("trainer"))]
    if references:
        out["bare + clip_grad_norm_"] = bare(clip=True)
        # Clipping is one more pass over the gradients: compared with the loop that clips too.
        out["TorchGuard(clip_norm=1.0)"] = guard_loop(clip_norm=1.0)
        # The price of an exact undo of a native update: a copy of the parameters and optimizer state per step.
        out["TorchGuard(verify_updates=True)"] = guard_loop(verify_updates=True)
        out["bare under detect_anomaly"] = bare(anomaly=True)
        pairs += [Pair("TorchGuard(clip_norm=1.0)", "bare + clip_grad_norm_"),
                  Pair("TorchGuard(verify_updates=True)", BARE), Pair("bare under detect_anomaly", BARE)]
    return out, pairs


# -- tensorflow / keras ---------------------------------------------------------------------------
def keras_model(kind: str, cfg: dict):
    """The section's Keras model, the same architecture as :func:`torch_model` (seeded)."""
    import keras

    import stabilize
    from stabilize.models import MLP

    keras.utils.set_random_seed(0)
    if kind == "mlp":
        return stabilize.get_backend("tensorflow").build_mlp(MLP(cfg["sizes"], seed=0), "float32")
    L = keras.layers
    if kind == "conv":
        c = cfg.get("channels", 32)
        return keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(c, 3, padding="same", activation="relu"),
                                 L.Conv2D(c, 3, padding="same", activation="relu"), L.AveragePooling2D(4),
                                 L.Flatten(), L.Dense(1)])
    return keras.Sequential([keras.Input((cfg["seq"], cfg["features"])), L.LSTM(cfg["hidden"]), L.Dense(1)])


def keras_footprint(model, optimizer) -> Callable[[], tuple]:
    def footprint():
        return nbytes(model.weights), nbytes(optimizer.variables)
    return footprint


def tf_contenders(kind: str, cfg: dict, steps: int, bars: dict, references: bool = False, fresh_steps: int = 0):
    """The TF contenders and their pairs, the steady ones traced here, before any timing.
    ``fresh_steps``: also the fresh pair (a new model and trainer per run, tracing included)."""
    import keras
    import tensorflow as tf

    from stabilize import StabilityTrainer, keras_guard

    b = cfg["batch"]
    x_np, y_np = arrays(kind, cfg, max(steps, fresh_steps) * b)
    tb = [(tf.constant(x_np[i * b:(i + 1) * b]), tf.constant(y_np[i * b:(i + 1) * b])) for i in range(steps)]

    def mse(pred, target):
        return tf.reduce_mean(tf.square(pred - target))

    def bare_loop():
        model = keras_model(kind, cfg)
        opt = keras.optimizers.SGD(LR)
        opt.build(model.trainable_variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = mse(model(x, training=True), y)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss
        return model, opt, step

    def numpy_steps(step, k):
        """The trainer's twin: the same rows and permutation, converted per batch; one read at the end."""
        for idx in shuffled(k, b):
            loss = step(tf.convert_to_tensor(x_np[idx]), tf.convert_to_tensor(y_np[idx]))
        float(loss)

    def bare(check_numerics=False, over_numpy=False):
        model, opt, step = bare_loop()
        if check_numerics:  # the instrumentation is baked into the graph when it is traced
            tf.debugging.enable_check_numerics()
            try:
                step(*tb[0])
            finally:
                tf.debugging.disable_check_numerics()
        else:
            step(*tb[0])

        def run(k):
            if over_numpy:
                return numpy_steps(step, k)
            for i in range(k):
                loss = step(*tb[i % len(tb)])
            float(loss)
        return Contender(run, footprint=keras_footprint(model, opt))

    def fit(guarded=False):
        model = keras_model(kind, cfg)
        opt = keras.optimizers.SGD(LR)
        callbacks = []
        if guarded:
            opt, cb = keras_guard(opt)
            callbacks = [cb]
        model.compile(optimizer=opt, loss="mse")
        datasets = {}  # k -> a cached dataset of k batches: one fit call, one epoch, k steps

        def run(k):
            if k not in datasets:
                xy = tuple(np.concatenate([a[(i % steps) * b:(i % steps + 1) * b] for i in range(k)])
                           for a in (x_np, y_np))
                # A dataset built once: fit over numpy arrays would rebuild its input pipeline on every call.
                datasets[k] = tf.data.Dataset.from_tensor_slices(xy).batch(b).cache()
            model.fit(datasets[k], epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        run(1)  # trace
        return Contender(run, guarded=guarded, holders=(callbacks[0],) if guarded else (),
                         footprint=keras_footprint(model, opt))

    def trainer():
        model = keras_model(kind, cfg)
        opt = keras.optimizers.SGD(LR)
        t = StabilityTrainer(model, mse, opt, progress=False)
        t.fit(x_np[:b], y_np[:b], batch_size=b)  # trace

        def run(k):
            t.fit(x_np[:k * b], y_np[:k * b], batch_size=b)
        return Contender(run, guarded=True, holders=(t,), footprint=keras_footprint(model, opt))

    out = {BARE: bare(), TWIN: bare(), "bare loop over numpy": bare(over_numpy=True),
           "StabilityTrainer (keras SGD)": trainer(), "model.fit": fit(), "keras_guard in model.fit": fit(guarded=True)}
    pairs = [Pair(TWIN, BARE, aa=True), Pair("StabilityTrainer (keras SGD)", "bare loop over numpy", bars.get("trainer")),
             Pair("keras_guard in model.fit", "model.fit", bars.get("guard"))]
    if fresh_steps:
        def fresh_bare(_k):
            numpy_steps(bare_loop()[2], fresh_steps)

        def fresh_trainer(_k):
            t = StabilityTrainer(keras_model(kind, cfg), mse, keras.optimizers.SGD(LR), progress=False)
            t.fit(x_np[:fresh_steps * b], y_np[:fresh_steps * b], batch_size=b)

        # Each run builds a new model and traces anew: the cost of a short run, tracing included.
        out["fresh bare loop (tracing included)"] = Contender(fresh_bare, steps=fresh_steps)
        out["fresh StabilityTrainer (tracing included)"] = Contender(fresh_trainer, steps=fresh_steps)
        pairs.append(Pair("fresh StabilityTrainer (tracing included)", "fresh bare loop (tracing included)",
                          bars.get("fresh")))
    if references:
        out["bare under enable_check_numerics"] = bare(check_numerics=True)
        pairs += [Pair("model.fit", BARE), Pair("bare under enable_check_numerics", BARE)]
    return out, pairs
