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

import numpy as np
from keras import ops

__all__ = [
    "apply_rng_state",
    "assign_variables_state",
    "check_rng_state",
    "check_variables_state",
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


def check_variables_state(groups: dict, saved, where: str = "checkpoint") -> None:
    """Verify ``saved`` (from :func:`variables_state`) against the live ``groups``: every group and
    variable by name, shape and dtype, nothing assigned. Raises CheckpointError on the first mismatch."""
    from ..checkpoint import CheckpointError

    if not isinstance(saved, dict) or set(saved) != set(groups):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{where} holds variable groups {found}, expected {sorted(groups)}")
    for name, vs in groups.items():
        group = saved[name]
        if not isinstance(group, dict) or set(group) != {"spec", "values"} or not isinstance(group["spec"], list) \
                or not isinstance(group["values"], list) or len(group["spec"]) != len(group["values"]):
            raise CheckpointError(f"{where}: its {name} variables are not a list of specs and values")
        spec, values = group["spec"], group["values"]
        live = _describe(vs)
        if len(spec) != len(live):
            raise CheckpointError(f"{where}: {len(spec)} {name} variables saved, {len(live)} here (another model "
                                  f"or optimizer?)")
        for entry, (lpath, lshape, ldtype), value in zip(spec, live, values):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise CheckpointError(f"{where}: a {name} variable's spec is {entry!r:.60}")
            path, shape, dtype = entry
            if list(shape) != lshape or dtype != ldtype or not isinstance(value, np.ndarray) \
                    or list(value.shape) != lshape or str(value.dtype) != ldtype:
                got = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
                raise CheckpointError(f"{where}: {name} variable {path!r} is {dtype}{list(shape)} (holding {got}), "
                                      f"but {lpath!r} here is {ldtype}{lshape}")


def assign_variables_state(groups: dict, saved: dict) -> None:
    """Assign what :func:`check_variables_state` verified; all or nothing."""
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


def load_variables_state(groups: dict, saved: dict, where: str = "checkpoint") -> None:
    """Assign ``saved`` (from :func:`variables_state`) to the live ``groups``: all checked first, all or nothing."""
    check_variables_state(groups, saved, where)
    assign_variables_state(groups, saved)


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
    from .. import hostrng

    seed = _keras_seed_variable()
    return {**hostrng.state(), "keras": None if seed is None else np.array(ops.convert_to_numpy(seed), copy=True)}


def check_rng_state(saved, where: str = "checkpoint") -> tuple:
    """Verify a saved :func:`rng_state` (scratch generators, the Keras seed's shape and dtype); returns
    what :func:`apply_rng_state` sets."""
    from .. import hostrng
    from ..checkpoint import CheckpointError

    if not isinstance(saved, dict) or set(saved) != {"numpy", "python", "keras"}:
        raise CheckpointError(f"{where}: its RNG section is not the numpy/Python/Keras generators' state")
    host = hostrng.check(saved, where)
    seed, value = _keras_seed_variable(), saved["keras"]
    if seed is not None and value is not None:
        live = np.asarray(ops.convert_to_numpy(seed))
        if not isinstance(value, np.ndarray) or value.shape != live.shape or value.dtype != live.dtype:
            raise CheckpointError(f"{where}: its Keras seed state is not a {live.dtype}{list(live.shape)} array")
    return host, value


def apply_rng_state(checked: tuple) -> None:
    from .. import hostrng

    host, value = checked
    hostrng.apply(host)
    seed = _keras_seed_variable()
    if seed is not None and value is not None:
        seed.assign(value)


def load_rng_state(state: dict, where: str = "checkpoint") -> None:
    apply_rng_state(check_rng_state(state, where))
