"""The durable form of a torch training state: what a checkpoint holds, and a transactional load.

:func:`checkpoint_state` turns a :class:`~.torch_state.TorchState` into
tensors and plain values (:mod:`stabilize.checkpoint` writes them).
:func:`load_checkpoint_state` is all or nothing: :func:`check_checkpoint_state`
verifies every section against the live objects first (each parameter's,
buffer's and optimizer tensor's dtype and shape, the optimizer's groups, the
scheduler's and scaler's keys, every RNG on a scratch generator), and only
then :func:`apply_checkpoint_state` changes anything. A file that does not
fit raises :class:`~stabilize.checkpoint.CheckpointError` naming the first
mismatch, with the model, optimizer, scheduler, scaler and RNG as they were.

Under FSDP2 (``fully_shard``) the parameters and the optimizer state built
from them are ``DTensor`` objects; a checkpoint stores each as this rank's **local
shard**, a plain tensor, and lists which entries were sharded
(:func:`to_local_state`). Three reasons: ``torch.load(weights_only=True)``
reads a pickled ``DTensor`` only once ``torch.distributed.tensor`` is
imported, and only on torch versions that allow-list it (not 2.4/2.5); a
pickled ``DTensor`` carries the ``DeviceMesh`` of the run that wrote it; and
each rank saves and loads its own shard (one file per rank) anyway. On load
(:func:`from_local_state`) each listed entry is wrapped back with
``DTensor.from_local`` on the live parameter's mesh and placements, after the
local shapes are checked: resuming needs the same world size and layout.
"""

from __future__ import annotations

import torch

from ..checkpoint import CheckpointError

from .torch_state import Snapshot, TorchState, apply_rng_state, check_rng_state_dict, rng_state_dict

__all__ = ["checkpoint_state", "check_checkpoint_state", "apply_checkpoint_state", "load_checkpoint_state",
           "is_dtensor", "to_local_state", "from_local_state"]


def checkpoint_state(state: "TorchState") -> dict:
    """The durable form of a :class:`TorchState`: tensors and plain values only (see :mod:`stabilize.checkpoint`)."""
    snap = state.capture()
    # FSDP2: sharded entries as this rank's local shard, plain tensors (see the module docstring)
    return to_local_state({"params": snap.params, "buffers": snap.buffers, "optimizer": snap.optimizer,
                           "scheduler": snap.scheduler, "scaler": snap.scaler, "rng": rng_state_dict()})


_SECTIONS = {"params", "buffers", "optimizer", "scheduler", "scaler", "rng", "sharded"}


def _spec(t) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _check_tensors(saved, live, where: str, what: str) -> None:
    """The same number of tensors as ``live``, each of the same dtype and shape."""

    if not isinstance(saved, list) or len(saved) != len(live) or not all(torch.is_tensor(t) for t in saved):
        n = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise CheckpointError(f"{where} holds {n} {what}, the live model has {len(live)}: another model")
    for i, (s, lv) in enumerate(zip(saved, live)):
        lv = lv.to_local() if is_dtensor(lv) else lv
        if s.dtype != lv.dtype or s.shape != lv.shape:
            raise CheckpointError(f"{where}: {what}[{i}] is {_spec(s)}, the live one is {_spec(lv)}: another model")


