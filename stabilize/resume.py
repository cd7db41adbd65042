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
  checkpoint's epoch and ends where the interrupted call would have ended;
* **the rollback snapshot the run held is in the checkpoint** (``rollback``,
  ``spike="rewind"``), so a rollback after the resume restores the same state
  as in the uninterrupted run.

Loading is transactional: every section is verified against the live
objects (:mod:`stabilize.checkpoint`) before the updater, the Supervisor, the
counters or the position change. The checks every adapter shares live here:
the Supervisor's state (:func:`check_policy_state`, on a scratch Supervisor)
and the host's generators, numpy's global one and Python's ``random``
(:func:`host_rng_state`, :func:`check_host_rng` on scratch generators,
:func:`apply_host_rng`, which cannot fail once checked).

Example:
    >>> import numpy as np
    >>> saved = host_rng_state()
    >>> first = np.random.rand()
    >>> apply_host_rng(check_host_rng(saved, "example"))
    >>> np.random.rand() == first
    True
"""

from __future__ import annotations

import random

import numpy as np

from .checkpoint import CheckpointError, load, save

__all__ = ["Shuffle", "save_trainer", "load_trainer", "checkpoint_plan", "fit_plan", "check_continuation", "check_policy_state", "host_rng_state",
           "check_host_rng", "apply_host_rng"]

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
             "data": {"epoch": trainer._epoch, "fit": fit_position}, "snapshot": trainer._snapshots.durable()}
    written = save(path, state, meta={"kind": "StabilityTrainer", "steps": sup.step})
    if sup.event_log is None:  # the JSON-lines event log starts beside the first checkpoint
        sup.event_log = EventLog(beside(path))
        sup.event_log.rewrite(sup.events)
    return written


def load_trainer(trainer, path) -> None:
    """Verify everything in ``path`` against ``trainer``, then put it all back (see the module docstring)."""
    from .eventlog import EventLog, beside

    updater, where = trainer._updater_checkpoints(), f"checkpoint {str(path)!r}"
    sections = set(updater.checkpoint_sections) | {"supervisor", "applied", "data", "snapshot"}
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
    if saved["snapshot"] is not None:
        _check_snapshot(updater, saved["snapshot"], where)
    updater.apply_checkpoint_state(checked, where)
    trainer.supervisor.load_state_dict(saved["supervisor"])
    updater.applied = saved["applied"]
    trainer._epoch, trainer._resume = data["epoch"], fit
    trainer._snapshots.clear()  # the rollback snapshot the run held, if any (else the next fit takes one)
    if saved["snapshot"] is not None:
        trainer._snapshots.put(saved["snapshot"])
    sup = trainer.supervisor
    if sup.event_log is None:
        sup.event_log = EventLog(beside(path))
    sup.event_log.rewrite(sup.events)  # exactly the checkpoint's events; later ones appended as they happen


def checkpoint_plan(path, every, epochs) -> bool:
    """Check ``fit``'s checkpoint arguments; returns whether to save at each epoch's end."""
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {every!r}")
    if (every is not None or epochs) and path is None:
        raise ValueError("checkpoint_every/checkpoint_epochs need checkpoint_path=, the file to save to")
    return bool(epochs) if epochs is not None else path is not None and every is None


def fit_plan(trainer, call: dict, epochs: int) -> tuple:
    """``(first epoch, end epoch, start step, batches to skip, rows the first epoch leaves out or None)``:
    the interrupted fit a mid-fit checkpoint was taken in (``call`` must match it), or a new one."""
    sup, resume = trainer.supervisor, trainer._resume
    if resume is not None:
        check_continuation(resume, **call)
        trainer._resume = None
        return resume["epoch"], resume["end"], resume["start"], resume["batch"], set(resume["epoch_skip"])
    sup.skip_rows.clear()  # what a rollback leaves out is named within one fit's data
    sup.skip_positions.clear()
    return trainer._epoch, trainer._epoch + epochs, sup.step, 0, None


def check_continuation(resume: dict, **call) -> None:
    """Raise ValueError unless ``call`` (this fit's batch_size, seed, shuffle, drop_last, rows) is the
    interrupted fit's: finishing it on other data or batches would not be the run it was."""
    diff = {k: (resume[k], v) for k, v in call.items() if resume[k] != v}
    if diff:
        said = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise ValueError(f"this trainer was loaded from a checkpoint taken inside a fit at epoch {resume['epoch']}, "
                         f"batch {resume['batch']}, with {said}: call fit with the same data and arguments to finish "
                         f"that fit exactly, or call trainer.abandon_fit() to start a new one")


def _shapes(tree):
    """The layout of a snapshot's weights: (dtype, shape) of each tensor in its first entry."""
    first = tree[0] if isinstance(tree, (tuple, list)) and tree else tree
    leaves = first if isinstance(first, (list, tuple)) else [first]
    return [(str(getattr(t, "dtype", type(t).__name__)).replace("torch.", ""), tuple(getattr(t, "shape", ())))
            for t in leaves]


def _check_snapshot(updater, saved, where: str) -> None:
    """The saved rollback snapshot's weights have the live ones' layout (it is restored later, unchecked)."""
    from .guard.snapshots import host_copy

    live = host_copy(updater.capture("host"))
    if not isinstance(saved, (tuple, list)) or len(saved) != len(live) or _shapes(saved) != _shapes(live):
        raise CheckpointError(f"{where}: its rollback snapshot does not have the live model's layout")

def check_policy_state(settings, saved, where: str) -> None:
    """Verify a saved Supervisor ``state_dict`` on a scratch Supervisor (nothing live changes): the same
    sections as this version writes, each readable; else CheckpointError naming ``where``."""
    from .guard.supervisor import Supervisor

    scratch = Supervisor(settings)
    expected = set(scratch.state_dict())
    if not isinstance(saved, dict) or set(saved) != expected:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{where}: its policy state holds {found}, expected {sorted(expected)}")
    try:
        scratch.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{where}: its policy state cannot be read ({type(exc).__name__}: {exc})") from exc


# -- the host's generators ------------------------------------------------------------------------
def host_rng_state() -> dict:
    """``{"numpy": {...}, "python": ...}``: plain values and one uint32 array."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def check_host_rng(saved, where: str) -> tuple:
    """The saved generators as ``(numpy_state, python_state)``, verified on scratch generators; raises
    CheckpointError naming ``where`` and the entry that is not a generator's state."""
    try:
        n, py = saved["numpy"], saved["python"]
        keys = n["keys"]
        if set(n) != {"kind", "keys", "pos", "has_gauss", "cached"} or not isinstance(keys, np.ndarray) \
                or keys.dtype != np.uint32 or keys.shape != (624,):
            raise ValueError(f"numpy's state holds {sorted(n)}, keys {getattr(keys, 'dtype', type(keys))}"
                             f"{getattr(keys, 'shape', '')}")
        np_state = (n["kind"], keys.copy(), n["pos"], n["has_gauss"], n["cached"])
        np.random.RandomState().set_state(np_state)  # a scratch generator: raises on anything malformed
        if not (isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], (tuple, list))):
            raise ValueError(f"Python's state is a {type(py).__name__}")
        py_state = (py[0], tuple(py[1]), py[2])
        random.Random().setstate(py_state)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise CheckpointError(f"{where}: its numpy/Python RNG state cannot be restored ({exc})") from exc
    return np_state, py_state


def apply_host_rng(checked: tuple) -> None:
    """Set the generators to what :func:`check_host_rng` returned."""
    np_state, py_state = checked
    np.random.set_state(np_state)
    random.setstate(py_state)
