"""Plain training loops (torch, Keras) that stop at the first non-finite step and
hand it to ``stabilize.diagnose`` with the pre-step weights, as the trainer does.

A step is bad when it raises, when its loss or gradient norm is not finite, or
when the update leaves a non-finite weight (then the step is undone first).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Setup:
    """One reproduction: the model, loss, optimizer and batches a report describes."""

    model: object
    loss_fn: object
    optimizer: object
    batches: list
    steps: int = 10
    lr: float = 0.1
    clip_norm: float | None = None
    kwargs: dict = field(default_factory=dict)


def run_torch(s: Setup):
    """(diagnosis or None, number of steps run)."""
    import torch

    import stabilize
    from stabilize.diagnose import diagnose

    B = stabilize.get_backend("torch")
    params = [p for p in s.model.parameters() if p.requires_grad]
    losses, norms = [], []
    for step in range(s.steps):
        x, y = s.batches[step % len(s.batches)]
        pre = copy.deepcopy(s.model.state_dict())
        pre_opt = copy.deepcopy(s.optimizer.state_dict())
        s.optimizer.zero_grad()
        error = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loss = s.loss_fn(s.model(x), y)
                loss.backward()
                value = float(loss.detach().float())
            except Exception as exc:  # noqa: BLE001 - a step that raises is a bad step
                error, value = exc, float("nan")
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads and error is None else float("nan")
        losses.append(value)
        norms.append(norm)
        bad = error is not None or not np.isfinite(value) or not np.isfinite(norm)
        if not bad:
            if s.clip_norm is not None:
                (clipped, _) = stabilize.clip_grads([p.grad for p in params], max_norm=s.clip_norm)
                for p, g in zip(params, clipped):
                    p.grad = g
            s.optimizer.step()
            bad = not all(bool(torch.isfinite(p).all()) for p in params)
        if bad:
            s.model.load_state_dict(pre)
            s.optimizer.load_state_dict(pre_opt)
            wnorm = float(np.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d = diagnose(B, s.model, s.loss_fn, x, y, step=step, batch_index=step, lr=s.lr,
                             losses=np.array(losses), grad_norms=np.array(norms), weights_norm=wnorm,
                             optimizer=s.optimizer, **s.kwargs)
            return d, step + 1
    return None, s.steps


def run_keras(s: Setup):
    """(diagnosis or None, number of steps run)."""
    import tensorflow as tf

    import stabilize
    from stabilize.diagnose import diagnose

    B = stabilize.get_backend("tensorflow")
    variables = s.model.trainable_variables
    losses, norms = [], []
    for step in range(s.steps):
        x, y = s.batches[step % len(s.batches)]
        pre = [v.numpy() for v in s.model.weights]
        pre_opt = [v.numpy() for v in s.optimizer.variables]
        error = None
        try:
            with tf.GradientTape() as tape:
                loss = s.loss_fn(s.model(x), y)
            grads = tape.gradient(loss, variables)
            value = float(tf.cast(loss, tf.float64))
        except Exception as exc:  # noqa: BLE001 - a step that raises is a bad step
            error, value, grads = exc, float("nan"), []
        present = [tf.convert_to_tensor(g) for g in grads if g is not None]
        norm = float(np.sqrt(sum(float(np.sum(np.square(np.asarray(tf.cast(g, tf.float64))))) for g in present))) \
            if present and error is None else float("nan")
        losses.append(value)
        norms.append(norm)
        bad = error is not None or not np.isfinite(value) or not np.isfinite(norm)
        if not bad:
            if s.clip_norm is not None:
                # dense first: clip_grads does not take tf.IndexedSlices (an embedding's gradient)
                dense = [None if g is None else tf.convert_to_tensor(g) for g in grads]
                grads, _ = stabilize.clip_grads(dense, max_norm=s.clip_norm)
            s.optimizer.apply_gradients(zip(grads, variables))
            bad = not all(bool(np.all(np.isfinite(np.asarray(tf.cast(v, tf.float32))))) for v in s.model.weights)
        if bad:
            for v, w in zip(s.model.weights, pre):
                v.assign(w)
            for v, w in zip(s.optimizer.variables, pre_opt):
                v.assign(w)
            wnorm = float(np.sqrt(sum(float(np.sum(np.square(w.astype(np.float64)))) for w in pre)))
            d = diagnose(B, s.model, s.loss_fn, x, y, step=step, batch_index=step, lr=s.lr,
                         losses=np.array(losses), grad_norms=np.array(norms), weights_norm=wnorm,
                         optimizer=s.optimizer, **s.kwargs)
            return d, step + 1
    return None, s.steps