def _check_optimizer(saved, state: "TorchState", where: str) -> None:
    """The optimizer's groups (sizes, hyper-parameter names) and every state tensor against the live one."""

    live = state.optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(live) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{where}: its optimizer state is not a {type(state.optimizer).__name__}'s state_dict")
    groups = saved["param_groups"]
    if len(groups) != len(live["param_groups"]) or any(
            not isinstance(g, dict) or set(g) != set(lg) or g["params"] != lg["params"]
            for g, lg in zip(groups, live["param_groups"])):
        raise CheckpointError(f"{where}: its optimizer's parameter groups (sizes, hyper-parameter names) differ from "
                              f"the live {type(state.optimizer).__name__}'s: another optimizer or model")
    for i, entry in saved["state"].items():
        if type(i) is not int or not 0 <= i < len(state.params) or not isinstance(entry, dict):
            raise CheckpointError(f"{where}: optimizer state for parameter {i!r}, of {len(state.params)}")
        param = state.params[i]
        param = param.to_local() if is_dtensor(param) else param
        have = live["state"].get(i)
        if have is not None and set(entry) != set(have):
            raise CheckpointError(f"{where}: the optimizer state of parameter {i} holds {sorted(entry)}, the live "
                                  f"one {sorted(have)}")
        for key, value in entry.items():
            ref = have.get(key) if have is not None else None
            ref = ref.to_local() if is_dtensor(ref) else ref
            if torch.is_tensor(ref) and not (torch.is_tensor(value) and value.dtype == ref.dtype
                                             and value.shape == ref.shape):
                raise CheckpointError(f"{where}: the optimizer's {key!r} of parameter {i} is "
                                      f"{_spec(value) if torch.is_tensor(value) else type(value).__name__}, the "
                                      f"live one {_spec(ref)}")
            if ref is None and torch.is_tensor(value) and value.dim() > 0 and value.is_floating_point() \
                    and (value.shape != param.shape or value.dtype != param.dtype):
                raise CheckpointError(f"{where}: the optimizer's {key!r} of parameter {i} is {_spec(value)}, the "
                                      f"parameter is {_spec(param)}: another model")


def _check_stateful(saved, live, where: str, name: str) -> None:

    if (saved is None) != (live is None):
        raise CheckpointError(f"{where} was saved {'with' if saved is not None else 'without'} a {name}; "
                              f"pass the same {name} (or none) to load it")
    if live is not None and (not isinstance(saved, dict) or set(saved) != set(live.state_dict())):
        raise CheckpointError(f"{where}: its {name} state holds {sorted(saved) if isinstance(saved, dict) else saved!r}"
                              f", the live {type(live).__name__}'s {sorted(live.state_dict())}")


def check_checkpoint_state(state: "TorchState", saved, where: str = "checkpoint") -> tuple:
    """Everything in ``saved`` verified against the live objects, nothing changed: what
    :func:`apply_checkpoint_state` puts back. Raises CheckpointError naming the first mismatch."""

    if not isinstance(saved, dict) or set(saved) != _SECTIONS:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{where}: its torch state holds {found}, expected {sorted(_SECTIONS)}")
    sharded = saved["sharded"]
    if not isinstance(sharded, dict) or set(sharded) != {"params", "buffers", "optimizer"} \
            or not all(isinstance(v, list) for v in sharded.values()):
        raise CheckpointError(f"{where}: its list of sharded entries is malformed")
    _check_tensors(saved["params"], state.params, where, "params")
    _check_tensors(saved["buffers"], state.buffers, where, "buffers")
    _check_optimizer(saved["optimizer"], state, where)
    _check_stateful(saved["scheduler"], state.scheduler, where, "scheduler")
    _check_stateful(saved["scaler"], state.scaler, where, "scaler")
    rng = check_rng_state_dict(saved["rng"], where)
    try:
        local = from_local_state(saved, state.params, state.buffers, where)  # FSDP2 shards back to DTensors
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{where}: its sharded entries cannot be put back ({exc!r})") from exc
    snap = Snapshot(local["params"], local["buffers"], local["optimizer"], saved["scheduler"], saved["scaler"],
                    rng[0], {})
    return snap, rng


def apply_checkpoint_state(state: "TorchState", checked: tuple, where: str = "checkpoint") -> None:
    """Put back what :func:`check_checkpoint_state` verified; should it fail all the same, the state
    is put back as it was and CheckpointError raised."""

    snap, rng = checked
    before, rng_before = state.capture(), check_rng_state_dict(rng_state_dict(), "the live state")
    try:
        state.restore(snap)
        apply_rng_state(rng)
        state.mark()
    except Exception as exc:
        state.restore(before)
        apply_rng_state(rng_before)
        raise CheckpointError(f"{where} does not fit this model/optimizer ({type(exc).__name__}: {exc}); "
                              f"the training state was left as it was") from exc


