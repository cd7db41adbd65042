"""The guarded training step, written once for every backend.

One step: forward, gradients, ``clip_grads``, the optimizer's candidate update,
then the checks: the loss, the gradient norm and every candidate weight must be
finite (and, when asked, the update must not be huge next to the weights). The
candidate is committed with ``where(ok, new, old)`` on the device, for the
parameters and the optimizer state alike, so a bad step changes nothing and a
NaN update is never applied, without a Python branch on a device value. The
step returns one small tensor of statistics; reading it is the step's only
device-to-host sync (TensorFlow runs the whole step inside ``tf.function``).
"""

from __future__ import annotations

from typing import Any, Callable

from .guard.stats import check_names
from .ops import _leaves, _rebuild, clip_grads, global_norm

__all__ = ["NAMES", "make_step", "flatten_state", "unflatten_state", "update_ratio"]


# The order of the step's one vector: StepStats fields by name (the host reads it with stats.from_values).
NAMES = check_names(("loss", "grad_norm", "loss_finite", "grads_finite", "weights_finite", "update_ratio",
                     "large_update", "committed", "spike"))


def update_ratio(B, new, old):
    """``‖new - old‖ / (‖old‖ + 1e-12)``: the size of the update actually applied, next to
    the weights, on the device. The one formula of ``max_update_ratio`` everywhere."""
    delta = global_norm([n - o for n, o in zip(new, old)], backend=B)
    return delta / (global_norm(old, backend=B) + 1e-12)


def flatten_state(state) -> tuple[list[tuple], list[Any]]:
    pairs = list(_leaves(state))
    return [p for p, _ in pairs], [v for _, v in pairs]


def unflatten_state(template, paths, values):
    return _rebuild(template, dict(zip(paths, values)))


def make_step(
    B,
    forward: Callable[[Any], Any],
    loss_fn: Callable[[Any, Any], Any],
    params: list,
    optimizer,
    state_template,
    state_vars: list,
    *,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    max_update_ratio: float | None = None,
    guard: bool = True,
    spike: str | None = None,
):
    """Build ``step(x, y, lr, loss_max, norm_max) -> stats`` (a vector in :data:`NAMES` order) for one backend.

    ``guard=False`` commits every update whatever it holds: the plain loop
    whose failure the scenarios reproduce. ``loss_max`` and ``norm_max`` are
    the spike detector's limits (backend scalars, ``inf`` while not watched or
    warming up): a finite loss or gradient norm above them is a spike, decided
    here on the device. ``spike="skip"`` (and ``"rewind"``) holds the update back; ``"clip"``
    scales the gradients down to ``norm_max`` (ZClip) before the update.
    """
    paths, _ = flatten_state(state_template)

    def step(x, y, lr, loss_max, norm_max):
        loss, grads = B.value_and_grad(lambda: loss_fn(forward(x), y), params)
        with B.no_grad():
            grads = [B.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if clip_norm is None and clip_value is None:
                norm = global_norm(grads, backend=B)
            else:
                grads, norm = clip_grads(grads, max_norm=clip_norm, max_value=clip_value, backend=B)
            # ``norm`` is the pre-clip norm: the spike verdict compares it, as torch's step does.
            # The limits are float64 variables, compared in float64 as the torch and Keras steps do (rounded
            # to the parameters' dtype, a limit just below a float32 loss would read as equal to it).
            is_spike = B.isfinite(loss) & B.isfinite(norm) & \
                ((B.cast(loss, "float64") > loss_max) | (B.cast(norm, "float64") > norm_max))
            if spike == "clip":  # ZClip: the norm after any clip_norm/clip_value, scaled down to norm_max
                current = norm if clip_norm is None and clip_value is None else global_norm(grads, backend=B)
                over = is_spike & (B.cast(current, "float64") > norm_max)
                limit = B.cast(norm_max, B.dtype(current))
                coef = B.where(over, limit / (current + 1e-6), B.full_like(current, 1.0))
                grads = [g * coef for g in grads]
            state = unflatten_state(state_template, paths, state_vars)
            new_params, new_state = optimizer.update(B, params, grads, state, lr)
            loss_ok = B.isfinite(loss)
            grads_ok = B.isfinite(norm)
            weights_ok = B.all_finite(new_params)
            ok = loss_ok & grads_ok & weights_ok
            if spike in ("skip", "rewind"):  # a rewind holds the spiking update back, then restores
                ok = ok & ~is_spike
            if max_update_ratio is not None:  # the update actually applied: after clipping
                ratio = update_ratio(B, new_params, params)
                small = ratio <= max_update_ratio
                ok = ok & small
                large = ~small
            else:
                ratio = large = B.full_like(norm, float("nan"))  # not measured
            commit = ok if guard else B.full_like(ok, True)
            for p, n in zip(params, new_params):
                B.assign(p, B.where(commit, n, p))
            _, new_values = flatten_state(new_state)
            for var, n in zip(state_vars, new_values):
                B.assign(var, B.where(commit, n, var))
            return B.stack([loss, norm, loss_ok, grads_ok, weights_ok, ratio, large, commit, is_spike], "float64")

    return B.compile(step)
