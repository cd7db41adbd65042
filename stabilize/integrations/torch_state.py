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
* the durable form (checkpoints, FSDP2 shards) is :mod:`.torch_checkpoint`.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch

from ..guard.snapshots import nbytes

__all__ = ["TorchState", "Snapshot", "UpdateUndo", "optimizer_params", "rng_state_dict", "load_rng_state_dict",
           "check_rng_state_dict", "apply_rng_state"]


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
    from .. import hostrng

    return {"torch": _rng_state(), **hostrng.state()}


def load_rng_state_dict(state: dict, where: str = "checkpoint") -> None:
    apply_rng_state(check_rng_state_dict(state, where))


def check_rng_state_dict(saved, where: str) -> tuple:
    """``saved`` (from :func:`rng_state_dict`) verified on scratch generators: ``(torch, host)``."""
    from .. import hostrng
    from ..checkpoint import CheckpointError

    if not isinstance(saved, dict) or set(saved) != {"torch", "numpy", "python"}:
        raise CheckpointError(f"{where}: its RNG section is not the torch/numpy/Python generators' state")
    t = saved["torch"]
    try:
        if not isinstance(t, dict) or not set(t) <= {"cpu", "cuda"} or "cpu" not in t:
            raise ValueError(f"entries {sorted(t) if isinstance(t, dict) else type(t).__name__}")
        torch.Generator().set_state(t["cpu"])  # a scratch generator: raises on a malformed state
        if "cuda" in t:
            if not torch.cuda.is_available() or len(t["cuda"]) != torch.cuda.device_count():
                raise ValueError(f"it holds the CUDA generators of {len(t['cuda'])} GPU(s); this process has "
                                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
            for c in t["cuda"]:
                if not (torch.is_tensor(c) and c.dtype == torch.uint8):
                    raise ValueError("a CUDA generator state is not a byte tensor")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: its torch RNG state cannot be restored ({exc})") from exc
    return t, hostrng.check(saved, where)


def apply_rng_state(checked: tuple) -> None:
    from .. import hostrng

    _set_rng_state(checked[0])
    hostrng.apply(checked[1])


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