def load_checkpoint_state(state: "TorchState", saved: dict, where: str = "checkpoint") -> None:
    """Verify ``saved`` against the live state, then put it back (all or nothing)."""
    apply_checkpoint_state(state, check_checkpoint_state(state, saved, where), where)


# -- FSDP2 shards in a checkpoint (see the module docstring) --------------------------------------

def is_dtensor(t) -> bool:
    """A ``DTensor`` (checked by its interface: torch.distributed.tensor is never imported here)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh") and hasattr(t, "placements")


def _local(t):
    return t.to_local().detach().clone() if is_dtensor(t) else t


def to_local_state(state: dict) -> dict:
    """``state`` (``params``, ``buffers``, an optimizer ``state_dict``) with every DTensor replaced by
    its local shard, and ``sharded`` listing where they were: indices, and ``[param_index, key]``.

    Example (nothing sharded: the state passes through, with an empty list):
        >>> import torch
        >>> state = {"params": [torch.zeros(2)], "buffers": [], "optimizer": {"state": {}, "param_groups": []}}
        >>> to_local_state(state)["sharded"]
        {'params': [], 'buffers': [], 'optimizer': []}
    """
    sharded = {name: [i for i, t in enumerate(state[name]) if is_dtensor(t)] for name in ("params", "buffers")}
    opt = state["optimizer"]
    sharded["optimizer"] = [[int(i), key] for i, entry in opt["state"].items()
                            for key, value in entry.items() if is_dtensor(value)]
    out = dict(state, params=[_local(t) for t in state["params"]], buffers=[_local(t) for t in state["buffers"]],
               sharded=sharded)
    out["optimizer"] = dict(opt, state={i: {k: _local(v) for k, v in entry.items()}
                                        for i, entry in opt["state"].items()})
    return out


def _wrap(saved, live, where: str, what: str):
    """``saved`` (a local shard) as a DTensor laid out like ``live``; raises CheckpointError on a shape
    mismatch."""

    if not is_dtensor(live):
        raise CheckpointError(f"{where} holds a sharded (FSDP) {what}, and the live one is not sharded: "
                              f"apply the same fully_shard to the model before loading")
    local = live.to_local()
    if tuple(saved.shape) != tuple(local.shape) or saved.dtype != local.dtype:
        raise CheckpointError(f"{where} holds a shard of shape {tuple(saved.shape)} for {what}; this rank's "
                              f"shard is {tuple(local.shape)}: it was saved with another world size or "
                              f"sharding (load each rank's own file on the same world size)")
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(saved.to(device=local.device, dtype=local.dtype), live.device_mesh, live.placements,
                              shape=live.shape, stride=live.stride(), run_check=False)


def from_local_state(saved: dict, params: list, buffers: list, where: str = "checkpoint") -> dict:
    """Undo :func:`to_local_state` against the live ``params`` and ``buffers`` (a state saved
    without ``sharded`` is returned as it is)."""
    sharded = saved.get("sharded")
    if not sharded or not any(sharded.values()):
        return saved

    out = dict(saved, params=list(saved["params"]), buffers=list(saved["buffers"]))
    for name, live in (("params", params), ("buffers", buffers)):
        for i in sharded[name]:
            if i >= len(live) or i >= len(out[name]):
                raise CheckpointError(f"{where} lists sharded {name} entry {i}, and there are only {len(live)}")
            out[name][i] = _wrap(out[name][i], live[i], where, f"{name}[{i}]")
    opt = saved["optimizer"]
    state = {i: dict(entry) for i, entry in opt["state"].items()}
    for i, key in sharded["optimizer"]:
        entry = state.get(i, state.get(str(i)))
        if entry is None or i >= len(params):
            raise CheckpointError(f"{where} lists optimizer state {key!r} of parameter {i}, which it does not hold")
        entry[key] = _wrap(entry[key], params[i], where, f"the optimizer's {key!r} of parameter {i}")
    out["optimizer"] = dict(opt, state=state)
    return out
