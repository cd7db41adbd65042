"""The training state a torch step may change, captured and restored in one place.

A step changes more than the parameters: the forward pass updates module
buffers (BatchNorm's running statistics) and draws from the RNG (Dropout)
before the step is judged, the optimizer keeps its own state, a scheduler
counts, a ``GradScaler`` moves its scale. :class:`TorchState` knows all of it:

* :meth:`TorchState.mark` / :meth:`TorchState.undo_forward`: what a forward
  pass changes (buffers and RNG), kept after every committed step in
  preallocated storage and put back when a step is not committed. Buffers are
  small next to the parameters, so this costs one small copy per step.
* :meth:`TorchState.capture` / :meth:`TorchState.restore`: everything, for
  rollback and checkpoints. A snapshot never shares storage with live tensors
  (``Optimizer.load_state_dict`` keeps the tensors it is given, so it is given
  a fresh copy every time).
* :class:`UpdateUndo`: the parameters and optimizer state before one update,
  in preallocated storage, so that an update found bad afterwards (non-finite
  weights, an update too large) is undone exactly.
* :func:`checkpoint_state` / :func:`load_checkpoint_state`: the durable form.
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

import copy
from typing import Any, NamedTuple

import torch

from ..guard.snapshots import nbytes

__all__ = ["TorchState", "Snapshot", "UpdateUndo", "optimizer_params", "checkpoint_state", "load_checkpoint_state",
           "rng_state_dict", "load_rng_state_dict", "is_dtensor", "to_local_state", "from_local_state"]


def optimizer_params(optimizer) -> list[torch.Tensor]:
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy(t: torch.Tensor, device) -> torch.Tensor:
    return t.clone() if device is None else t.to(device, copy=True)


def _copy_tree(obj, device):
    """A deep copy of a state dict; its tensors copied to ``device`` (None: where they are)."""
    if torch.is_tensor(obj):
        return _copy(obj, device)
    if isinstance(obj, dict):
        return {k: _copy_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


class Snapshot(NamedTuple):
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    scaler: dict | None
    rng: dict
    extra: dict


class TorchState:
    """Parameters, buffers, optimizer, scheduler, loss scaler and RNG of one torch model."""

    def __init__(self, model, optimizer, *, scheduler=None, scaler=None, restore_rng=True):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.restore_rng = restore_rng
        self.params = optimizer_params(optimizer)
        self.buffers = [b for b in model.buffers()]
        self._float_buffers: bool | None = None
        self._marked: list[torch.Tensor] | None = None
        self._marked_rng: dict | None = None

    # -- what a forward pass changes ---------------------------------------------
    def mark(self) -> None:
        """Remember the buffers and RNG as they are now (the state a skipped step returns to)."""
        with torch.no_grad():
            if self._marked is None or any(m.shape != b.shape for m, b in zip(self._marked, self.buffers)):
                self._marked = [b.detach().clone() for b in self.buffers]
            elif self.buffers:
                torch._foreach_copy_(self._marked, [b.detach() for b in self.buffers])
        self._marked_rng = _rng_state() if self.restore_rng else None

    def undo_forward(self) -> None:
        """Put the buffers and RNG back as :meth:`mark` saw them."""
        if self._marked is not None and self.buffers:
            with torch.no_grad():
                torch._foreach_copy_([b.data for b in self.buffers], self._marked)
        if self._marked_rng is not None:
            _set_rng_state(self._marked_rng)

    def select_forward(self, ok: torch.Tensor) -> None:
        """:meth:`mark` or :meth:`undo_forward` chosen on the device by the 0-d bool ``ok`` (no host
        sync): the buffers keep what the forward pass wrote where ``ok``, else get the marked ones
        back; they are then the new mark. The RNG is left as it is (its state lives on the host)."""
        if not self.buffers:
            return
        with torch.no_grad():
            if self._marked is None:
                self._marked = [b.detach().clone() for b in self.buffers]
            live = [b.data for b in self.buffers]
            torch._foreach_copy_(live, [torch.where(ok, b, m) for b, m in zip(live, self._marked)])
            torch._foreach_copy_(self._marked, live)

    def held_bytes(self) -> int:
        """Bytes of the marked buffers (what a skipped step puts back)."""
        return nbytes(self._marked or [])

    @property
    def has_float_buffers(self) -> bool:
        if self._float_buffers is None:  # the module's buffers are fixed once the state is built
            self._float_buffers = any(b.is_floating_point() and b.numel() for b in self.buffers)
        return self._float_buffers

    def buffers_finite(self) -> torch.Tensor:
        floats = [b for b in self.buffers if b.is_floating_point() and b.numel()]
        if not floats:
            device = self.params[0].device if self.params else "cpu"
            return torch.ones((), dtype=torch.bool, device=device)
        return torch.stack([torch.isfinite(torch.stack(torch.aminmax(b))).all() for b in floats]).all()

    # -- everything ------------------------------------------------------------------
    def capture(self, extra: dict | None = None, where: str = "device") -> Snapshot:
        """A copy of the whole state sharing no storage with it; ``where="host"``: tensors on the CPU
        (copied there directly, never first on the device)."""
        device = "cpu" if where == "host" else None
        with torch.no_grad():
            return Snapshot(
                [_copy(p.detach(), device) for p in self.params],
                [_copy(b.detach(), device) for b in self.buffers],
                _copy_tree(self.optimizer.state_dict(), device),
                copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
                copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
                _rng_state(),
                copy.deepcopy(extra or {}),
            )

    def restore(self, snap: Snapshot) -> None:
        with torch.no_grad():
            for live, saved in zip(self.params, snap.params):
                live.copy_(saved)
            for live, saved in zip(self.buffers, snap.buffers):
                live.copy_(saved)
        # a fresh copy each time: load_state_dict keeps the tensors it is given
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        if self.scheduler is not None and snap.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
        if self.scaler is not None and snap.scaler is not None:
            self.scaler.load_state_dict(copy.deepcopy(snap.scaler))
        _set_rng_state(snap.rng)
        self.mark()


def rng_state_dict() -> dict:
    """Every RNG a run may draw from: torch (CPU, CUDA), numpy's global one, Python's ``random``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": _rng_state(), "numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss),
                                             "cached": float(cached)}, "python": random.getstate()}


