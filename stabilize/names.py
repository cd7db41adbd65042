"""Each framework's own names for stabilize's arguments.

stabilize keeps one name per setting (``clip_norm``, ``clip_value``, ``axis``,
``keepdims``, ``scheduler``), but people type their framework's: a torch user
writes ``max_norm`` (``clip_grad_norm_``), ``dim`` and ``keepdim``; a Keras user
writes ``clipnorm`` and ``clipvalue`` (``keras.optimizers.Optimizer``). A call
that faces one framework accepts that framework's names; the other framework's
names are refused with the name to pass instead, so nothing is silently ignored.

Example:
    >>> from stabilize.names import settings_for
    >>> settings_for("tensorflow", {"clipnorm": 1.0}, "keras_guard")
    {'clip_norm': 1.0}
    >>> settings_for("torch", {"clipnorm": 1.0}, "TorchGuard")
    Traceback (most recent call last):
    ...
    TypeError: TorchGuard: clipnorm= is Keras's name; pass clip_norm= (torch's max_norm= works too)
"""

from __future__ import annotations

import warnings

__all__ = ["SETTING_ALIASES", "settings_for", "axis_from", "scheduler_from"]

# framework -> {its own name: stabilize's name}
SETTING_ALIASES = {
    "torch": {"max_norm": "clip_norm"},
    "tensorflow": {"clipnorm": "clip_norm", "clipvalue": "clip_value"},
}
_SPOKEN = {"torch": "torch's", "tensorflow": "Keras's"}


def settings_for(framework: str | None, settings: dict, where: str) -> dict:
    """``settings`` with ``framework``'s own names turned into stabilize's.

    Args:
        framework: ``"torch"``, ``"tensorflow"`` (Keras), or None (a neutral model: both accepted).
        settings: the keyword arguments as given; not modified.
        where: the entry point, named in an error.

    Raises:
        TypeError: a name of the other framework, or a setting given under two names.
    """
    out = dict(settings)
    for owner, table in SETTING_ALIASES.items():
        for alias, name in table.items():
            if alias not in out:
                continue
            if framework is not None and owner != framework:
                own = {v: k for k, v in SETTING_ALIASES.get(framework, {}).items()}.get(name)
                also = f" ({_SPOKEN[framework]} {own}= works too)" if own else ""
                raise TypeError(f"{where}: {alias}= is {_SPOKEN[owner]} name; pass {name}={also}")
            if name in out:
                raise TypeError(f"{where}: {name}= and {alias}= name the same setting; pass one of them")
            out[name] = out.pop(alias)
    return out


def axis_from(op: str, axis, dim, keepdims=False, keepdim=None):
    """``(axis, keepdims)`` from numpy/Keras names or torch's ``dim``/``keepdim``; both at once is an error."""
    if dim is not None:
        if axis is not None:
            raise TypeError(f"{op}: axis= and dim= name the same argument (dim is torch's name); pass one of them")
        axis = dim
    if keepdim is not None:
        if keepdims:
            raise TypeError(f"{op}: keepdims= and keepdim= name the same argument (keepdim is torch's name); "
                            f"pass one of them")
        keepdims = keepdim
    return axis, keepdims


def scheduler_from(scheduler, schedule, where: str):
    """The one ``scheduler=``; ``schedule=`` still works, with a DeprecationWarning (it is the same argument)."""
    if schedule is None:
        return scheduler
    if scheduler is not None:
        raise TypeError(f"{where}: scheduler= and schedule= are the same argument (schedule= is its old name); "
                        f"pass scheduler= only")
    warnings.warn(f"{where}(schedule=...) is deprecated: pass scheduler=..., the name TorchGuard and "
                  f"torch use", DeprecationWarning, stacklevel=3)
    return schedule
