"""The guard's settings, validated once and shared by every entry point.

``StabilityTrainer``, ``TorchGuard`` and ``keras_guard`` take the same flat keyword
arguments; each builds one :class:`GuardSettings`, so a bad value gets the same
clear error wherever it is given, before anything runs. Internally the settings
fall into groups (:data:`GROUPS`, :meth:`GuardSettings.group`): ``clip``,
``backoff``, ``rollback``, ``spike``, ``alarm`` and ``run`` (the rest). What each
entry point refuses, and why, is one table: :mod:`stabilize.guard.entries`; a
wrong keyword gets the closest valid name there too.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, fields

from ..validate import check_count, check_positive_finite

__all__ = ["POLICIES", "SPIKE_ACTIONS", "ALARMS", "REPLAYS", "GROUPS", "GuardSettings"]

POLICIES = ("raise", "skip", "backoff", "rollback", "ignore", "auto")
SPIKE_ACTIONS = (None, "clip", "skip", "rewind")
ALARMS = ("warn", "raise", "off")
REPLAYS = ("on", "off")
SNAPSHOT_PLACES = ("device", "host", "disk")

# The settings by what they are about; every field is in exactly one group (checked below the class).
GROUPS = {
    "clip": ("clip_norm", "clip_value"),
    "backoff": ("on_nonfinite", "backoff_factor", "min_lr", "grow_after", "min_loss_scale"),
    "rollback": ("max_bad_steps", "max_rollbacks", "snapshot_every", "snapshot_to", "snapshot_path", "replay"),
    "spike": ("spike", "spike_z", "spike_warmup", "spike_alpha", "spike_skip_batches", "spike_lr_factor",
              "spike_lr_steps"),
    "alarm": ("skip_alarm", "skip_alarm_fraction", "skip_alarm_window"),
    "run": ("max_update_ratio", "distributed", "events_path"),
}


def _number(name, value, *, allow_none=False, low=0.0, low_open=True, high=math.inf, high_open=False, finite=True):
    """Check that ``value`` is a real number in the interval; say what to pass if not."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " or None" if allow_none else ""
        raise TypeError(f"{name} must be a number{hint}, got {type(value).__name__} {value!r}")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if math.isnan(value) or (finite and math.isinf(value)) or not (lo_ok and hi_ok):
        lo, hi = ("(" if low_open else "["), (")" if high_open or math.isinf(high) else "]")
        shown = f"{lo}{low:g}, {high:g}{hi}"
        raise ValueError(f"{name} must lie in {shown}{' and be finite' if finite else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class GuardSettings:
    """What a guarded step checks and what the policy does about a bad one.

    Attributes:
        clip_norm: clip the gradients to this global L2 norm (``clip_grads``); None: no clipping.
        clip_value: clamp each gradient element to ``[-v, v]`` first; None: no clamping.
        on_nonfinite: ``"skip"`` (default), ``"backoff"``, ``"rollback"``, ``"raise"``,
            ``"auto"`` (the reaction follows the cause: see :mod:`~stabilize.guard.policies`)
            or ``"ignore"`` (unguarded: every update is applied, to reproduce a failure).
        backoff_factor: the rate is multiplied by this at each back-off, in (0, 1).
        min_lr: the back-off never takes the rate below this.
        grow_after: after this many clean steps in a row, undo one back-off
            (None: never), so intermittent bad batches do not stall a run.
        max_bad_steps: rollback after this many bad steps in a row.
        max_rollbacks: raise after this many rollbacks.
        snapshot_every: applied steps between rollback snapshots (rollback only).
        snapshot_to: where the rollback snapshot is held: ``"device"`` (default), ``"host"``
            or ``"disk"`` (a durable file at ``snapshot_path``); see :mod:`~stabilize.guard.snapshots`.
            A snapshot exists only under ``on_nonfinite="rollback"`` or ``spike="rewind"``.
        snapshot_path: the file a ``"disk"`` snapshot is written to (atomically).
        max_update_ratio: also treat a step whose applied update ``‖Δw‖/‖w‖``
            exceeds this as bad (None: not measured).
        min_loss_scale: a loss scaler whose scale falls below this is no longer
            handling an overflow: its skips go to the policy.
        distributed: ``"auto"``: with several torch.distributed ranks, every
            decision is taken from flags and norms reduced across the ranks
            (:mod:`stabilize.distributed`); ``"off"``: each rank decides alone
            (independent replicas only: DDP replicas would drift apart).
        spike: what to do about a finite loss or gradient-norm spike
            (:mod:`~stabilize.guard.spikes`): None (not watched), ``"clip"``
            (ZClip: clip the norm to ``mean + spike_z * std``), ``"skip"`` or
            ``"rewind"`` (PaLM: restore the last rollback snapshot, taken every
            ``snapshot_every`` applied steps, then leave out the next
            ``spike_skip_batches`` batches, each recorded as an event).
        spike_skip_batches: the batches a rewind leaves out.
        spike_lr_factor: after a rewind, the rate is multiplied by this, in (0, 1]
            (PaLM lowers the rate for a while after a rewind; 1.0: unchanged) ...
        spike_lr_steps: ... for this many applied steps, then the schedule's own rate returns.
        replay: ``"on"`` (default) or ``"off"``: before a rewind or a rollback restores the
            snapshot, the trainer replays the failing step once from the same pre-step
            state, batch and RNG, without applying it (:mod:`~stabilize.guard.replay`):
            the event says whether the fault was ``"transient"`` or ``"reproducible"``.
            It costs one step and one copy of the state, only on those rare steps.
        events_path: a JSON-lines file every event is appended to
            (:mod:`stabilize.eventlog`); a trainer without one starts one
            beside its first checkpoint.
        spike_z: the z-score above which a value is a spike.
        spike_warmup: accepted steps before anything is flagged.
        spike_alpha: the weight of a new value in the running mean and variance.
        skip_alarm: ``"warn"``, ``"raise"`` or ``"off"``: what happens when more
            than ``skip_alarm_fraction`` of the last ``skip_alarm_window`` steps
            were not applied (a run that silently skips is not training).
    """

    clip_norm: float | None = None
    clip_value: float | None = None
    on_nonfinite: str = "skip"
    backoff_factor: float = 0.5
    min_lr: float = 0.0
    grow_after: int | None = 100
    max_bad_steps: int = 3
    max_rollbacks: int = 3
    snapshot_every: int = 50
    snapshot_to: str = "device"
    snapshot_path: str | None = None
    max_update_ratio: float | None = None
    min_loss_scale: float = 1.0
    distributed: str = "auto"
    spike: str | None = None
    spike_z: float = 6.0
    spike_warmup: int = 20
    spike_alpha: float = 0.02
    spike_skip_batches: int = 10
    spike_lr_factor: float = 1.0
    spike_lr_steps: int = 0
    replay: str = "on"
    events_path: str | None = None
    skip_alarm: str = "warn"
    skip_alarm_fraction: float = 0.5
    skip_alarm_window: int = 50

    def __post_init__(self):
        if not isinstance(self.on_nonfinite, str) or self.on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {self.on_nonfinite!r}")
        if self.distributed not in ("auto", "off"):
            raise ValueError(f"distributed must be 'auto' or 'off', got {self.distributed!r}")
        if self.spike not in SPIKE_ACTIONS:
            raise ValueError(f"spike must be one of {SPIKE_ACTIONS}, got {self.spike!r}")
        if self.snapshot_to not in SNAPSHOT_PLACES:
            raise ValueError(f"snapshot_to must be one of {SNAPSHOT_PLACES}, got {self.snapshot_to!r}")
        if (self.snapshot_to == "disk") != (self.snapshot_path is not None):
            raise ValueError("snapshot_to='disk' needs snapshot_path=<file> (where the snapshot is written), and "
                             "snapshot_path is used only with snapshot_to='disk'"
                             f"; got snapshot_to={self.snapshot_to!r}, snapshot_path={self.snapshot_path!r}")
        if self.snapshot_path is not None and not isinstance(self.snapshot_path, (str, os.PathLike)):
            raise TypeError(f"snapshot_path must be a path, got {type(self.snapshot_path).__name__}")
        if self.snapshot_path is not None:
            object.__setattr__(self, "snapshot_path", os.fspath(self.snapshot_path))
        if self.snapshot_to != "device" and not (self.on_nonfinite == "rollback" or self.spike == "rewind"):
            raise ValueError(f"snapshot_to={self.snapshot_to!r} has no effect: a snapshot is kept only under "
                             "on_nonfinite='rollback' or spike='rewind'")
        if self.replay not in REPLAYS:
            raise ValueError(f"replay must be one of {REPLAYS}, got {self.replay!r}")
        if self.skip_alarm not in ALARMS:
            raise ValueError(f"skip_alarm must be one of {ALARMS}, got {self.skip_alarm!r}")
        optional = lambda check, name, *args: None if getattr(self, name) is None else check(name, getattr(self, name), *args)  # noqa: E731
        checked = {
            "clip_norm": optional(check_positive_finite, "clip_norm"),
            "clip_value": optional(check_positive_finite, "clip_value"),
            "backoff_factor": _number("backoff_factor", self.backoff_factor, high=1.0, high_open=True),
            "min_lr": _number("min_lr", self.min_lr, low_open=False),
            "grow_after": optional(check_count, "grow_after", 1),
            "max_bad_steps": check_count("max_bad_steps", self.max_bad_steps, 1),
            "max_rollbacks": check_count("max_rollbacks", self.max_rollbacks, 0),
            "snapshot_every": check_count("snapshot_every", self.snapshot_every, 1),
            "max_update_ratio": optional(check_positive_finite, "max_update_ratio", "0.5"),
            "min_loss_scale": check_positive_finite("min_loss_scale", self.min_loss_scale),
            "spike_z": check_positive_finite("spike_z", self.spike_z, "6.0"),
            "spike_warmup": check_count("spike_warmup", self.spike_warmup, 2),
            "spike_alpha": _number("spike_alpha", self.spike_alpha, high=1.0),
            "spike_skip_batches": check_count("spike_skip_batches", self.spike_skip_batches, 0),
            "spike_lr_factor": _number("spike_lr_factor", self.spike_lr_factor, high=1.0),
            "spike_lr_steps": check_count("spike_lr_steps", self.spike_lr_steps, 0),
            "skip_alarm_fraction": _number("skip_alarm_fraction", self.skip_alarm_fraction, high=1.0),
            "skip_alarm_window": check_count("skip_alarm_window", self.skip_alarm_window, 1),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.spike_lr_steps and self.spike != "rewind":
            raise ValueError(f"spike_lr_steps={self.spike_lr_steps} lowers the rate after a spike rewind, but spike="
                             f"{self.spike!r}: pass spike='rewind' or leave spike_lr_steps=0")
        if self.spike_lr_factor != 1.0 and not self.spike_lr_steps:
            raise ValueError(f"spike_lr_factor={self.spike_lr_factor} is applied for spike_lr_steps applied steps "
                             f"after a rewind, and spike_lr_steps is 0: pass e.g. spike_lr_steps=100")

    @property
    def guarded(self) -> bool:
        """Whether a bad update is held back (every policy but ``ignore``)."""
        return self.on_nonfinite != "ignore"

    @property
    def clips(self) -> bool:
        return self.clip_norm is not None or self.clip_value is not None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def group(self, name: str) -> dict:
        """The settings of one group (:data:`GROUPS`), e.g. ``settings.group("clip")`` ->
        ``{"clip_norm": 1.0, "clip_value": None}``."""
        if name not in GROUPS:
            raise ValueError(f"unknown settings group {name!r}; one of {tuple(GROUPS)}")
        return {k: getattr(self, k) for k in GROUPS[name]}


assert sorted(n for g in GROUPS.values() for n in g) == sorted(GuardSettings.names()), "every setting in one group"


def _named_init(init):
    """GuardSettings' own one-line error for a wrong keyword, with the closest valid name."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if any(k not in _NAMES for k in kwargs):
            from .entries import check_keywords

            check_keywords("GuardSettings", kwargs)
        init(self, *args, **kwargs)

    return __init__


_NAMES = frozenset(GuardSettings.names())
GuardSettings.__init__ = _named_init(GuardSettings.__init__)