def load_rng_state_dict(state: dict) -> None:
    import random

    import numpy as np

    _set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def checkpoint_state(state: "TorchState") -> dict:
    """The durable form of a :class:`TorchState`: tensors and plain values only (see :mod:`stabilize.checkpoint`)."""
    snap = state.capture()
    # FSDP2: sharded entries as this rank's local shard, plain tensors (see the module docstring)
    return to_local_state({"params": snap.params, "buffers": snap.buffers, "optimizer": snap.optimizer,
                           "scheduler": snap.scheduler, "scaler": snap.scaler, "rng": rng_state_dict()})


def load_checkpoint_state(state: "TorchState", saved: dict, where: str = "checkpoint") -> None:
    """Put a verified checkpoint back; on any mismatch raise before (or undo after) touching the live state."""
    from ..checkpoint import CheckpointError
    saved = from_local_state(saved, state.params, state.buffers, where)  # FSDP2 shards back to DTensors

    def shapes(xs):
        return [tuple(x.shape) for x in xs]

    for name, live in (("params", state.params), ("buffers", state.buffers)):
        if shapes(saved[name]) != shapes(live):
            raise CheckpointError(f"{where} holds {len(saved[name])} {name} of shapes {shapes(saved[name])[:4]}..., "
                                  f"the live model {len(live)} of shapes {shapes(live)[:4]}...: another model")
    for name, obj in (("scheduler", state.scheduler), ("scaler", state.scaler)):
        if (saved[name] is None) != (obj is None):
            raise CheckpointError(f"{where} was saved {'with' if saved[name] is not None else 'without'} a {name}; "
                                  f"pass the same {name} (or none) to load it")
    before = state.capture()
    rng = rng_state_dict()
    try:
        state.restore(Snapshot(saved["params"], saved["buffers"], saved["optimizer"], saved["scheduler"],
                               saved["scaler"], saved["rng"]["torch"], {}))
        load_rng_state_dict(saved["rng"])
        state.mark()
    except Exception as exc:
        state.restore(before)
        load_rng_state_dict(rng)
        raise CheckpointError(f"{where} does not fit this model/optimizer ({type(exc).__name__}: {exc}); "
                              f"the training state was left as it was") from exc


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


class UpdateUndo:
    """The parameters and the optimizer's tensor state before one update, for an exact undo.

    The parameters' storage is allocated once and refilled with ``_foreach_copy_``;
    the optimizer state is cloned per step. One copy of both per step is the price
    of checking the update actually applied (``max_update_ratio``, ``verify_updates``).
    """

    def __init__(self, state: TorchState):
        self.state = state
        self._params: list[torch.Tensor] | None = None
        self._opt: list[tuple[torch.Tensor, str, Any]] = []
        self._had_state: set[int] = set()

    def save(self) -> None:
        st = self.state
        with torch.no_grad():
            if self._params is None:
                self._params = [p.detach().clone() for p in st.params]
            else:
                torch._foreach_copy_(self._params, [p.detach() for p in st.params])
            saved = []
            for p in st.params:
                for key, value in st.optimizer.state.get(p, {}).items():
                    saved.append((p, key, value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)))
            self._opt = saved
            self._had_state = {id(p) for p in st.params if p in st.optimizer.state}

    def held_bytes(self) -> int:
        """Bytes of the pre-step copies (0 before the first update)."""
        if self._params is None:
            return 0
        return nbytes(self._params) + nbytes([value for _, _, value in self._opt])

    def undo(self) -> None:
        st = self.state
        with torch.no_grad():
            for live, saved in zip(st.params, self._params):
                live.copy_(saved)
            for p in st.params:  # state created by this very update: the optimizer had none before
                if id(p) not in self._had_state and p in st.optimizer.state:
                    del st.optimizer.state[p]
            for p, key, value in self._opt:
                live = st.optimizer.state[p].get(key)
                if torch.is_tensor(live) and torch.is_tensor(value) and live.shape == value.shape:
                    live.copy_(value)
                else:
                    st.optimizer.state[p][key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
