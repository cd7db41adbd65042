"""One step's statistics as one named record, and the one verdict on what the step was.

Every entry point (the trainer's three updaters, ``TorchGuard`` in both modes,
``keras_guard``) reports a step as a :class:`StepStats`: every field named,
``NaN`` where the entry point does not measure it (a flag that was not measured
is neither good nor bad). A device that hands its numbers over as one vector
names their order with a tuple of field names (:func:`from_values`), checked
against the schema when the module is imported: no positional layout is
written twice.

:func:`verdict` is the one place that says what a step was: ``"committed"``
(clean and applied), ``"scaler-skip"`` (a loss scaler's own overflow),
``"nonfinite"``, ``"spike"`` or ``"large-update"``. ``committed`` itself is
the device's decision, read and never re-derived; the verdict names *why* a
step was held back (or, under ``on_nonfinite="ignore"``, what an applied step
was). :func:`scaler_overflow` is the one rule for a scaler's own skip: a finite
loss and non-finite gradients while the scale is still at least
``min_loss_scale``; a finite spike is never one (the Keras step forms the same
expression on the device).

Example:
    >>> nan = float("nan")
    >>> verdict(StepStats(loss=1.0, grad_norm=2.0, committed=1.0))
    'committed'
    >>> verdict(StepStats(loss=9.0, grad_norm=40.0, spike=1.0, committed=0.0))
    'spike'
    >>> verdict(StepStats(loss=nan, loss_finite=0.0, committed=0.0))
    'nonfinite'
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

__all__ = ["StepStats", "FIELDS", "VERDICTS", "verdict", "nonfinite_parts", "scaler_overflow", "from_values",
           "row", "check_names", "flag"]

_NAN = float("nan")

VERDICTS = ("committed", "scaler-skip", "nonfinite", "spike", "large-update")

# The parts whose finiteness a step checks, with the flag that reports each.
_PARTS = (("loss", "loss_finite"), ("gradients", "grads_finite"), ("weights", "weights_finite"),
          ("buffers", "buffers_finite"))


class StepStats(NamedTuple):
    """One step, as read from the device (floats; flags are 1.0 / 0.0; NaN: not measured).

    Attributes:
        loss, grad_norm: the step's loss and global gradient norm (before any clipping).
        loss_finite, grads_finite, weights_finite, buffers_finite: the finite checks.
        update_ratio: ``‖Δw‖/‖w‖`` of the applied update (only with ``max_update_ratio`` or
            ``verify_updates``); large_update: it exceeded ``max_update_ratio``.
        spike: a finite loss or norm above the spike detector's limits.
        scaler_skip: a loss scaler's own overflow skip (:func:`scaler_overflow`).
        committed: the device's decision: the update was applied.
        lr: the rate the update used; loss_scale: the scaler's scale at the step.
        loss_max, norm_max: the spike limits the step was compared with.
        data_finite: every float tensor of the batch was finite (read only for a failed step).
        weights_broken: an earlier update left non-finite weights (found by the host's probe).
    """

    loss: float = _NAN
    grad_norm: float = _NAN
    loss_finite: float = _NAN
    grads_finite: float = _NAN
    weights_finite: float = _NAN
    buffers_finite: float = _NAN
    update_ratio: float = _NAN
    large_update: float = _NAN
    spike: float = _NAN
    scaler_skip: float = _NAN
    committed: float = _NAN
    lr: float = _NAN
    loss_scale: float = _NAN
    loss_max: float = _NAN
    norm_max: float = _NAN
    data_finite: float = _NAN
    weights_broken: float = _NAN


FIELDS = StepStats._fields


def flag(value) -> bool:
    """Whether a flag was measured and set (``1.0``); NaN (not measured) and 0.0 are not."""
    return value == 1.0


def _failed(value) -> bool:
    """Whether a finite check was measured and failed (``0.0``); NaN is not a failure."""
    return value == 0.0


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, every one a :class:`StepStats` field (a typo fails at import, not at step 10 000)."""
    names = tuple(names)
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise ValueError(f"not StepStats fields: {unknown}; the fields are {FIELDS}")
    return names


def from_values(names: tuple[str, ...], values: Iterable[float], **more) -> dict:
    """A device's vector read back by the names of its order, plus ``more``: a :func:`row`."""
    return row(dict(zip(names, (float(v) for v in values)), **more))


def row(stats: Mapping | StepStats) -> dict:
    """The statistics as a plain dict holding every field (NaN where not measured); the
    ``step``/``epoch``/``batch`` labels a supervisor adds are kept. ``committed`` must be given."""
    if isinstance(stats, StepStats):
        stats = stats._asdict()
    unknown = [k for k in stats if k not in FIELDS and k not in ("step", "epoch", "batch", "bad_data")]
    if unknown:
        raise ValueError(f"not StepStats fields: {unknown}")
    if "committed" not in stats or not (stats["committed"] == 0.0 or stats["committed"] == 1.0):
        raise ValueError(f"a step's statistics must say whether it was committed (1.0 or 0.0), got {dict(stats)}")
    out = dict(StepStats()._asdict())
    out.update(stats)
    return out


def nonfinite_parts(stats: Mapping) -> tuple[str, ...]:
    """The parts found non-finite (``loss``, ``gradients``, ``weights``, ``buffers``); weights an
    earlier update broke count as ``weights``."""
    broken = flag(stats.get("weights_broken", _NAN))
    return tuple(name for name, key in _PARTS
                 if _failed(stats.get(key, _NAN)) or (name == "weights" and broken))


def scaler_overflow(loss_finite: bool, grads_finite: bool, buffers_finite: bool, scale: float,
                    min_loss_scale: float) -> bool:
    """A loss scaler's own overflow skip: the loss and buffers finite, the gradients not, and the
    scale not yet below ``min_loss_scale`` (below it the scaler no longer handles the overflow).
    A finite spike (finite gradients) is never one."""
    return bool(loss_finite and buffers_finite and not grads_finite and not (scale < min_loss_scale))


def verdict(stats: Mapping | StepStats) -> str:
    """What the step was, one of :data:`VERDICTS`, from its named statistics.

    ``"scaler-skip"`` when the step was not committed and the scaler skipped on its own; else
    ``"nonfinite"`` when a finite check failed (or the weights were found broken); else
    ``"spike"``; else ``"large-update"``; else ``"committed"``. A step not committed with no
    reason measured is ``"nonfinite"`` (the device held it back: something was not finite).
    """
    if isinstance(stats, StepStats):
        stats = stats._asdict()
    committed = flag(stats.get("committed", _NAN))
    if not committed and flag(stats.get("scaler_skip", _NAN)):
        return "scaler-skip"
    if nonfinite_parts(stats):
        return "nonfinite"
    if flag(stats.get("spike", _NAN)):
        return "spike"
    if flag(stats.get("large_update", _NAN)):
        return "large-update"
    return "committed" if committed else "nonfinite"

