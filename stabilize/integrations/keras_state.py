"""Durable Keras training state: what ``keras_guard`` and the trainer's Keras path write to a checkpoint.

The state is plain arrays and values (:mod:`stabilize.checkpoint` stores it as
npz + JSON, never a pickle):

* ``model``: every variable of the model by its Keras path, trainable and
  non-trainable (BatchNorm statistics, Dropout's seed-generator state);
* ``optimizer``: every optimizer variable (``iterations``, moments, a
  ``LossScaleOptimizer``'s scale and counter), built first when the
  optimizer has not yet run;
* ``rng``: numpy's and Python's global generators and Keras's global seed
  generator (``keras.random`` without an explicit seed);
* and, beside it, the Supervisor's ``state_dict`` and the caller's position.

Loading checks every name, shape and dtype against the live objects before
assigning anything, and puts the previous values back if an assignment fails
half-way: a checkpoint of another model leaves the live state untouched.

Under a ``tf.distribute`` strategy the variables are mirrored and identical
on every replica (see :mod:`.keras_distribute`), so one copy is saved and an
assignment from the host writes every replica.

Example::

    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=opt, loss="mse"); model.fit(x, y, callbacks=[cb])
    cb.save_checkpoint("run.ckpt", epoch=3)
    # later, in a fresh process with a freshly built and compiled model:
    position = cb2.load_checkpoint("run.ckpt", model=model2)
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
from keras import ops

__all__ = [
    "load_rng_state",
    "load_variables_state",
    "model_variables",
    "optimizer_variables",
    "rng_state",
    "variables_state",
]


def model_variables(model) -> list:
    """Every variable of ``model`` that training changes: trainable, then non-trainable (seed states included)."""
    seen, out = set(), []
    for v in list(model.trainable_variables) + list(model.non_trainable_variables):
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def optimizer_variables(optimizer, model) -> list:
    """The optimizer's variables (iterations, slots, loss scale), building it on ``model`` if it never ran."""
    if not optimizer.built and model.trainable_variables:
        strategy = getattr(model, "distribute_strategy", None)  # tf.distribute: its variables are made in its scope
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    return list(optimizer.variables)


def _describe(variables) -> list[list]:
    return [[v.path, list(v.shape), str(v.dtype)] for v in variables]


def variables_state(groups: dict) -> dict:
    """``{name: variables}`` as ``{name: {"spec": [[path, shape, dtype], ...], "values": [arrays]}}``."""
    return {name: {"spec": _describe(vs), "values": [np.array(ops.convert_to_numpy(v), copy=True) for v in vs]}
            for name, vs in groups.items()}


def load_variables_state(groups: dict, saved: dict, where: str = "checkpoint") -> None:
    """Assign ``saved`` (from :func:`variables_state`) to the live ``groups``: all checked first, all or nothing."""
    from ..checkpoint import CheckpointError

    for name, vs in groups.items():
        if name not in saved:
            raise CheckpointError(f"{where} holds no {name!r} state")
        spec, values = saved[name]["spec"], saved[name]["values"]
        live = _describe(vs)
        if len(spec) != len(live):
            raise CheckpointError(f"{where}: {len(spec)} {name} variables saved, {len(live)} here (another model "
                                  f"or optimizer?)")
        for (path, shape, dtype), (lpath, lshape, ldtype), value in zip(spec, live, values):
            if list(shape) != lshape or dtype != ldtype or list(np.shape(value)) != lshape:
                raise CheckpointError(f"{where}: {name} variable {path!r} is {dtype}{list(shape)}, but "
                                      f"{lpath!r} here is {ldtype}{lshape}")
    before = {name: [np.array(ops.convert_to_numpy(v), copy=True) for v in vs] for name, vs in groups.items()}
    try:
        for name, vs in groups.items():
            for v, value in zip(vs, saved[name]["values"]):
                v.assign(value)
    except BaseException:
        for name, vs in groups.items():
            for v, value in zip(vs, before[name]):
                v.assign(value)
        raise


def _keras_seed_variable():
    try:
        from keras.src.random.seed_generator import global_seed_generator
    except ImportError:  # pragma: no cover - a Keras without it
        return None
    try:
        return global_seed_generator().state
    except Exception:  # noqa: BLE001 - no global generator in this Keras/backend
        return None


def rng_state() -> dict:
    """numpy's and Python's global generators, and Keras's global seed generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    seed = _keras_seed_variable()
    return {"numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate(),
            "keras": None if seed is None else np.array(ops.convert_to_numpy(seed), copy=True)}


def load_rng_state(state: dict) -> None:
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    seed = _keras_seed_variable()
    if seed is not None and state.get("keras") is not None:
        seed.assign(state["keras"])
