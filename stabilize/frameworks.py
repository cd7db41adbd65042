"""Which framework an object belongs to, asked of ``sys.modules`` only (never an import).

The trainer takes models, optimizers and losses of several frameworks; these
questions are answered without importing a framework the user has not
imported themselves. :func:`resolve_loss` turns the trainer's ``loss=`` into
one ``loss(pred, target)``.
"""

from __future__ import annotations

import sys

__all__ = ["framework_of", "keras_convention", "state_buffer_names", "has_batchnorm", "resolve_loss"]


def framework_of(obj) -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return "torch"
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(obj, keras.Model):
        return "tensorflow"
    return None


def keras_convention(loss, framework) -> bool:
    """Whether a loss callable takes Keras's ``(y_true, y_pred)``: any loss given with a
    keras model, and Keras loss objects or functions anywhere."""
    if framework == "tensorflow":
        return True
    keras = sys.modules.get("keras")
    if keras is None:
        return False
    return isinstance(loss, keras.losses.Loss) or getattr(loss, "__module__", "").startswith("keras")


def state_buffer_names(model) -> list[str]:
    """The names of the state a forward pass may change outside the parameters: torch buffers, Keras
    non-trainable variables (BatchNorm statistics, a layer's seed-generator state)."""
    torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
    if torch is not None and isinstance(model, torch.nn.Module):
        return [name for name, _ in model.named_buffers()]
    if keras is not None and isinstance(model, keras.Model):
        return [v.path for v in model.non_trainable_variables]
    return []


def has_batchnorm(model) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return any(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())
    return False


def resolve_loss(loss, framework: str | None):
    """The trainer's ``loss(pred, target)``: a name of :mod:`stabilize.ops`' safe losses, or a callable
    (a Keras-convention one, ``loss(y_true, y_pred)``, is called with its arguments swapped)."""
    from . import ops

    named = {"mse": ops.safe_mse, "cross_entropy": ops.safe_cross_entropy}
    if isinstance(loss, str):
        if loss in named:
            return named[loss]
        raise ValueError(f"loss must be a callable or one of {sorted(named)}, got {loss!r}")
    if not callable(loss):
        raise TypeError(f"loss must be a callable or one of {sorted(named)}, got {type(loss).__name__}")
    if keras_convention(loss, framework):
        return lambda pred, target: loss(target, pred)  # Keras order: (y_true, y_pred)
    return loss
