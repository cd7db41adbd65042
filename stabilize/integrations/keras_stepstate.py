"""The guarded Keras step's device-side bookkeeping: the statistics row, the policy's inputs, shadow copies.

:class:`StepState` holds what the compiled step reads and writes besides the
model and the optimizer: ``lr_factor`` (the back-off the policy chose, a
variable read inside the step, so a new value never retraces it), the spike
detector's ``limits`` (``loss_max, norm_max``, likewise a variable), the row of
statistics the step writes (:data:`ROW`: the policy's fields, the spike flag,
then the user's rate the step read) and the flags of the step that ran. The
host writes ``lr_factor`` and ``limits`` (:meth:`StepState.set_factor`,
:meth:`StepState.set_limits`) only when the policy changes them, and reads the whole row with one transfer: a good step costs no
eager op besides running the step and that read.

:class:`Protected` keeps shadow copies of what the forward pass may change
before the step is judged (BatchNorm statistics, seed states, metrics).

Example::

    state = StepState()
    state.set_factor(0.5)          # one assign; a second set_factor(0.5) costs nothing
    row = state.read()             # {"loss": ..., "committed": ..., "base_lr": ...}
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ..guard.stats import check_names

__all__ = ["ROW", "Protected", "StepState", "all_finite", "copy_values"]

# The order of the vector the compiled step writes: :class:`~stabilize.guard.stats.StepStats` fields by
# name (NaN where not measured), then ``base_lr``, the user's rate as this step read it (a schedule at the
# pre-step ``iterations``, before any back-off). The host takes the rate from here instead of an eager read
# of the optimizer per step.
MEASURED = check_names(("loss", "grad_norm", "loss_finite", "grads_finite", "weights_finite", "buffers_finite",
                        "update_ratio", "large_update", "scaler_skip", "committed", "spike"))
ROW = MEASURED + ("base_lr",)
_F = {name: i for i, name in enumerate(ROW)}


def _is_sparse(g) -> bool:
    return hasattr(g, "indices") and hasattr(g, "dense_shape")  # tf.IndexedSlices (Embedding gradients)


def all_finite(values):
    """Whether every element of every tensor is finite (sparse gradients: their values)."""
    flags = [ops.all(ops.isfinite(g.values if _is_sparse(g) else g)) for g in values if g is not None]
    return ops.all(ops.stack(flags)) if flags else ops.convert_to_tensor(True)


def copy_values(variables) -> list[np.ndarray]:
    """Host copies of the variables' values that never share storage with them."""
    return [np.array(ops.convert_to_numpy(v), copy=True) for v in variables]


def _initial(v):
    """A copy of ``v``'s value. A variable Keras makes while the step is first traced (the compiled
    metrics) cannot be read yet: zeros, a metric's reset state, synced after the first kept step."""
    try:
        value = np.asarray(ops.convert_to_numpy(v))
    except (ValueError, TypeError):
        value = None
    if value is not None and value.shape == tuple(v.shape):
        return np.array(value, copy=True)
    return "zeros"


class Protected:
    """Variables a forward pass may change before the step is judged, with their shadow copies.

    The shadows hold the values after the last committed step. They are plain
    variables owned here (not tracked by a model or an optimizer: not saved).
    """

    def __init__(self, variables):
        self.variables = list(variables)
        self.shadows = [keras.Variable(_initial(v), shape=v.shape, dtype=v.dtype, trainable=False, autocast=False,
                                       name="stabilize_shadow") for v in self.variables]

    def keep_or_restore(self, keep):
        """In the compiled step: sync the shadows when ``keep``, else put them back (a select, never ``x*ok``)."""
        if not self.variables:
            return

        def sync():
            for v, s in zip(self.variables, self.shadows):
                s.assign(v)

        def restore():
            for v, s in zip(self.variables, self.shadows):
                v.assign(s)

        ops.cond(keep, sync, restore)

    def sync_now(self):
        """Host side: the shadows take the live values (epoch begin, after a rollback)."""
        for v, s in zip(self.variables, self.shadows):
            s.assign(v)


