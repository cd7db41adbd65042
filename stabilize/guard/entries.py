"""The entry points, what each refuses and why: one table, checked at construction.

Every entry point takes the same flat keywords (:class:`~stabilize.guard.settings.GuardSettings`
plus a few of its own). Some settings cannot act on some entry points; rather than accept a
setting and quietly do nothing with it, the entry point refuses it, before anything runs,
with the reason from :data:`REFUSALS`. The settings x entry-point matrix test
(``tests/test_matrix.py``) checks every refused cell against this table.

=====================  ==========================================================
entry point            name used in :data:`REFUSALS` and in the messages
=====================  ==========================================================
``StabilityTrainer``   ``trainer-torch``, ``trainer-keras``, ``trainer-neutral``
``TorchGuard``         ``TorchGuard`` (synchronous), ``TorchGuard(sync_free)``
``keras_guard``        ``keras_guard``
=====================  ==========================================================

A wrong keyword gets the library's own one-line error naming the closest valid
name (:func:`check_keywords`), instead of Python's ``__init__() got an
unexpected keyword argument``.

Example:
    >>> refusals_for("keras_guard", {"spike": "rewind"}, given={"spike"})
    ["spike='rewind': it leaves batches out, which needs StabilityTrainer's data loop; use spike='skip' or 'clip'"]
    >>> check_keywords("TorchGuard", {"clip_nrom": 1.0})
    Traceback (most recent call last):
    ...
    TypeError: TorchGuard: unknown setting clip_nrom=; did you mean clip_norm=?
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, NamedTuple

__all__ = ["ENTRY_POINTS", "GUARDS", "REFUSALS", "Refusal", "refusals_for", "refuse", "check_keywords"]

ENTRY_POINTS = ("trainer-torch", "trainer-keras", "trainer-neutral", "TorchGuard", "TorchGuard(sync_free)",
                "keras_guard")
GUARDS = ("TorchGuard", "TorchGuard(sync_free)", "keras_guard")
_SYNC_FREE = ("TorchGuard(sync_free)",)


class Refusal(NamedTuple):
    """One row of the table: ``setting`` as shown, the ``entries`` that refuse it, ``when``
    (``(values, given) -> bool``: the settings and options as a dict, the names the user passed),
    and ``why``."""

    setting: str
    entries: tuple[str, ...]
    when: Callable[[dict, set], bool]
    why: str


REFUSALS: tuple[Refusal, ...] = (
    Refusal("spike='rewind'", GUARDS, lambda v, g: v.get("spike") == "rewind",
            "it leaves batches out, which needs StabilityTrainer's data loop; use spike='skip' or 'clip'"),
    Refusal("replay", GUARDS, lambda v, g: "replay" in g,
            "a guard does not own the forward pass, so it cannot replay a failing step; replay acts only in "
            "StabilityTrainer (before a rollback or a rewind)"),
    Refusal("on_nonfinite='rollback'", _SYNC_FREE, lambda v, g: v.get("on_nonfinite") == "rollback",
            "a restore must follow the bad step, which a step read one step late cannot do"),
    Refusal("a GradScaler", _SYNC_FREE, lambda v, g: v.get("scaler") is not None,
            "its step reads found_inf on the host"),
    Refusal("verify_updates", _SYNC_FREE, lambda v, g: bool(v.get("verify_updates")),
            "each update is read back before it stays"),
    Refusal("max_update_ratio", _SYNC_FREE, lambda v, g: v.get("max_update_ratio") is not None,
            "the update is checked after it is made"),
    Refusal("several torch.distributed ranks", _SYNC_FREE, lambda v, g: bool(v.get("ranks", 1) > 1),
            "every rank would need the verdict before its next update"),
    Refusal("a GradScaler", ("trainer-keras", "trainer-neutral"), lambda v, g: v.get("scaler") is not None,
            "scaler= is torch's GradScaler; a Keras model scales its loss with keras.mixed_precision "
            "(a LossScaleOptimizer), a stabilize.optim spec does not scale"),
    Refusal("verify_updates", ("trainer-keras", "trainer-neutral"), lambda v, g: bool(v.get("verify_updates")),
            "these steps check every candidate update before it is committed: there is nothing to verify after"),
)


def refusals_for(entry: str, values: dict, given: Iterable[str] = ()) -> list[str]:
    """The refusals of ``entry`` for these settings and options, each as ``"<setting>: <why>"``."""
    if entry not in ENTRY_POINTS:
        raise ValueError(f"unknown entry point {entry!r}; one of {ENTRY_POINTS}")
    given = set(given)
    return [f"{r.setting}: {r.why}" for r in REFUSALS if entry in r.entries and r.when(values, given)]


def refuse(entry: str, values: dict, given: Iterable[str] = (), *, lead: str | None = None) -> None:
    """Raise ``ValueError`` naming every refused setting of ``entry`` (nothing when none is)."""
    found = refusals_for(entry, values, given)
    if found:
        shown = lead or f"{entry} cannot take"
        raise ValueError(f"{shown} {'; '.join(found)}")


def check_keywords(where: str, settings: dict, arguments: Iterable[str] = ()) -> None:
    """Refuse a keyword that is neither a setting nor one of ``arguments`` (the entry point's own),
    with the closest valid name (``difflib``), in one line."""
    from .settings import GuardSettings
    from ..names import SETTING_ALIASES

    known = set(GuardSettings.names()) | set(arguments)
    for table in SETTING_ALIASES.values():
        known |= set(table)
    for name in settings:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}=?" if close else \
            f"; the settings are {', '.join(GuardSettings.names())}"
        raise TypeError(f"{where}: unknown setting {name}={hint}")
