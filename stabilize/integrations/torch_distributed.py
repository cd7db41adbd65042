"""The torch side of rank-consistent decisions: one all-reduce of the step's vector.

:class:`TorchReducer` packs a step's local numbers in the layout of
:mod:`stabilize.distributed` and all-reduces them with SUM in one call on the
default (or a given) process group, on the gradients' device, so that with
NCCL the reduction is queued on the stream and the step's one read is still
the only host sync. DDP gradients are replicated (``SQ_REPL``); FSDP2
``DTensor`` gradients with a ``Shard`` placement contribute their local
shard to ``SQ_SHARD``, which sums to the true global norm (the norm of a
shard alone is wrong for clipping and for the finite check).

A rank that dies (killed, out of memory) breaks every collective after it:
gloo reports "Connection closed by peer" at once, NCCL at its time-out. The
guarded step's collectives (DDP's gradient all-reduce in ``backward`` and
this reducer's) turn that into :class:`RankLostError`, which names the lost
rank: each rank leaves ``host:pid`` in the process group's store when its
reducer is built, and the survivors look for the ranks whose process is gone
(on their own host), or whose store (rank 0's) no longer answers.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from ..backends.torch import partial_norms
from ..distributed import combine
from ..errors import RankLostError

__all__ = ["TorchReducer", "RankLostError", "local", "is_sharded"]

_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a torch without it, or no default group: the rank is not named
        return None


def is_sharded(t) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a tensor (a ``DTensor``'s local shard; any other tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


class TorchReducer:
    """All-reduces one step's flags and squared norms across the ranks of a process group."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank()
        store = _store()
        if store is not None:
            try:
                store.set(f"stabilize/rank{self.rank}", f"{socket.gethostname()}:{os.getpid()}")
            except Exception:  # noqa: BLE001 - naming a lost rank is a courtesy, never a failure
                pass

    @classmethod
    def detect(cls, mode: str = "auto", group=None) -> "TorchReducer | None":
        """A reducer when torch.distributed runs with more than one rank and ``mode`` is ``"auto"``."""
        if mode == "off" or not dist.is_available() or not dist.is_initialized():
            return None
        return cls(group) if dist.get_world_size(group) > 1 else None

    @staticmethod
    def sumsq(tensors, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sharded, replicated) sums of squares in float64, from per-tensor norms taken in one pass."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        out = []
        for group in ([local(t) for t in tensors if is_sharded(t)], [t for t in tensors if not is_sharded(t)]):
            norms = partial_norms(group, torch.float32).double() if group else None
            out.append(torch.dot(norms, norms) if norms is not None else zero)
        return out[0], out[1]

    def all_reduce(self, values) -> torch.Tensor:
        vec = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values])
        with self.guarding("the guard's all-reduce"):
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
        return vec

    def guarding(self, what: str):
        """A context in which a collective that fails because a rank died raises :class:`RankLostError`."""
        return _Guarding(self, what)

    def lost(self, exc: BaseException, what: str) -> RankLostError:
        """The error naming the ranks whose process is gone (see the module docstring)."""
        found, store = [], _store()
        for r in range(dist.get_world_size()):
            if r == self.rank:
                continue
            try:
                key = f"stabilize/rank{r}"
                if store is None or not store.check([key]):
                    continue
                host, pid = store.get(key).decode().rsplit(":", 1)
                if host == socket.gethostname() and not _alive(int(pid)):
                    found.append(f"rank {r} (pid {pid} on {host}, gone)")
            except Exception:  # noqa: BLE001 - the store lives in rank 0's process: it is rank 0 that is gone
                found = ["rank 0 (its process held the group's store, which no longer answers)"]
                break
        who = ", ".join(found) or "a rank (on another host, or not identified)"
        return RankLostError(f"stabilize: {who} was lost during {what} on rank {self.rank} of {self.world}: the "
                             f"ranks cannot decide together any more. Restart every rank from the last checkpoint. "
                             f"({type(exc).__name__}: {str(exc)[:200]})")

    def step(self, loss, grads, clipped, buffers_ok, device):
        """The shared ``(loss, norm, current, loss_ok, grads_ok, buffers_ok)`` of one step.

        ``grads`` are the gradients as the step found them, ``clipped`` the
        same after ``clip_value`` (or None when not clamped).
        """
        sq = self.sumsq(grads, device)
        cur = self.sumsq(clipped, device) if clipped is not None else sq
        vec = self.all_reduce([loss, ~torch.isfinite(loss), ~buffers_ok, sq[0], sq[1], cur[0], cur[1]])
        return combine(vec, self.world, torch.sqrt, torch.isfinite)

    def all_true(self, flags) -> list[torch.Tensor]:
        """Each flag true on every rank (one all-reduce of the count of ranks where it is false)."""
        vec = self.all_reduce([~f for f in flags])
        return [vec[i] == 0 for i in range(len(flags))]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited one its parent has not reaped yet is a zombie: gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): trust kill(0)
        return True


class _Guarding:
    def __init__(self, reducer: TorchReducer, what: str):
        self.reducer, self.what = reducer, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, RuntimeError) and not isinstance(exc, RankLostError) \
                and any(m in str(exc) for m in _LOST):
            raise self.reducer.lost(exc, self.what) from exc
        return False
