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


def register_keras_objects() -> None:
    """Make stabilize's Keras classes (``GuardedOptimizer``) known to ``keras.saving``, so that
    ``keras.models.load_model`` of a guarded model needs nothing but ``import stabilize``.

    Keras is never imported here: when it is already imported, the classes are registered now;
    otherwise a one-shot import hook registers them right after ``import keras`` finishes and then
    removes itself from ``sys.meta_path``. A registration that fails is logged, never raised.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "saving"):
        _register()
    elif not any(isinstance(f, _AfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())


def _register() -> None:
    try:
        from .integrations import keras_optimizer  # noqa: F401 - its decorator registers the class
    except Exception as exc:  # noqa: BLE001 - a broken TensorFlow must not break import keras
        import logging

        logging.getLogger("stabilize").debug("stabilize: Keras classes not registered (%s: %s)", type(exc).__name__, exc)


class _AfterKeras:
    """A meta-path finder that only watches for ``keras``: it lets the normal finder load it, then
    registers stabilize's classes once its module has run, and removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        import importlib.machinery

        self._remove()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None) if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        loader.exec_module = exec_module  # this spec's own loader instance only
        return spec

    def _remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
