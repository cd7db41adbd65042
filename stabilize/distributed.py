"""Rank-consistent decisions: what one step's ranks must agree on, and who prints.

With data parallelism every rank runs its own guarded step, but a decision
that differs between ranks (one rank skips while the other applies) leaves
the replicas silently different for the rest of the run, and a rank that
raises alone leaves the others waiting in the next collective until it times
out. Users hit exactly this: Lightning #5243/#5359 (``skip_if_any``), mmf
#1073 (a hang on a NaN loss with a sharded optimizer), ecmwf WeatherGenerator
#2718, and microsoft/dion #79, which all-reduces a one-byte MAX so that every
rank skips together.

Here the step's local numbers are packed into ONE small float64 vector and
all-reduced once, with SUM, inside the step's single device-to-host read
(no second sync). SUM serves both purposes: a count of ranks with a bad flag
is non-zero exactly when MAX of the flags is, and squared norms add up.

=========  =============================================  ==========================
slot       local value                                    after the SUM over W ranks
=========  =============================================  ==========================
LOSS       the rank's loss                                mean: ``sum / W``
LOSS_BAD   1 when the rank's loss is non-finite           bad on every rank if > 0
BUF_BAD    1 when the rank's buffers are non-finite       bad on every rank if > 0
SQ_SHARD   sum of squares of the rank's *shard* (FSDP)    the true global norm²
SQ_REPL    sum of squares of replicated gradients (DDP)   ``sum / W`` (the replica's)
CUR_SHARD  the same after ``clip_value``                  the clip coefficient's norm
CUR_REPL   the same after ``clip_value``
=========  =============================================  ==========================

The gradient norm is ``sqrt(SQ_SHARD + SQ_REPL / W)``: non-finite when any
rank's gradients are, and the same number on every rank, so the clip
coefficient, the finite check and a spike verdict agree everywhere.

This module is framework-free: the rank is read from a framework the user
has already imported (``sys.modules``), never by importing one. The torch
all-reduce is :mod:`stabilize.integrations.torch_distributed`.
"""

from __future__ import annotations

import os
import sys

__all__ = ["SLOTS", "rank", "world_size", "is_main", "combine", "unwrap"]

SLOTS = ("loss", "loss_bad", "buffers_bad", "sq_shard", "sq_repl", "cur_shard", "cur_repl")


def _torch_dist():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank() -> int:
    """This process's rank: torch.distributed's when initialized, else ``RANK`` (torchrun), else 0."""
    dist = _torch_dist()
    if dist is not None:
        return dist.get_rank()
    env = os.environ.get("RANK", "0")
    return int(env) if env.isdigit() else 0


def world_size() -> int:
    """How many ranks take part (1 when not distributed)."""
    dist = _torch_dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """Whether this process prints: only rank 0 does; every rank records."""
    return rank() == 0


def combine(reduced, world: int, sqrt, isfinite):
    """Turn the all-reduced vector (:data:`SLOTS`) into the step's shared numbers.

    Works on any tensor type through the ``sqrt``/``isfinite`` it is given.
    Returns ``(loss, norm, current, loss_ok, grads_ok, buffers_ok)``; every
    value is identical on every rank because the reduced vector is.
    """
    loss = reduced[0] / world
    loss_ok = (reduced[1] == 0) & isfinite(loss)
    buffers_ok = reduced[2] == 0
    norm = sqrt(reduced[3] + reduced[4] / world)
    current = sqrt(reduced[5] + reduced[6] / world)
    return loss, norm, current, loss_ok, isfinite(norm), buffers_ok


def unwrap(model):
    """The module to replay a failed step on, without collectives; None where no replay is safe.

    A ``DistributedDataParallel`` wrapper is replayed through its ``.module``
    (its gradient hooks only all-reduce after the wrapper's own forward). A
    model with sharded (FSDP2 ``DTensor``) parameters gathers them in its
    forward pass, a collective that a rank-local replay must not start: it
    is not replayed (the step itself is still handled on every rank).
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module) or _torch_dist() is None:
        return model
    parallel = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if parallel is not None and isinstance(model, parallel):
        model = model.module
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    return model
