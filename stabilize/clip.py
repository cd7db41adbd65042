"""Gradient clipping and the global norm, written once over backend primitives.

``clip_grads`` returns new tensors (the structure it was given, clipped) and
the total norm; ``clip_grads_`` is the in-place form for torch parameters,
named after ``torch.nn.utils.clip_grad_norm_``. Both use torch's formula,
``g * min(max_norm / (norm + 1e-6), 1)``, as a clamped coefficient on the
device (no host sync), and both leave gradients untouched when the norm is
inf or NaN: ``tf.clip_by_global_norm`` turns everything NaN there instead.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from typing import Any

from .backends.base import ACCUMULATE
from .registry import backend_for
from .validate import check_positive, check_positive_finite, float_dtype

__all__ = ["clip_grads", "clip_grads_", "global_norm"]


def _wider(a: str, b: str) -> str:
    return "float64" if "float64" in (a, b) else "float32"


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k in tree:
            yield from _leaves(tree[k], path + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    else:
        yield path, tree


def _rebuild(tree, values, path=()):
    if isinstance(tree, dict):
        return type(tree)((k, _rebuild(tree[k], values, path + (k,))) for k in tree)
    if isinstance(tree, (list, tuple)):
        items = [_rebuild(v, values, path + (i,)) for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return values[path]


def global_norm(grads, norm_type: float = 2.0, *, backend: str | None = None):
    """The norm of all gradients taken together (``None`` leaves are ignored).

    Accumulates in float32 (float64 if any gradient is float64). ``norm_type``
    is a positive number or ``inf``. As in ``torch.nn.utils.clip_grad_norm_``,
    it is the norm of the per-tensor norms, each taken in one pass.
    """
    if isinstance(grads, (types.GeneratorType, Iterator)):
        grads = list(grads)
    present = [g for _, g in _leaves(grads) if g is not None]
    B = backend_for(*present[:1], backend=backend)
    if not present:
        return B.convert(0.0, "float32")
    acc = "float32"
    tensors = [B.convert(g) for g in present]
    for g in tensors:
        acc = _wider(acc, ACCUMULATE[float_dtype(B, g, "clip_grads")])
    # torch's formula: the norm of the per-tensor norms.
    norms = B.norms(tensors, norm_type, acc)
    if norm_type == math.inf:
        return _stack_scalars(B, norms)
    if norm_type == 2.0:
        return B.sqrt(_add_all([n * n for n in norms]))
    if norm_type == 1.0:
        return _add_all(norms)
    return _add_all([n**norm_type for n in norms]) ** (1.0 / norm_type)


def _add_all(values):
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _stack_scalars(B, values):
    out = values[0]
    for v in values[1:]:
        out = B.where((v > out) | B.isnan(v), v, out)  # NaN-propagating running max
    return out


def clip_grads(
    grads,
    max_norm: float | None = None,
    max_value: float | None = None,
    norm_type: float = 2.0,
    *,
    backend: str | None = None,
) -> tuple[Any, Any]:
    """Clip gradients by value and/or by global norm; one formula on every backend.

    Value clipping (``max_value``) clamps each element to ``[-max_value, max_value]``
    first. Norm clipping (``max_norm``) then multiplies every gradient by
    ``min(max_norm / (norm + 1e-6), 1)``, torch's formula, as a clamped
    coefficient on the device rather than a Python branch, so it needs no
    host sync. When the norm is inf or NaN the coefficient is 1: gradients are
    never zeroed, negated or scaled into NaN, and the returned norm shows the
    problem (``tf.clip_by_global_norm`` turns everything NaN instead).

    The gradients you pass are not modified: ``clipped`` holds new tensors.
    In a torch loop, assign them back (``p.grad = g``) or use
    :func:`clip_grads_`, which clips ``p.grad`` in place.

    Args:
        grads: a tensor, a list/tuple/dict of tensors (``None`` entries kept),
            or any other iterable of tensors such as a generator (returned as
            a list). Not parameters: for ``model.parameters()`` use
            :func:`clip_grads_`.
        max_norm: the global-norm bound, or None. ``math.inf`` measures the
            norm without clipping (torch's idiom).
        max_value: the elementwise bound, or None.
        norm_type: 2.0, 1.0, any p > 0, or ``math.inf``.

    Returns:
        ``(clipped, total_norm)``: the same structure as ``grads`` and the norm
        of the gradients *as given* (before any clipping), for logging.

    Example:
        >>> import numpy as np, stabilize
        >>> (g,), norm = stabilize.clip_grads([np.array([3.0, 4.0])], max_norm=1.0, backend="numpy")
        >>> float(norm), np.round(g, 6).tolist()
        (5.0, [0.6, 0.8])
    """
    max_norm, max_value, norm_type = _check_bounds(max_norm, max_value, norm_type)
    if grads is None:
        raise TypeError("clip_grads: grads is None; pass the gradients: [p.grad for p in model.parameters()] "
                        "after loss.backward() (or clip_grads_(model.parameters(), max_norm) in place), or "
                        "tape.gradient(loss, model.trainable_variables) in TensorFlow")
    grads = _materialise(grads)
    single = not isinstance(grads, (list, tuple, dict))
    tree = [grads] if single else grads
    leaves = dict(_leaves(tree))
    present = [g for g in leaves.values() if g is not None]
    B = backend_for(*present[:1], backend=backend)
    leaves = {k: (None if g is None else B.convert(g)) for k, g in leaves.items()}
    total_norm = global_norm(list(leaves.values()), norm_type, backend=B)
    if max_value is not None:
        leaves = {
            k: None if g is None else B.where(g > max_value, max_value, B.where(g < -max_value, -max_value, g))
            for k, g in leaves.items()
        }
    if max_norm is not None:
        norm = total_norm if max_value is None else global_norm(list(leaves.values()), norm_type, backend=B)
        coef = max_norm / (norm + 1e-6)  # inf for max_norm=inf: the coefficient below is then 1
        # A non-finite norm means non-finite gradients: leave them for the caller to see.
        coef = B.where(B.isfinite(norm) & (coef < 1.0), coef, 1.0)
        leaves = {k: None if g is None else g * B.cast(coef, B.dtype(g)) for k, g in leaves.items()}
    clipped = _rebuild(tree, leaves)
    return (clipped[0] if single else clipped), total_norm


def _check_bounds(max_norm, max_value, norm_type, op="clip_grads"):
    if max_norm is not None:
        max_norm = check_positive("max_norm", max_norm, "1.0", inf_means="measure the norm, do not clip", op=op)
    if max_value is not None:
        max_value = check_positive_finite("max_value", max_value, "1.0", op=op)
    norm_type = check_positive("norm_type", norm_type, "2.0", inf_means="the max-norm", op=op)
    return max_norm, max_value, norm_type


def _is_torch_parameter(x) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Parameter)


def _materialise(grads):
    """A generator or other one-shot iterable becomes a list; parameters are refused."""
    if isinstance(grads, (types.GeneratorType, Iterator, set, frozenset)) or type(grads).__name__ == "dict_values":
        grads = list(grads)
    items = grads.values() if isinstance(grads, dict) else grads if isinstance(grads, (list, tuple)) else [grads]
    if any(_is_torch_parameter(g) for g in items):
        raise TypeError(
            "clip_grads takes gradients, and these are parameters (model.parameters()): clipping them "
            "would return clipped weights. Use stabilize.clip_grads_(model.parameters(), max_norm=...) "
            "to clip each p.grad in place, or pass [p.grad for p in model.parameters()]"
        )
    return grads


def clip_grads_(
    parameters,
    max_norm: float | None = None,
    max_value: float | None = None,
    norm_type: float = 2.0,
):
    """Clip the ``.grad`` of torch parameters in place; return the total norm.

    The in-place form of :func:`clip_grads` for torch training loops, named
    like ``torch.nn.utils.clip_grad_norm_`` and taking the same arguments
    (``max_value`` also clamps each element first). Parameters whose ``.grad``
    is None are skipped. A non-finite norm leaves every gradient untouched.

    Args:
        parameters: a torch tensor or an iterable of them (``model.parameters()``).
            A tensor that requires grad is a parameter and its ``.grad`` is
            clipped; any other tensor is taken to be a gradient and clipped itself.
        max_norm, max_value, norm_type: as in :func:`clip_grads`.

    Returns:
        The total norm of the gradients before clipping (a 0-d tensor).

    Example:
        >>> import torch, stabilize
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> float(stabilize.clip_grads_([w], max_norm=1.0)), [round(g, 5) for g in w.grad.tolist()]
        (5.0, [0.6, 0.8])
    """
    max_norm, max_value, norm_type = _check_bounds(max_norm, max_value, norm_type, "clip_grads_")
    torch = __import__("sys").modules.get("torch")
    if torch is None or isinstance(parameters, (dict, str)):
        raise TypeError(
            f"clip_grads_ clips torch parameters' .grad in place, got {type(parameters).__name__}; "
            f"for TensorFlow (or any gradient list) use grads, norm = stabilize.clip_grads(grads, max_norm=...)"
        )
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    targets = []
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"clip_grads_: item {i} is a {type(p).__name__}, not a torch tensor; for TensorFlow "
                f"use grads, norm = stabilize.clip_grads(grads, max_norm=...)"
            )
        g = p.grad if p.requires_grad else p
        if g is not None:
            targets.append(g)
    clipped, total = clip_grads(targets, max_norm=max_norm, max_value=max_value, norm_type=norm_type, backend="torch")
    with torch.no_grad():
        for g, c in zip(targets, clipped):
            g.copy_(c)
    return total
