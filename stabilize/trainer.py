"""``StabilityTrainer``: a training loop whose every step is guarded.

Each step is checked on the device (loss, gradient norm, candidate weights)
and committed only if it is good; see :mod:`stabilize.step`. The policy
(:mod:`stabilize.policies`) decides what follows a bad step. The trainer takes
a backend-neutral :class:`~stabilize.models.MLP` spec (built natively on the
resolved backend), a ``torch.nn.Module`` or a ``keras.Model``; a neutral
optimizer spec (:mod:`stabilize.optim`, the same math on every backend), a
native ``torch.optim`` optimizer, or a keras optimizer.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, Callable

import numpy as np

from . import ops
from .errors import NonFiniteError
from .history import Event, History
from .models import MLP
from .optim import OptimizerSpec
from .policies import Policy, PolicyConfig, verdict
from .registry import get_backend
from .step import STAT_FIELDS, flatten_state, make_step

__all__ = ["StabilityTrainer"]

logger = logging.getLogger("stabilize")

_LOSSES = {"mse": ops.safe_mse, "cross_entropy": ops.safe_cross_entropy}


def _framework_of(model) -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return "tensorflow"
    return None


def native_torch_check(B, loss, params, clip_norm, clip_value, extra=()):
    """The guard's fast path for a native torch optimizer, after ``loss.backward()``.

    Computes the gradient norm (torch's formula), reads it with the loss and the
    finite flags in the step's one device-to-host sync, then clips in place only
    if the norm is finite and above ``clip_norm``, with the coefficient
    ``min(max_norm/(norm+1e-6), 1)`` computed in float32 as torch does. Below the
    bound nothing is multiplied. Weights are not scanned here: a non-finite
    weight makes the next loss non-finite, and is looked for then.

    Returns the statistics as a dict (plus ``extra`` tensors, read in the same sync).
    """
    import torch

    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        norm = ops.global_norm(grads, backend=B) if grads else torch.zeros((), device=params[0].device)
        if clip_value is not None:
            torch._foreach_clamp_min_(grads, -clip_value)  # clamping keeps NaN
            torch._foreach_clamp_max_(grads, clip_value)
            current = ops.global_norm(grads, backend=B)
        else:
            current = norm
        loss = loss.detach()
        values = B.read(B.stack([loss, norm, torch.isfinite(loss), torch.isfinite(norm), current, *extra], "float64"))
        stats = dict(zip(("loss", "grad_norm", "loss_finite", "grads_finite", "_current"), values[:5]))
        stats["weights_finite"] = 1.0
        stats["extra"] = values[5:]
        current = values[4]
        if clip_norm is not None and grads and math.isfinite(current):
            coef = float(np.float32(clip_norm) / (np.float32(current) + np.float32(1e-6)))
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        return stats


def weights_finite(B, params) -> bool:
    """Whether every parameter is finite (one host read)."""
    return bool(B.read(B.stack([B.all_finite(params)], "float64"))[0])


class StabilityTrainer:
    """Train with every step checked, and bad steps skipped, backed off or rolled back.

    Args:
        model: an :class:`~stabilize.models.MLP` spec, a ``torch.nn.Module`` or a ``keras.Model``.
        loss: ``"mse"`` (:func:`stabilize.safe_mse`), ``"cross_entropy"``
            (:func:`stabilize.safe_cross_entropy`) or ``loss(pred, target) -> scalar``.
        optimizer: :class:`stabilize.optim.SGD` / :class:`~stabilize.optim.Adam`, or a
            ``torch.optim.Optimizer`` over the model's parameters.
        backend: for an MLP spec, where to build it (default: the configured backend).
        dtype: for an MLP spec, ``float32`` (default) or ``float64``, ...
        device: torch device for an MLP spec (default: CUDA when available).
        clip_norm, clip_value: gradient clipping, as :func:`stabilize.clip_grads`.
        on_nonfinite: ``"skip"`` (default), ``"backoff"``, ``"rollback"``,
            ``"raise"``, or ``"ignore"`` (unguarded, to reproduce a failure).
        backoff_factor, min_lr, grow_after: the back-off schedule (see
            :mod:`stabilize.policies`).
        max_bad_steps, max_rollbacks: the rollback policy's M and R.
        snapshot_every: committed steps between in-memory snapshots (rollback).
        max_update_ratio: also treat a step whose ``‖Δw‖/‖w‖`` exceeds this
            as bad: the precursor of a learning rate that is too high.
        schedule: ``schedule(applied_steps) -> factor`` on the learning rate;
            it advances only on applied steps.
        progress: show a tqdm bar (default: only on a terminal).
        diagnose: on the first non-finite step of a ``fit``, replay it with
            per-layer checks and attach a :class:`~stabilize.diagnose.Diagnosis`
            to the history (costs nothing until a step fails).

    Example:
        >>> import numpy as np
        >>> from stabilize import StabilityTrainer
        >>> from stabilize.models import MLP
        >>> from stabilize.optim import SGD
        >>> X = np.random.default_rng(0).normal(size=(64, 2)); y = X.sum(1, keepdims=True)
        >>> t = StabilityTrainer(MLP((2, 8, 1)), "mse", SGD(lr=0.05), backend="torch", dtype="float64")
        >>> h = t.fit(X, y, epochs=5, batch_size=16)
        >>> h.first_nonfinite_step is None and h.losses[-1] < h.losses[0]
        True
    """

    def __init__(
        self,
        model,
        loss: str | Callable = "mse",
        optimizer=None,
        *,
        backend: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        on_nonfinite: str = "skip",
        backoff_factor: float = 0.5,
        min_lr: float = 0.0,
        grow_after: int | None = None,
        max_bad_steps: int = 3,
        max_rollbacks: int = 3,
        snapshot_every: int = 50,
        max_update_ratio: float | None = None,
        schedule: Callable[[int], float] | None = None,
        progress: bool | None = None,
        diagnose: bool = True,
    ):
        self.policy_config = PolicyConfig(
            on_nonfinite, backoff_factor, min_lr, grow_after, max_bad_steps, max_rollbacks
        )
        for name, value in (("clip_norm", clip_norm), ("clip_value", clip_value), ("max_update_ratio", max_update_ratio)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every!r}")
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.max_update_ratio = max_update_ratio
        self.snapshot_every = snapshot_every
        self.schedule = schedule
        self.progress = progress
        self.diagnose = diagnose
        self.loss_fn = self._loss(loss)
        self._spec = model if isinstance(model, MLP) else None
        if self._spec is not None:
            self.backend = get_backend(backend)
            self.dtype = dtype or "float32"
            self.model = self.backend.build_mlp(self._spec, self.dtype, device)
        else:
            framework = _framework_of(model)
            if framework is None:
                raise TypeError(
                    f"model must be a stabilize.models.MLP spec, a torch.nn.Module or a keras.Model; "
                    f"got {type(model).__name__}"
                )
            if backend is not None and get_backend(backend).name != framework:
                raise ValueError(f"a {framework} model cannot run on backend {backend!r}; drop backend=")
            self.backend = get_backend(framework)
            self.model = model
        B = self.backend
        self.params = B.parameters(self.model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.dtype = B.dtype(self.params[0])
        self.optimizer = optimizer
        self._native = not isinstance(optimizer, OptimizerSpec)
        if optimizer is None:
            raise TypeError("pass an optimizer, e.g. stabilize.optim.SGD(lr=0.01) or a torch.optim optimizer")
        if self._native:
            self._setup_native()
        else:
            self._setup_neutral()
        self.policy = Policy(self.policy_config, self._base_lr)
        self.step_count = 0
        self.applied_steps = 0
        self.skipped_rows: set[int] = set()  # rows left out after the last rollback of a fit
        self.skipped_positions: set[int] = set()
        self._snapshot = None

    # -- setup ----------------------------------------------------------------
    @staticmethod
    def _loss(loss):
        if callable(loss):
            return loss
        if loss in _LOSSES:
            return _LOSSES[loss]
        raise ValueError(f"loss must be a callable or one of {sorted(_LOSSES)}, got {loss!r}")

    def _setup_neutral(self):
        B = self.backend
        self._base_lr = self.optimizer.lr
        self._state_template = self.optimizer.init(B, self.params)
        _, values = flatten_state(self._state_template)
        self.state_vars = [B.variable(v) for v in values]
        self._lr_var = B.variable(B.state_scalar(self._base_lr, self.params[0]))
        self._step = make_step(
            B,
            self.model,
            self.loss_fn,
            self.params,
            self.optimizer,
            self._state_template,
            self.state_vars,
            clip_norm=self.clip_norm,
            clip_value=self.clip_value,
            max_update_ratio=self.max_update_ratio,
            guard=self.policy_config.on_nonfinite != "ignore",
        )

    def _setup_native(self):
        torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
        is_torch = self.backend.name == "torch" and torch is not None and isinstance(self.optimizer, torch.optim.Optimizer)
        is_keras = (self.backend.name == "tensorflow" and keras is not None
                    and isinstance(self.optimizer, keras.optimizers.Optimizer))
        if not (is_torch or is_keras):
            raise TypeError(
                f"optimizer must be a stabilize.optim spec (SGD, Adam), a torch.optim optimizer for a torch "
                f"model or a keras optimizer for a keras model; got {type(self.optimizer).__name__} for "
                f"backend {self.backend.name}"
            )
        if self.max_update_ratio is not None:
            raise ValueError("max_update_ratio needs a stabilize.optim spec (the candidate update is not visible)")
        self.state_vars = []
        if is_torch:
            self._base_lr = float(self.optimizer.param_groups[0]["lr"])
            self._group_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
            return
        from .backends.tensorflow import make_keras_step

        lr = self.optimizer.learning_rate
        if not hasattr(lr, "assign"):
            raise TypeError("a keras optimizer with a LearningRateSchedule cannot be backed off; pass a float "
                            "learning rate and StabilityTrainer(schedule=...) instead")
        self._base_lr = float(np.asarray(lr))
        self._keras_step = make_keras_step(self.model, self.loss_fn, self.optimizer, self.params,
                                           self.clip_norm, self.clip_value,
                                           guard=self.policy_config.on_nonfinite != "ignore")

    # -- state ------------------------------------------------------------------
    def _take_snapshot(self):
        B = self.backend
        if self._native and B.name == "torch":
            import copy

            opt_state = copy.deepcopy(self.optimizer.state_dict())
            self._snapshot = ([B.copy(p) for p in self.params], opt_state, self.applied_steps)
        elif self._native:  # keras: its optimizer state is a list of variables
            opt_vars = [getattr(v, "value", v) for v in self.optimizer.variables]
            self._snapshot = ([B.copy(p) for p in self.params], [B.copy(v) for v in opt_vars], self.applied_steps)
        else:
            self._snapshot = (
                [B.copy(p) for p in self.params],
                [B.copy(v) for v in self.state_vars],
                self.applied_steps,
            )

    def _restore_snapshot(self):
        B = self.backend
        params, opt_state, applied = self._snapshot
        for p, saved in zip(self.params, params):
            B.assign(p, saved)
        if self._native and B.name == "torch":
            self.optimizer.load_state_dict(opt_state)
        elif self._native:
            for v, saved in zip(self.optimizer.variables, opt_state):
                v.assign(saved)
        else:
            for v, saved in zip(self.state_vars, opt_state):
                B.assign(v, saved)
        self.applied_steps = applied

    def current_lr(self) -> float:
        """The rate the next step will use: back-off, then schedule."""
        factor = self.schedule(self.applied_steps) if self.schedule is not None else 1.0
        return self.policy.lr * factor

    # -- one step -----------------------------------------------------------------
    def _run_step(self, xb, yb, lr) -> dict[str, float]:
        B = self.backend
        if not self._native:
            B.assign(self._lr_var, B.state_scalar(lr, self.params[0]))
            return dict(zip(STAT_FIELDS, B.read(self._step(xb, yb, self._lr_var))))
        return self._run_native_step(xb, yb, lr)

    def _run_native_step(self, xb, yb, lr):
        B = self.backend
        if B.name == "tensorflow":
            self.optimizer.learning_rate.assign(lr)
            out = dict(zip(STAT_FIELDS, B.read(self._keras_step(xb, yb))))
            if out["committed"] != 1.0 and out["weights_finite"] == 1.0:
                # only now: did the previous update leave non-finite weights?
                out["weights_finite"] = float(weights_finite(B, self.params))
            return out
        for group, base in zip(self.optimizer.param_groups, self._group_lrs):
            group["lr"] = base * lr / self._base_lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(xb), yb)
        loss.backward()
        out = native_torch_check(B, loss, self.params, self.clip_norm, self.clip_value)
        out["update_ratio"] = 0.0
        ok = out["loss_finite"] == 1.0 and out["grads_finite"] == 1.0
        if not ok:  # only now: did the previous update leave non-finite weights?
            out["weights_finite"] = float(weights_finite(B, self.params))
        commit = (ok or self.policy_config.on_nonfinite == "ignore") and out["weights_finite"] == 1.0
        if commit:
            self.optimizer.step()
        out["committed"] = float(commit)
        return out

    # -- data ---------------------------------------------------------------------
    def _convert(self, xb):
        B = self.backend
        if isinstance(xb, dict):
            if self._spec is not None:  # a spec takes one matrix: columns in key order
                cols = [np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in xb.values()]
                return B.convert(np.concatenate(cols, axis=1), self.dtype)
            return {k: self._convert(v) for k, v in xb.items()}
        if B.is_tensor(xb):
            return xb
        arr = np.asarray(xb)
        return B.convert(arr, self.dtype if arr.dtype.kind == "f" else None)

    def _batches(self, x, y, batch_size, shuffle, rng, skip_rows, skip_positions):
        """Yield ``(position, x, y, rows)``; ``rows`` are sample indices for array data, else None.

        After a rollback the implicated data are left out: their rows for array
        data (wherever shuffling puts them), their batch positions for a dataset.
        """
        if y is None:  # a DataLoader, a tf.data.Dataset, or any iterable of (x, y)
            for i, item in enumerate(x):
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise ValueError("a dataset must yield (inputs, targets) pairs")
                if i not in skip_positions:
                    yield i, item[0], item[1], None
            return
        n = len(y)
        order = rng.permutation(n) if shuffle else np.arange(n)
        if skip_rows:
            order = order[~np.isin(order, list(skip_rows))]
        for i, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            xb = {k: np.asarray(v)[idx] for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[idx]
            yield i, xb, np.asarray(y)[idx], idx

    @staticmethod
    def _check_arrays(x, y, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if y is None:
            return
        n = len(y)
        columns = x.items() if isinstance(x, dict) else [("x", x)]
        for key, value in columns:
            if len(value) != n:
                raise ValueError(f"inputs {key!r} have {len(value)} rows but the targets have {n}")

    # -- fit ----------------------------------------------------------------------
    def fit(
        self,
        x,
        y=None,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        max_steps: int | None = None,
        stop_on_nonfinite: bool = False,
    ) -> History:
        """Train and return the :class:`~stabilize.history.History`.

        Args:
            x: inputs (array, or dict of arrays as in seed 000), or a DataLoader /
                ``tf.data.Dataset`` / iterable of ``(x, y)`` batches with ``y=None``.
            y: targets for array inputs.
            epochs, batch_size, shuffle: the usual; shuffling is a numpy
                permutation under ``seed``, so every backend sees the same batches.
            max_steps: stop after this many attempted steps.
            stop_on_nonfinite: stop at the first non-finite step (for reproducing failures).
        """
        self._check_arrays(x, y, batch_size)
        rng = np.random.default_rng(seed)
        rows: list[dict] = []
        events: list[Event] = []
        first_bad = None
        diagnosis = None
        self._diagnosis = None
        if self._snapshot is None and (self.policy_config.on_nonfinite == "rollback" or self._native):
            self._take_snapshot()
        bar = self._progress(epochs, x, y, batch_size, max_steps)
        skip_rows: set[int] = set()
        skip_positions: set[int] = set()
        streak: list[tuple[int, Any]] = []  # (position, rows) of the current run of bad steps
        self.skipped_rows, self.skipped_positions = skip_rows, skip_positions
        try:
            for epoch in range(epochs):
                for bi, xb, yb, idx in self._batches(x, y, batch_size, shuffle, rng, skip_rows, skip_positions):
                    if max_steps is not None and len(rows) >= max_steps:
                        return self._history(rows, events, first_bad)
                    lr = self.current_lr()
                    keep_pre = self.diagnose and diagnosis is None and self.policy_config.on_nonfinite == "ignore"
                    pre = [self.backend.copy(p) for p in self.params] if keep_pre else None
                    stats = self._run_step(self._convert(xb), self._convert(yb), lr)
                    stats["lr"] = lr
                    rows.append(stats)
                    step = self.step_count
                    self.step_count += 1
                    bad, large = verdict(stats, self.max_update_ratio)
                    if bad and first_bad is None:
                        first_bad = step
                    if bad and diagnosis is None and self.diagnose:
                        diagnosis = self._diagnose(xb, yb, step, bi, lr, rows, pre)
                        if bar is not None:
                            bar.write(diagnosis.line())
                        else:
                            logger.warning(diagnosis.line())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{lr:.3g}")
                    if not bad and not large:
                        streak.clear()
                        self.applied_steps += 1
                        grew = self.policy.on_good()
                        if grew:
                            events.append(self._event(step, bi, epoch, "lr-growth", (), grew, stats))
                        if self._snapshot is not None and self.applied_steps % self.snapshot_every == 0:
                            self._take_snapshot()
                        continue
                    if self._native and "weights" in bad:
                        # The previous (native) update broke the weights: back to the snapshot,
                        # and let the policy decide the rest (back off, count towards raising).
                        self._restore_snapshot()
                        action = self.policy.on_bad()
                        events.append(self._event(step, bi, epoch, "nonfinite", tuple(bad),
                                                  "raised" if action == "raise" else "rolled-back", stats))
                        if action == "raise":
                            history = self._history(rows, events, first_bad)
                            raise NonFiniteError(f"training stopped: {events[-1]}\n{history.report()}", history)
                        continue
                    streak.append((bi, idx))
                    action = self.policy.on_bad()
                    if action == "applied":
                        self.applied_steps += 1
                    kind = "nonfinite" if bad else "large-update"
                    event = self._event(step, bi, epoch, kind, tuple(bad), "raised" if action == "raise" else action, stats)
                    events.append(event)
                    if action == "raise":
                        history = self._history(rows, events, first_bad)
                        raise NonFiniteError(f"training stopped: {event}\n{history.report()}", history)
                    if action == "rolled-back":
                        self._restore_snapshot()
                        for position, idx_bad in streak:
                            if idx_bad is None:
                                skip_positions.add(position)
                            else:
                                skip_rows.update(int(i) for i in idx_bad)
                        streak.clear()
                    if stop_on_nonfinite and bad:
                        return self._history(rows, events, first_bad)
            if self._native and rows and not weights_finite(self.backend, self.params):
                # The last native update has no next step to reveal it: look once, now.
                self._restore_snapshot()
                last = dict(rows[-1], weights_finite=0.0)
                first_bad = self.step_count - 1 if first_bad is None else first_bad
                events.append(self._event(self.step_count - 1, -1, epochs - 1, "nonfinite", ("weights",), "rolled-back", last))
            return self._history(rows, events, first_bad)
        finally:
            if bar is not None:
                bar.close()

    def _event(self, step, bi, epoch, kind, bad, action, stats):
        return Event(step, bi, epoch, kind, bad, action, stats["lr"], stats["loss"], stats["grad_norm"])

    def _diagnose(self, xb, yb, step, bi, lr, rows, pre):
        """Replay the failing step from its pre-step weights (see :mod:`stabilize.diagnose`)."""
        from .diagnose import diagnose

        B = self.backend
        current = None
        if pre is not None:  # the unguarded step was applied: put the pre-step weights back for the replay
            current = [B.copy(p) for p in self.params]
            for p, saved in zip(self.params, pre):
                B.assign(p, saved)
        try:
            weights = [np.asarray(B.to_numpy(p), dtype=np.float64) for p in self.params]
            wnorm = float(np.sqrt(sum(float(np.sum(w * w)) for w in weights)))
            col = lambda k: np.array([r[k] for r in rows], dtype=np.float64)
            result = diagnose(B, self.model, self.loss_fn, self._convert(xb), self._convert(yb), step=step, batch_index=bi, lr=lr,
                              losses=col("loss"), grad_norms=col("grad_norm"), weights_norm=wnorm)
        finally:
            if current is not None:
                for p, saved in zip(self.params, current):
                    B.assign(p, saved)
        self._diagnosis = result
        return result

    def _history(self, rows, events, first_bad) -> History:
        return History.from_rows(rows, events, first_bad, self._diagnosis)

    def _progress(self, epochs, x, y, batch_size, max_steps):
        if self.progress is False:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        total = epochs * math.ceil(len(y) / batch_size) if y is not None else None
        if max_steps is not None:
            total = min(total, max_steps) if total else max_steps
        # disable=None: tqdm turns itself off when stderr is not a terminal.
        return tqdm(total=total, disable=None if self.progress is None else False, leave=False, desc="stabilize")

    def predict(self, x, batch_size: int = 1024) -> np.ndarray:
        """The model's outputs for array (or dict) inputs, as float64 numpy."""
        B = self.backend
        n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        outs = []
        for start in range(0, n, batch_size):
            xb = {k: np.asarray(v)[start : start + batch_size] for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[start : start + batch_size]
            outs.append(np.asarray(B.to_numpy(self.model(self._convert(xb))), dtype=np.float64))
        return np.concatenate(outs, axis=0)

    def get_weights(self) -> list[np.ndarray]:
        """The current parameters as numpy arrays (in the spec's order for an MLP)."""
        return [self.backend.to_numpy(p) for p in self.params]
