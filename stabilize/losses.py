"""The stabilize losses in Keras's calling order, for ``model.compile(loss=...)``.

stabilize's losses take torch's order, ``(prediction, target)``:
``safe_mse(pred, target)``, ``safe_cross_entropy(logits, labels)``. Keras calls a
loss as ``loss(y_true, y_pred)``, and hands sparse class labels over as floats
(cast to the prediction's dtype). :func:`keras_loss` adapts one to the other, so
``compile(loss=stabilize.keras_loss("cross_entropy"))`` trains on the same
numbers as ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``,
with the stabilize loss's finite gradients.

``StabilityTrainer`` needs none of this: it calls a Keras-convention loss (a
``keras.losses`` object, or any loss given with a Keras model) in Keras's order,
and its built-in ``"mse"``/``"cross_entropy"`` in stabilize's.
"""

from __future__ import annotations

from typing import Callable

from .ops import safe_cross_entropy, safe_mse

__all__ = ["keras_loss"]

_NAMED = {"mse": safe_mse, "cross_entropy": safe_cross_entropy}


def keras_loss(loss: str | Callable = "cross_entropy") -> Callable:
    """A stabilize loss as a Keras loss: ``fn(y_true, y_pred)``.

    Args:
        loss: ``"cross_entropy"`` (:func:`stabilize.safe_cross_entropy`, from logits;
            sparse labels of shape ``(N,)`` or ``(N, 1)``, or one-hot ``(N, C)``), ``"mse"``
            (:func:`stabilize.safe_mse`), or one of those two functions.

    Returns:
        A function of ``(y_true, y_pred)`` for ``model.compile(loss=...)``.

    Examples:
        >>> import stabilize
        >>> stabilize.keras_loss("cross_entropy").__name__
        'keras_safe_cross_entropy'
    """
    fn = _NAMED.get(loss) if isinstance(loss, str) else loss
    if fn not in (safe_mse, safe_cross_entropy):
        raise ValueError(f"keras_loss: loss must be one of {sorted(_NAMED)} or stabilize.safe_mse / "
                         f"stabilize.safe_cross_entropy, got {loss!r}; a loss of your own already takes Keras's "
                         f"(y_true, y_pred) if you write it so")

    def keras_order(y_true, y_pred):
        if fn is safe_cross_entropy:
            y_true = _sparse_labels(y_true, y_pred)
        return fn(y_pred, y_true)

    keras_order.__name__ = f"keras_{fn.__name__}"
    keras_order.__qualname__ = keras_order.__name__
    return keras_order


def _sparse_labels(y_true, y_pred):
    """Keras gives sparse labels as floats, ``(N,)`` or ``(N, 1)``: back to integer ids ``(N,)``.
    One-hot/probability targets (the logits' shape) pass through unchanged."""
    from keras import ops

    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1]:
        return y_true  # one-hot or probabilities
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    return ops.cast(y_true, "int64")
