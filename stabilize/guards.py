"""Drop-in guards for loops you keep: a hand-written torch loop, and Keras ``model.fit``.

Both use the very same :class:`~stabilize.policies.Policy` as
:class:`~stabilize.StabilityTrainer` and the same ``clip_grads``; a bad step
(non-finite loss or gradient norm, or an update too large next to the weights
when ``max_update_ratio`` is set) is never applied.

* :class:`TorchGuard`: ``guard.step(loss, model, optimizer)`` replaces
  ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
* :func:`keras_guard`: returns ``(optimizer, callback)``. The optimizer wraps
  yours and skips a bad update inside the compiled train step (a callback
  alone runs after the update has happened); the callback applies the policy
  (back-off, rollback, raise) between steps and records the events.

The update ratio is estimated as ``lr * ‖g‖ / ‖w‖`` before the step: exact
for plain SGD, an estimate for momentum and adaptive optimizers.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from .errors import NonFiniteError
from .history import Event, History
from .ops import global_norm
from .policies import Policy, PolicyConfig, verdict
from .registry import get_backend
from .trainer import native_torch_check, weights_finite

__all__ = ["TorchGuard", "keras_guard"]

logger = logging.getLogger("stabilize")


class _Recorder:
    """Per-step rows, events and the policy: what both guards share."""

    def __init__(self, config: PolicyConfig, lr0: float):
        self.policy = Policy(config, lr0)
        self.rows: list[dict] = []
        self.events: list[Event] = []
        self.first_bad: int | None = None
        self.diagnosis = None

    def record(self, stats: dict, lr: float, max_update_ratio) -> tuple[str | None, list[str]]:
        step = len(self.rows)
        stats["lr"] = lr
        self.rows.append(stats)
        bad, large = verdict(stats, max_update_ratio)
        if bad and self.first_bad is None:
            self.first_bad = step
        if not bad and not large:
            grew = self.policy.on_good()
            if grew:
                self.events.append(Event(step, step, 0, "lr-growth", (), grew, lr, stats["loss"], stats["grad_norm"]))
            return None, bad
        action = self.policy.on_bad()
        shown = "raised" if action == "raise" else action
        self.events.append(Event(step, step, 0, "nonfinite" if bad else "large-update", tuple(bad), shown, lr,
                                 stats["loss"], stats["grad_norm"]))
        return action, bad

    def history(self) -> History:
        return History.from_rows(self.rows, self.events, self.first_bad, self.diagnosis)


class TorchGuard:
    """Guard a hand-written torch loop.

    Example:
        >>> import torch, stabilize
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = stabilize.TorchGuard(clip_norm=1.0, on_nonfinite="backoff")
        >>> x, y = torch.randn(8, 2), torch.full((8, 1), float("nan"))
        >>> guard.step(torch.nn.functional.mse_loss(model(x), y), model, opt)
        False
        >>> guard.history.events[0].action
        'backed-off'

    Args:
        clip_norm, clip_value: gradient clipping (:func:`stabilize.clip_grads`).
        on_nonfinite, backoff_factor, min_lr, grow_after, max_bad_steps, max_rollbacks:
            the policy, as in :class:`~stabilize.StabilityTrainer`.
        max_update_ratio: also treat ``lr·‖g‖/‖w‖`` above this as a bad step.
        snapshot_every: applied steps between snapshots (rollback policy).
        loss_fn: ``loss_fn(pred, target)``; with ``batch=(x, y)`` given to
            :meth:`step`, the first bad step is replayed and diagnosed.
    """

    def __init__(self, *, clip_norm=None, clip_value=None, on_nonfinite="skip", backoff_factor=0.5, min_lr=0.0,
                 grow_after=None, max_bad_steps=3, max_rollbacks=3, max_update_ratio=None, snapshot_every=50,
                 loss_fn=None):
        self.config = PolicyConfig(on_nonfinite, backoff_factor, min_lr, grow_after, max_bad_steps, max_rollbacks)
        self.clip_norm, self.clip_value, self.max_update_ratio = clip_norm, clip_value, max_update_ratio
        self.snapshot_every, self.loss_fn = snapshot_every, loss_fn
        self._rec: _Recorder | None = None
        self._base_lrs: list[float] | None = None
        self._snapshot = None
        self._applied = 0

    @property
    def history(self) -> History:
        return self._rec.history() if self._rec else History()

    @property
    def lr(self) -> float:
        return self._rec.policy.lr if self._rec else float("nan")

    def step(self, loss, model, optimizer, batch=None) -> bool:
        """Backward, check, and step only if the step is good. Returns whether it was applied."""
        import torch

        B = get_backend("torch")
        if self._rec is None:
            self._base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
            self._rec = _Recorder(self.config, self._base_lrs[0])
        lr = self._rec.policy.lr
        for group, base in zip(optimizer.param_groups, self._base_lrs):
            group["lr"] = base * lr / self._base_lrs[0]
        params = [p for p in model.parameters() if p.requires_grad]
        if self.config.on_nonfinite == "rollback" and self._snapshot is None:
            self._take(params, optimizer)
        loss.backward()
        extra = ()
        if self.max_update_ratio is not None:  # lr·‖g‖/‖w‖, read in the same sync
            with torch.no_grad():
                extra = (global_norm(params, backend=B),)
        stats = native_torch_check(B, loss, params, self.clip_norm, self.clip_value, extra)
        stats["update_ratio"] = lr * stats["_current"] / (stats["extra"][0] + 1e-12) if extra else 0.0
        if stats["loss_finite"] != 1.0 or stats["grads_finite"] != 1.0:  # only now: are the weights finite?
            with torch.no_grad():
                stats["weights_finite"] = float(weights_finite(B, params))
        action, bad = self._rec.record(stats, lr, self.max_update_ratio)
        applied = action is None or action == "applied"
        stats["committed"] = float(applied)
        if bad and self._rec.diagnosis is None and batch is not None and self.loss_fn is not None:
            self._diagnose(model, batch, lr, params)
        if applied:
            optimizer.step()
            self._applied += 1
            if self.config.on_nonfinite == "rollback" and self._applied % self.snapshot_every == 0:
                self._take(params, optimizer)
        elif action == "rolled-back":
            self._restore(params, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if action == "raise":
            raise NonFiniteError(f"training stopped: {self._rec.events[-1]}\n{self.history.report()}", self.history)
        return applied

    def _take(self, params, optimizer):
        self._snapshot = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()))

    def _restore(self, params, optimizer):
        import torch

        saved, state = self._snapshot
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        optimizer.load_state_dict(state)

    def _diagnose(self, model, batch, lr, params):
        from .diagnose import diagnose

        B = get_backend("torch")
        x, y = batch
        rec = self._rec
        col = lambda k: np.array([r[k] for r in rec.rows], dtype=np.float64)
        wnorm = float(np.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params)))
        rec.diagnosis = diagnose(B, model, self.loss_fn, x, y, step=len(rec.rows) - 1, batch_index=len(rec.rows) - 1,
                                 lr=lr, losses=col("loss"), grad_norms=col("grad_norm"), weights_norm=wnorm)
        logger.warning(rec.diagnosis.line())


def keras_guard(optimizer, *, diagnose_data=None, loss_fn=None, **settings):
    """Guard Keras ``model.fit``: returns ``(guarded_optimizer, callback)``.

    See :func:`stabilize.integrations.keras_guard.keras_guard` (loaded on first use).

    Example::

        opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-3), clip_norm=1.0, on_nonfinite="backoff")
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, y, callbacks=[cb])
        print(cb.history.report())
    """
    from .integrations.keras_guard import keras_guard as _keras_guard

    return _keras_guard(optimizer, diagnose_data=diagnose_data, loss_fn=loss_fn, **settings)
