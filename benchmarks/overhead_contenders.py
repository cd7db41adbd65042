"""The contenders of ``overhead.py``: each a ``run(k)`` that trains k steps, in torch and in Keras.

Every builder returns ``(contenders, meta)``. ``contenders`` maps a name to a
:class:`Contender`; ``meta`` names the framework's bare loop and the reference
loops a guard is compared with (clip_grad_norm_, detect_anomaly, model.fit,
enable_check_numerics). Nothing here times anything: ``overhead.py`` does.

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
FRESH_BARE = "tf fresh bare loop (new model, tracing included)"
FRESH_TRAINER = "tf fresh StabilityTrainer (new model, tracing included)"


class Contender(NamedTuple):
    """One way of training, as a callable ``run(k)`` that trains k steps and waits for the device.

    Attributes:
        run: trains ``k`` steps (or ``steps`` when that is set) and returns once they are done.
        baseline: the contender it is closest to, when that is not the bare loop (keras_guard: model.fit).
        guarded: a stabilize guard; compared with every reference loop of its framework.
        holders: objects that may hold bytes across steps (``held_bytes()``), first that has it wins.
        footprint: ``() -> (parameter bytes, optimizer state bytes)`` of what it trains.
        steps: a fixed step count per run (the fresh pair), instead of the section's.
    """

    run: Callable[[int], None]
    baseline: str | None = None
    guarded: bool = False
    holders: tuple = ()
    footprint: Callable[[], tuple] | None = None
    steps: int | None = None


def batches(kind: str, cfg: dict, n: int, seed: int = 0) -> list:
    """``n`` random (x, y) float32 numpy batches for a model kind; x is channels-last for the conv net."""
    rng = np.random.default_rng(seed)
    shape = {"mlp": lambda: (cfg["sizes"][0],), "conv": lambda: (16, 16, 3),
             "lstm": lambda: (cfg["seq"], cfg["features"])}[kind]()
    b = cfg["batch"]
    return [(rng.normal(size=(b, *shape)).astype(np.float32), rng.normal(size=(b, 1)).astype(np.float32))
            for _ in range(n)]


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


def _null():
    return contextlib.nullcontext()


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


def torch_contenders(kind: str, cfg: dict, data: list, full: bool = True, lr: float = LR):
    """The torch contenders; ``full=False`` keeps only the bare loop, TorchGuard and the trainer (the sweep)."""
    import torch

    import stabilize
    from stabilize import StabilityTrainer, TorchGuard

    dev = stabilize.get_backend("torch").device()
    tb = [(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)) for x, y in data]
    if kind == "conv":  # torch convolves channels-first
        tb = [(x.permute(0, 3, 1, 2).contiguous(), y) for x, y in tb]
    mse = torch.nn.functional.mse_loss

    def bare(clip=False, anomaly=False):
        model = torch_model(kind, cfg, dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def run(k):
            with _quiet_anomaly() if anomaly else _null():
                for i in range(k):
                    x, y = tb[i % len(tb)]
                    opt.zero_grad(set_to_none=True)
                    mse(model(x), y).backward()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
            _sync(dev)
        return Contender(run, footprint=torch_footprint(model, opt))

    def trainer():
        model = torch_model(kind, cfg, dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        t = StabilityTrainer(model, mse, opt, progress=False)  # default settings: check + skip

        def run(k):
            t.fit([tb[i % len(tb)] for i in range(k)])
            _sync(dev)
        return Contender(run, guarded=True, holders=(t,), footprint=torch_footprint(model, opt))

    def guard_loop(baseline=None, **options):
        model = torch_model(kind, cfg, dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        guard = TorchGuard(model, opt, **options)

        def run(k):
            for i in range(k):
                x, y = tb[i % len(tb)]
                guard.step(mse(model(x), y))
            _sync(dev)
        return Contender(run, guarded=True, holders=(guard,), footprint=torch_footprint(model, opt),
                         baseline=baseline)

    out = {"torch bare loop": bare()}
    if full:
        out["torch + clip_grad_norm_"] = bare(clip=True)
    out["torch StabilityTrainer (torch.optim)"] = trainer()
    out["torch TorchGuard in the loop"] = guard_loop()
    if full:
        # Clipping is one more pass over the gradients: compared with the loop that clips too.
        out["torch TorchGuard(clip_norm=1.0)"] = guard_loop(baseline="torch + clip_grad_norm_", clip_norm=1.0)
        # The price of an exact undo of a native update: a copy of the parameters and optimizer state per step.
        out["torch TorchGuard(verify_updates=True)"] = guard_loop(verify_updates=True)
        out["torch bare under detect_anomaly"] = bare(anomaly=True)
    refs = ["torch bare loop", "torch + clip_grad_norm_", "torch bare under detect_anomaly"] if full else \
        ["torch bare loop"]
    return out, {"bare": "torch bare loop", "references": refs, "device": str(dev)}


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


def keras_footprint(model, optimizer=None, state=None) -> Callable[[], tuple]:
    def footprint():
        opt_vars = state if state is not None else (optimizer.variables if optimizer is not None else [])
        return nbytes(model.weights), nbytes(opt_vars)
    return footprint


def tf_contenders(kind: str, cfg: dict, data: list, fresh_steps: int = 60):
    """The TF contenders; the steady ones are traced here, before any timing."""
    import keras
    import tensorflow as tf

    from stabilize import StabilityTrainer, keras_guard
    from stabilize.optim import SGD

    tb = [(tf.constant(x), tf.constant(y)) for x, y in data]

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

    def bare(check_numerics=False):
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
            for i in range(k):
                loss = step(*tb[i % len(tb)])
            float(loss)
        return Contender(run, footprint=keras_footprint(model, opt))

    def fit(guarded=False):
        model = keras_model(kind, cfg)
        inner = opt = keras.optimizers.SGD(LR)
        callbacks = []
        if guarded:
            opt, cb = keras_guard(inner)
            callbacks = [cb]
        model.compile(optimizer=opt, loss="mse")
        datasets = {}  # k -> a cached dataset of k batches: one fit call, one epoch, k steps

        def run(k):
            if k not in datasets:
                xy = tuple(np.concatenate([data[i % len(data)][j] for i in range(k)]) for j in (0, 1))
                # A dataset built once: fit over numpy arrays would rebuild its input pipeline on every call.
                datasets[k] = tf.data.Dataset.from_tensor_slices(xy).batch(cfg["batch"]).cache()
            model.fit(datasets[k], epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        run(1)  # trace
        holders = (callbacks[0], opt) if guarded else ()
        return Contender(run, baseline="tf model.fit" if guarded else None, guarded=guarded, holders=holders,
                         footprint=keras_footprint(model, opt))

    skipped = {}

    def trainer(neutral):
        model = keras_model(kind, cfg)
        opt = SGD(lr=LR) if neutral else keras.optimizers.SGD(LR)
        try:
            t = StabilityTrainer(model, mse, opt, progress=False)
        except ValueError as exc:  # Keras' LSTM holds a seed-generator variable, which the neutral path refuses
            if not neutral:
                raise
            skipped[f"tf StabilityTrainer ({'neutral' if neutral else 'keras'} SGD)"] = str(exc)
            return None
        t.fit(tb[:1])  # trace

        def run(k):
            t.fit([tb[i % len(tb)] for i in range(k)])
        foot = keras_footprint(model, state=t.state_vars) if neutral else keras_footprint(model, opt)
        return Contender(run, guarded=True, holders=(t,), footprint=foot)

    def fresh_bare(_k):
        _, _, step = bare_loop()
        for i in range(fresh_steps):
            loss = step(*tb[i % len(tb)])
        float(loss)

    def fresh_trainer(_k):
        t = StabilityTrainer(keras_model(kind, cfg), mse, keras.optimizers.SGD(LR), progress=False)
        t.fit([tb[i % len(tb)] for i in range(fresh_steps)])

    out = {"tf bare tf.function loop": bare(), "tf model.fit": fit(),
           "tf StabilityTrainer (keras SGD)": trainer(neutral=False),
           "tf StabilityTrainer (neutral SGD)": trainer(neutral=True),
           "tf keras_guard in model.fit": fit(guarded=True),
           "tf bare under enable_check_numerics": bare(check_numerics=True),
           # Each round builds a new model and traces anew: the cost of a short run, tracing included.
           FRESH_BARE: Contender(fresh_bare, steps=fresh_steps),
           FRESH_TRAINER: Contender(fresh_trainer, baseline=FRESH_BARE, steps=fresh_steps)}
    out = {name: c for name, c in out.items() if c is not None}
    refs = ["tf bare tf.function loop", "tf model.fit", "tf bare under enable_check_numerics"]
    return out, {"bare": "tf bare tf.function loop", "references": refs, "skipped": skipped}
