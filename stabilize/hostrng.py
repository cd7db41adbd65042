"""The host's random generators in a checkpoint: numpy's global one and Python's ``random``.

Both adapters (torch and Keras) save them beside their framework's own
generator. :func:`check` verifies a saved state on scratch generators of the
same kind, so a checkpoint that would fail half-way through a load is
refused before any live state changes (the load is transactional, see
:mod:`stabilize.checkpoint`); :func:`apply` then sets what :func:`check`
returned, which cannot fail.

Example:
    >>> import numpy as np
    >>> from stabilize import hostrng
    >>> saved = hostrng.state()
    >>> first = np.random.rand()
    >>> hostrng.apply(hostrng.check(saved, "example"))
    >>> np.random.rand() == first
    True
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["state", "check", "apply"]


def state() -> dict:
    """``{"numpy": {...}, "python": ...}``: plain values and one uint32 array."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def check(saved, where: str) -> tuple:
    """The saved generators as ``(numpy_state, python_state)``, verified; raises CheckpointError naming
    ``where`` and the entry that is not a generator's state."""
    from .checkpoint import CheckpointError

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


def apply(checked: tuple) -> None:
    """Set the generators to what :func:`check` returned."""
    np_state, py_state = checked
    np.random.set_state(np_state)
    random.setstate(py_state)
