"""Repair, opt in (``on_nonfinite="repair"``, torch): after a diagnosis names a torch op at a
line of the user's code that stabilize has a safe twin for, that call site calls the twin for
the rest of the run, and the failing step is run again.

The swap is a ``TorchFunctionMode`` (the machinery the diagnosis replay uses), entered around
each step only once a site has been swapped: a healthy run installs nothing and pays nothing.
Every swap is an event and a warning naming the call site and the twin, so that the user can
make the change in their code. Only call sites whose arguments map one to one are swapped:

==========================  =====================================
``torch.sqrt(x)``           ``stabilize.safe_sqrt(x)``
``x.pow(p)``, ``x ** p``    ``stabilize.safe_pow(x, p)`` (p a number)
``torch.acos`` / ``asin``   ``stabilize.safe_acos`` / ``safe_asin``
``torch.log(x)``            ``stabilize.safe_log(x)``
``a / b``, ``torch.div``    ``stabilize.safe_div(a, b)`` (no rounding mode)
==========================  =====================================

Example::

    t = StabilityTrainer(model, loss_fn, torch.optim.SGD(model.parameters(), 0.1), on_nonfinite="repair")
    t.fit(X, y)     # step k: torch.sqrt at losses.py:42 met 0 -> the site now calls stabilize.safe_sqrt
    t.repairs       # [('.../losses.py', 42, 'torch.sqrt', 'stabilize.safe_sqrt')]
"""

from __future__ import annotations

import numbers

from torch.overrides import TorchFunctionMode, resolve_name

from .ops import canonical, user_frame

__all__ = ["CallSites", "TWINS"]

TWINS = {"sqrt": "stabilize.safe_sqrt", "pow": "stabilize.safe_pow", "acos": "stabilize.safe_acos",
         "asin": "stabilize.safe_asin", "log": "stabilize.safe_log", "div": "stabilize.safe_div"}
_REVERSED = ("__rtruediv__", "__rpow__", "__rdiv__")  # the operands are swapped: not one to one


def _call_twin(op, args, kwargs):
    """The twin's result, or None when this call's arguments do not map one to one."""
    from .. import ops, singular

    if kwargs or not args:
        return None
    if op == "sqrt" and len(args) == 1:
        return singular.safe_sqrt(args[0])
    if op == "pow" and len(args) == 2 and isinstance(args[1], numbers.Real) and not isinstance(args[1], bool):
        return singular.safe_pow(args[0], float(args[1]))
    if op in ("acos", "asin") and len(args) == 1:
        return (singular.safe_acos if op == "acos" else singular.safe_asin)(args[0])
    if op == "log" and len(args) == 1:
        return ops.safe_log(args[0])
    if op == "div" and len(args) == 2:
        return ops.safe_div(args[0], args[1])
    return None


class CallSites(TorchFunctionMode):
    """The swapped call sites: ``(file, line, op) -> calls swapped so far``."""

    def __init__(self):
        super().__init__()
        self.sites: dict = {}

    def __bool__(self) -> bool:
        return bool(self.sites)

    def add(self, event) -> str | None:
        """Swap the call site of a diagnosed op; returns the twin's name (None: no twin, or no user line)."""
        if event is None or event.op not in TWINS or not event.file or event.name.endswith(_REVERSED):
            return None
        self.sites.setdefault((event.file, event.line, event.op), 0)
        return TWINS[event.op]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or getattr(func, "__name__", "")
        op = canonical(name)
        if op in TWINS and not name.endswith(_REVERSED):
            file, line, _ = user_frame(2)
            key = (file, line, op)
            if key in self.sites:
                out = _call_twin(op, args, kwargs)
                if out is not None:
                    self.sites[key] += 1
                    return out
        return func(*args, **kwargs)