class StepState:
    """The guard's device-side bookkeeping: ``lr_factor``, the last step's ``stats`` (:data:`ROW`), whether apply ran."""

    def __init__(self):
        self.lr_factor = keras.Variable(1.0, dtype="float32", trainable=False, autocast=False, name="stabilize_lr_factor")
        self.stats = keras.Variable(np.zeros(len(ROW)), dtype="float64", trainable=False, autocast=False,
                                    name="stabilize_stats")
        self.called = keras.Variable(0, dtype="int32", trainable=False, autocast=False, name="stabilize_called")
        # Whether the step writes ``called`` (:meth:`finish` reads it only for a loss scaler wrapped around
        # the guard, which may skip ``apply``): two assigns a step that nothing else reads.
        self.tracks_apply = False
        self.data_ok = keras.Variable(1, dtype="int32", trainable=False, autocast=False, name="stabilize_data_ok")
        self.data_ok_local = None
        # ``spike_lr_factor`` while a rewind lowers the rate (the Supervisor's ``Rate.after``), else 1
        self.lr_after = keras.Variable(1.0, dtype="float32", trainable=False, autocast=False, name="stabilize_lr_after")
        self._factor = (1.0, 1.0)  # what the host last wrote to ``lr_factor`` and ``lr_after``
        # ``(loss_max, norm_max)`` of the spike detector, float64 as the host computes them; inf: no limit
        self.limits = keras.Variable(np.full(2, np.inf), dtype="float64", trainable=False, autocast=False,
                                     name="stabilize_spike_limits")
        self._limits = (np.inf, np.inf)  # what the host last wrote to ``limits``

    def set_factor(self, factor: float, after: float = 1.0) -> None:
        """Host side: the back-off factor the next steps multiply onto the user's rate (floored at
        ``min_lr``), then ``after`` (the spike lowering): the Supervisor's whole ``Rate``, applied on
        the device with its formula; each assigned only when it changes."""
        factor, after = float(factor), float(after)
        if factor != self._factor[0]:
            self.lr_factor.assign(factor)
        if after != self._factor[1]:
            self.lr_after.assign(after)
        self._factor = (factor, after)

    def set_rate(self, rate) -> None:
        """Host side: the Supervisor's :class:`~stabilize.guard.supervisor.Rate` for the next steps."""
        self.set_factor(rate.factor, rate.after)

    def set_limits(self, limits: tuple[float, float] | None) -> None:
        """Host side: the spike limits the next steps compare with (None: not watched); assigned
        only when they change (after each accepted step while spikes are watched, never otherwise)."""
        limits = (np.inf, np.inf) if limits is None else (float(limits[0]), float(limits[1]))
        if limits != self._limits:
            self.limits.assign(np.asarray(limits, dtype=np.float64))
            self._limits = limits

    def limits_now(self) -> dict:
        """Host side: the limits the last step compared with, for its row (``loss_max``, ``norm_max``)."""
        return {"loss_max": self._limits[0], "norm_max": self._limits[1]}

    def read(self) -> dict:
        """Host side: the last step's row (:data:`ROW`) as floats, in one transfer."""
        return dict(zip(ROW, ops.convert_to_numpy(self.stats).tolist()))

    def begin(self, data=None):
        """Start of the compiled step; with ``data``, note whether its float tensors are finite
        (policy ``auto`` skips a bad batch without backing off)."""
        if self.tracks_apply:
            self.called.assign(0)
        if data is not None:
            leaves = [t for t in keras.tree.flatten(data) if t is not None and "float" in str(getattr(t, "dtype", ""))]
            self.data_ok_local = ops.cast(all_finite(leaves), "int32")  # this replica's; apply reduces it
            self.data_ok.assign(self.data_ok_local)

    def write(self, **values):
        """In the compiled step: the row, every field of :data:`ROW` named."""
        row = [ops.cast(values[name], "float64") for name in ROW]
        self.stats.assign(ops.stack(row))
        if self.tracks_apply:
            self.called.assign(1)

    def finish(self, protected: Protected | None, outer: Protected | None = None, loss=None, scale=None,
               min_loss_scale: float = 1.0, base_lr=None):
        """End of the compiled step: keep what the forward pass changed, or put it back.

        Kept after a committed step and after a loss scaler's own overflow skip
        (as without the guard: the forward pass was finite); put back otherwise.

        ``outer`` protects the variables of a ``LossScaleOptimizer`` wrapped
        *around* the guard (``scale`` is its ``dynamic_scale``). It calls the
        guard's ``apply`` only when the scaled gradients are finite, so a step
        where ``apply`` did not run is its overflow skip: a scaler event while
        the loss is finite and the new scale is at least ``min_loss_scale``,
        else a failure for the policy (and the scaler's state is put back). ``base_lr`` is the user's
        rate for the row of a step where ``apply`` did not run.
        """
        committed = ops.equal(self.stats[_F["committed"]], 1.0)
        scaler_skip = ops.equal(self.stats[_F["scaler_skip"]], 1.0)
        if outer is not None:
            if not self.tracks_apply:
                raise RuntimeError("StepState.finish with an outer loss scaler needs tracks_apply=True before tracing")
            ran = ops.equal(self.called, 1)
            loss_ok = ops.convert_to_tensor(True) if loss is None else ops.all(ops.isfinite(loss))
            overflow = loss_ok & (ops.cast(scale, "float32") >= min_loss_scale)
            shown = float("nan") if loss is None else ops.cast(loss, "float32")
            values = dict(loss=shown, grad_norm=float("nan"), loss_finite=loss_ok, grads_finite=False,
                          weights_finite=True, buffers_finite=True, update_ratio=float("nan"),
                          large_update=float("nan"), scaler_skip=overflow,
                          committed=False, spike=False, base_lr=self.stats[_F["base_lr"]] if base_lr is None else base_lr)
            fallback = ops.stack([ops.cast(values[name], "float64") for name in ROW])
            self.stats.assign(ops.where(ran, self.stats, fallback))
            committed = ran & committed
            scaler_skip = ops.where(ran, scaler_skip, overflow)
        # A scaler's own overflow skip keeps what the forward pass did, as the unguarded loop does.
        keep = committed | scaler_skip
        if outer is not None:
            outer.keep_or_restore(keep)
        if protected is not None:
            protected.keep_or_restore(keep)
