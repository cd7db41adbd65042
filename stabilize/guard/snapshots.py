"""Where a rollback snapshot lives, and that one is held only when the policy can use it.

A snapshot is a full copy of the training state (parameters, buffers,
optimizer state, schedule, loss scaler, RNG): for a 50M-parameter model with
Adam that is 600 MB. Only two settings can ever restore one:
``on_nonfinite="rollback"`` and ``spike="rewind"``. Under ``skip``,
``backoff``, ``auto``, ``raise`` and ``ignore`` nothing is held, and an update
that a native optimizer applied before it could be checked (weights it made
non-finite) stops the run with a message that names the two ways out
(``on_nonfinite="rollback"``, or ``verify_updates=True`` for an exact undo of
each update), instead of a silent copy of the model kept "just in case".

When a snapshot is used, ``snapshot_to`` says where it goes:

=========  ===============================================================
``device``  next to the model (default; the fastest restore)
``host``    host memory (a CUDA model keeps its GPU memory for training)
``disk``    a durable file at ``snapshot_path``, written atomically by
            :mod:`stabilize.checkpoint` (format version, SHA-256, no
            unpickling): no RAM copy at all, and a rollback or rewind reads
            the last durable state back; with several ranks each writes
            ``<snapshot_path>.rank<r>``
=========  ===============================================================

``snapshot_every`` bounds how often one is taken. :meth:`SnapshotStore.held_bytes`
is what the snapshot costs in memory, for the benchmark and for users sizing a run.

The adapter supplies ``capture(where) -> snapshot`` (``where``: ``"device"``
or ``"host"``) and ``restore(snapshot)``; a snapshot is any tree of tensors,
arrays and plain values that :mod:`stabilize.checkpoint` can write.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..distributed import rank, world_size

__all__ = ["SnapshotStore", "nbytes", "host_copy"]


def nbytes(tree) -> int:
    """The bytes of every tensor and array in a snapshot tree."""
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return tree.nbytes
    size = getattr(tree, "nbytes", None)  # torch tensors and TF tensors/variables
    if isinstance(size, int):
        return size
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    return 0


def host_copy(tree):
    """A snapshot tree on the host: torch tensors on the CPU, TF tensors as numpy arrays."""
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, tuple):  # a NamedTuple too: a plain tuple, rebuilt by the adapter's ``rebuild``
        return tuple(host_copy(v) for v in tree)
    if isinstance(tree, list):
        return [host_copy(v) for v in tree]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if hasattr(tree, "numpy") and not isinstance(tree, np.ndarray):  # TF tensors and variables
        return np.array(tree.numpy())
    return tree


class SnapshotStore:
    """The rollback snapshot of one guarded run: taken, held where the settings say, restored."""

    def __init__(self, settings, capture: Callable[[str], Any], restore: Callable[[Any], None],
                 rebuild: Callable[[Any], Any] | None = None):
        """``rebuild`` turns a snapshot read back from disk (plain tuples) into the adapter's type."""
        self.where = settings.snapshot_to
        self.path = settings.snapshot_path
        if self.path is not None and world_size() > 1:  # each rank its own file: FSDP shards differ per rank
            self.path = f"{self.path}.rank{rank()}"
        self._capture, self._restore, self._rebuild = capture, restore, rebuild or (lambda s: s)
        self._held: Any = None
        self._on_disk = False

    @property
    def held(self) -> bool:
        return self._held is not None or self._on_disk

    def take(self) -> None:
        if self.where == "disk":
            from ..checkpoint import save

            snap = host_copy(self._capture("host"))
            save(self.path, {"snapshot": snap}, meta={"kind": "rollback snapshot"})
            self._on_disk = True
        else:
            self._held = self._capture(self.where)

    def restore(self) -> bool:
        """Put the snapshot back; returns whether there was one."""
        if self._on_disk:
            from ..checkpoint import load

            self._restore(self._rebuild(load(self.path)["snapshot"]))
            return True
        if self._held is None:
            return False
        self._restore(self._held)
        return True

    def durable(self):
        """The held snapshot on the host (for a checkpoint), or None when none is held."""
        if self._on_disk:
            from ..checkpoint import load

            return load(self.path)["snapshot"]
        return host_copy(self._held) if self._held is not None else None

    def put(self, snap) -> None:
        """Hold ``snap`` (read back from a checkpoint, plain tuples) as the rollback snapshot."""
        snap = self._rebuild(snap)
        if self.where == "disk":
            from ..checkpoint import save

            save(self.path, {"snapshot": host_copy(snap)}, meta={"kind": "rollback snapshot"})
            self._on_disk = True
        else:
            self._held = snap

    def clear(self) -> None:
        """Forget the snapshot (the next fit takes a fresh one); a durable file stays on disk."""
        self._held, self._on_disk = None, False

    def held_bytes(self) -> int:
        """Bytes held in memory by the snapshot (0 on disk: see :meth:`disk_bytes`)."""
        return nbytes(self._held) if self._held is not None else 0

    def disk_bytes(self) -> int:
        return os.path.getsize(self.path) if self._on_disk and os.path.exists(self.path) else 0
