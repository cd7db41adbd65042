"""Which framework an object belongs to, asked of ``sys.modules`` only (never an import).

The trainer takes models, optimizers and losses of several frameworks; these
questions are answered without importing a framework the user has not
imported themselves. :func:`resolve_loss` turns the trainer's ``loss=`` into
one ``loss(pred, target)``; a loss of the user's own is watched once for a target whose shape
it would silently broadcast against the prediction (the built-in losses refuse that outright).
"""

from __future__ import annotations

import functools
import sys
import warnings

__all__ = ["framework_of", "keras_convention", "state_buffer_names", "has_batchnorm", "input_features",
           "resolve_loss", "broadcasts_silently"]


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
        return _watched(lambda pred, target: loss(target, pred), loss)  # Keras order: (y_true, y_pred)
    return _watched(loss, loss)


def input_features(model) -> int | None:
    """The number of input features a model's first layer takes, when it is a dense layer that says so."""
    sizes = getattr(model, "sizes", None)  # a stabilize.models.MLP spec
    if sizes is not None:
        return int(sizes[0])
    # Only where the structure guarantees that the first layer sees x as given: a dense layer, or a
    # Sequential whose first element is one (a model of its own may slice or reshape x first).
    torch, keras = sys.modules.get("torch"), sys.modules.get("keras")
    if torch is not None and type(model) is torch.nn.Linear:
        return model.in_features
    if torch is not None and isinstance(model, torch.nn.Sequential):
        return model[0].in_features if len(model) and type(model[0]) is torch.nn.Linear else None
    if keras is not None and (isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"):
        inputs = model.inputs if model.built else None
        shape = getattr(inputs[0], "shape", None) if inputs and len(inputs) == 1 else None
        return int(shape[-1]) if shape is not None and len(shape) == 2 and shape[-1] is not None else None
    return None


def broadcasts_silently(pred_shape, target_shape) -> bool:
    """Whether an elementwise loss would broadcast these shapes into a wrong one: ``(N, 1)`` against
    ``(N, 3)`` or ``(N,)``. Class logits ``(N, C)`` against labels ``(N,)`` are not that."""
    p, t = tuple(pred_shape), tuple(target_shape)
    if p == t or None in p or None in t:
        return False
    if len(p) == len(t):
        return all(a == b or 1 in (a, b) for a, b in zip(p, t))
    longer, shorter = (p, t) if len(p) > len(t) else (t, p)
    return len(longer) == len(shorter) + 1 and longer[-1] == 1 and longer[:-1] == shorter


def _watched(fn, loss):
    """``fn``, warning once when the first batch's target would be broadcast against the prediction."""
    seen = []

    @functools.wraps(fn)
    def watched(pred, target):
        if not seen:  # only the first batch with shapes is looked at: nothing on later steps
            shapes = getattr(pred, "shape", None), getattr(target, "shape", None)
            if None not in shapes:
                seen.append(True)
                if broadcasts_silently(*shapes):
                    name = getattr(loss, "__name__", type(loss).__name__)
                    warnings.warn(f"the model's output has shape {tuple(shapes[0])} but the targets "
                                  f"{tuple(shapes[1])}: the loss {name} broadcasts them into a loss over the wrong "
                                  f"pairs; give the model one output per target column, or reshape y",
                                  UserWarning, stacklevel=2)
        return fn(pred, target)

    return watched



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
