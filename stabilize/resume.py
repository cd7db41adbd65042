"""Resuming a ``StabilityTrainer``: its checkpoint, and where an interrupted ``fit`` continues.

A trainer checkpoint holds the updater's state (torch or Keras), the
Supervisor's counters and history, the applied-step count, and ``data``:
the global epoch and, for a checkpoint taken inside a ``fit`` call
(``checkpoint_every``), the position in that call (epoch, next batch, the rows
a rollback had left out when the epoch began, and the call's arguments).

Exactness rests on two rules:

* **the shuffle is a function of the seed and the global epoch**: epoch ``e``
  uses the ``e``-th permutation drawn from ``numpy.random.default_rng(seed)``
  (:class:`Shuffle`), so ``fit(epochs=1)`` twice equals ``fit(epochs=2)``,
  with or without a save and load in between;
* **a fit interrupted by a crash is finished by the next fit call** with the
  same data and arguments: it skips the batches already trained in the
  checkpoint's epoch and ends where the interrupted call would have ended.

Loading is transactional: every section is verified against the live
objects (:mod:`stabilize.checkpoint`) before the updater, the Supervisor, the
counters or the position change.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import CheckpointError, check_policy_state, load, save

__all__ = ["Shuffle", "save_trainer", "load_trainer", "check_continuation"]

_FIT_KEYS = {"epoch", "batch", "end", "start", "epoch_skip", "batch_size", "seed", "shuffle", "drop_last", "rows"}


class Shuffle:
    """The permutation of each global epoch under a seed, drawn once in sequence and cached.

    Example:
        >>> s = Shuffle()
        >>> a = s.rng(seed=0, epoch=1, n=5).permutation(5)
        >>> g = np.random.default_rng(0); _ = g.permutation(5)
        >>> bool((a == g.permutation(5)).all())
        True
    """

    def __init__(self):
        self._at = None  # (seed, n, epoch, bit-generator state at that epoch)

    def rng(self, *, seed: int, epoch: int, n: int) -> np.random.Generator:
        """A generator whose next ``permutation(n)`` is epoch ``epoch``'s."""
        gen = np.random.default_rng(seed)
        done = 0
        if self._at is not None and self._at[:2] == (seed, n) and self._at[2] <= epoch:
            gen.bit_generator.state, done = self._at[3], self._at[2]
        for _ in range(epoch - done):
            gen.permutation(n)
        self._at = (seed, n, epoch, gen.bit_generator.state)
        return gen


def save_trainer(trainer, path, fit_position: dict | None):
    """Write ``trainer``'s whole state (``fit_position``: where a running fit is, or None)."""
    from .eventlog import EventLog, beside

    updater, sup = trainer._updater_checkpoints(), trainer.supervisor
    state = {**updater.checkpoint_state(), "supervisor": sup.state_dict(), "applied": updater.applied,
             "data": {"epoch": trainer._epoch, "fit": fit_position}}
    written = save(path, state, meta={"kind": "StabilityTrainer", "steps": sup.step})
    if sup.event_log is None:  # the JSON-lines event log starts beside the first checkpoint
        sup.event_log = EventLog(beside(path))
        sup.event_log.rewrite(sup.events)
    return written


def load_trainer(trainer, path) -> None:
    """Verify everything in ``path`` against ``trainer``, then put it all back (see the module docstring)."""
    from .eventlog import EventLog, beside

    updater, where = trainer._updater_checkpoints(), f"checkpoint {str(path)!r}"
    sections = set(updater.checkpoint_sections) | {"supervisor", "applied", "data"}
    saved = load(path, kind="StabilityTrainer", sections=sections, reader="StabilityTrainer.load_checkpoint")
    checked = updater.check_checkpoint_state(saved, where)
    check_policy_state(trainer.settings, saved["supervisor"], where)
    data = saved["data"]
    if type(saved["applied"]) is not int or saved["applied"] < 0:
        raise CheckpointError(f"{where}: its applied-step count is {saved['applied']!r}")
    fit = data.get("fit") if isinstance(data, dict) else None
    if not isinstance(data, dict) or set(data) != {"epoch", "fit"} or type(data["epoch"]) is not int \
            or (fit is not None and (not isinstance(fit, dict) or set(fit) != _FIT_KEYS)):
        raise CheckpointError(f"{where}: its data position is malformed ({data!r:.120})")
    updater.apply_checkpoint_state(checked, where)
    trainer.supervisor.load_state_dict(saved["supervisor"])
    updater.applied = saved["applied"]
    trainer._epoch, trainer._resume = data["epoch"], fit
    trainer._snapshots.clear()  # the next fit takes a fresh rollback snapshot
    sup = trainer.supervisor
    if sup.event_log is None:
        sup.event_log = EventLog(beside(path))
    sup.event_log.rewrite(sup.events)  # exactly the checkpoint's events; later ones appended as they happen


def check_continuation(resume: dict, **call) -> None:
    """Raise ValueError unless ``call`` (this fit's batch_size, seed, shuffle, drop_last, rows) is the
    interrupted fit's: finishing it on other data or batches would not be the run it was."""
    diff = {k: (resume[k], v) for k, v in call.items() if resume[k] != v}
    if diff:
        said = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise ValueError(f"this trainer was loaded from a checkpoint taken inside a fit at epoch {resume['epoch']}, "
                         f"batch {resume['batch']}, with {said}: call fit with the same data and arguments to finish "
                         f"that fit exactly, or call trainer.abandon_fit() to start a new one")
