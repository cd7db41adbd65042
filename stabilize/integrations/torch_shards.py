"""Sharded (FSDP2 ``fully_shard``) training state in a checkpoint: each rank's own shard, as plain tensors.

Under FSDP2 the parameters, and the optimizer state built from them, are
``DTensor``\\ s. A checkpoint stores them as their **local shards** (plain
tensors) and lists which entries were sharded, for three reasons:

* ``torch.load(weights_only=True)`` reads a pickled ``DTensor`` only when
  ``torch.distributed.tensor`` has been imported, and only on torch versions
  that allow-list it (2.4 and 2.5 do not): a stabilize checkpoint must load
  everywhere without unpickling anything but tensors;
* a pickled ``DTensor`` carries its ``DeviceMesh``, which names the process
  group of the run that wrote it, not of the one that reads it;
* each rank saves and loads only its own shard (one file per rank), so the
  local tensor is all there is to keep.

On load, each listed entry is wrapped back with ``DTensor.from_local`` on the
live parameter's mesh and placements, after checking that the local shapes
agree (a checkpoint from another world size or sharding is refused with a
clear error, before anything changes). Resuming therefore needs the same world
size and the same ``fully_shard`` layout.

Example (one process, nothing sharded: the state passes through unchanged):
    >>> import torch
    >>> state = {"params": [torch.zeros(2)], "buffers": [], "optimizer": {"state": {}, "param_groups": []}}
    >>> to_local_state(state)["sharded"]
    {'params': [], 'buffers': [], 'optimizer': []}
"""

from __future__ import annotations

__all__ = ["is_dtensor", "to_local_state", "from_local_state"]


def is_dtensor(t) -> bool:
    """A ``DTensor`` (checked by its interface: torch.distributed.tensor is never imported here)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh") and hasattr(t, "placements")


def _local(t):
    return t.to_local().detach().clone() if is_dtensor(t) else t


def to_local_state(state: dict) -> dict:
    """``state`` (``params``, ``buffers``, an optimizer ``state_dict``) with every DTensor replaced by
    its local shard, and ``sharded`` listing where they were: indices, and ``[param_index, key]``."""
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
    from ..checkpoint import CheckpointError

    if not is_dtensor(live):
        raise CheckpointError(f"{where} holds a sharded (FSDP) {what}, and the live one is not sharded: "
                              f"apply the same fully_shard to the model before loading")
    local = live.to_local()
    if tuple(saved.shape) != tuple(local.shape):
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
    from ..checkpoint import CheckpointError

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
