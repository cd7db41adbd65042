"""The torch side of rank-consistent decisions: one all-reduce of the step's vector.

:class:`TorchReducer` packs a step's local numbers in the layout of
:mod:`stabilize.distributed` and all-reduces them with SUM in one call on the
default (or a given) process group, on the gradients' device, so that with
NCCL the reduction is queued on the stream and the step's one read is still
the only host sync. DDP gradients are replicated (``SQ_REPL``); FSDP2
``DTensor`` gradients with a ``Shard`` placement contribute their local
shard to ``SQ_SHARD``, which sums to the true global norm (the norm of a
shard alone is wrong for clipping and for the finite check).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends.torch import partial_norms
from ..distributed import combine

__all__ = ["TorchReducer", "local", "is_sharded"]


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
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
        return vec

    def step(self, loss, grads, buffers_ok, device, clamp=None):
        """The shared ``(loss, norm, current, loss_ok, grads_ok, buffers_ok)`` of one step, in one
        all-reduce: the synchronous torch step's measurement with several ranks.

        ``clamp``, when given, clamps ``grads`` in place (``clip_value``) between the two
        measurements: ``norm`` is before it, ``current`` after.
        """
        sq = cur = self.sumsq(grads, device)
        if clamp is not None:
            clamp()
            cur = self.sumsq(grads, device)
        vec = self.all_reduce([loss, ~torch.isfinite(loss), ~buffers_ok, sq[0], sq[1], cur[0], cur[1]])
        return combine(vec, self.world, torch.sqrt, torch.isfinite)

    def all_true(self, flags) -> list[torch.Tensor]:
        """Each flag true on every rank (one all-reduce of the count of ranks where it is false)."""
        vec = self.all_reduce([~f for f in flags])
        return [vec[i] == 0 for i in range(len(flags))]
