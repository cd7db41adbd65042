"""The primitive interface every backend implements, and dtype facts.

The formulas of stabilize (``stabilize.ops``, the optimizers, the finite check)
are written once against these primitives. A backend method converts, calls one
framework op and returns; where frameworks really differ the method says why.

The dtype table is written out here rather than asked of numpy because numpy
has no bfloat16.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

__all__ = ["Backend", "FloatInfo", "FLOAT_INFO", "ACCUMULATE"]


class FloatInfo(NamedTuple):
    """Facts about a floating dtype: smallest normal, machine epsilon, largest finite."""

    tiny: float
    eps: float
    max: float


FLOAT_INFO: dict[str, FloatInfo] = {
    "float16": FloatInfo(2.0**-14, 2.0**-10, 65504.0),
    "bfloat16": FloatInfo(2.0**-126, 2.0**-7, 3.3895313892515355e38),
    "float32": FloatInfo(2.0**-126, 2.0**-23, 3.4028234663852886e38),
    "float64": FloatInfo(2.0**-1022, 2.0**-52, 1.7976931348623157e308),
}

# Reductions accumulate in at least float32: float16 squares overflow past 256.
ACCUMULATE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


class Backend:
    """Primitives over one framework's tensors. Subclasses implement every method."""

    name: str = "base"
    framework_module: str | None = None

    # -- conversion ---------------------------------------------------------
    def is_tensor(self, x: Any) -> bool:
        raise NotImplementedError

    def convert(self, x: Any, dtype: str | None = None) -> Any:
        """A framework tensor from ``x`` (native tensors pass through, cast only if asked)."""
        raise NotImplementedError

    def to_numpy(self, x: Any):
        raise NotImplementedError

    def dtype(self, x: Any) -> str:
        """The canonical dtype name: ``float16``, ``bfloat16``, ``float32``, ``int64``..."""
        raise NotImplementedError

    def cast(self, x: Any, dtype: str) -> Any:
        raise NotImplementedError

    def shape(self, x: Any) -> tuple[int, ...]:
        """The static shape; an entry may be None inside a traced function."""
        raise NotImplementedError

    def numel(self, x: Any, dtype: str):
        """The number of elements: a Python int when known statically, else a ``dtype`` scalar."""
        raise NotImplementedError

    def rows(self, x: Any, dtype: str):
        """The size of the first axis, as :meth:`numel`."""
        raise NotImplementedError

    def full_like(self, x: Any, value: float) -> Any:
        """A tensor of ``x``'s shape, dtype and device filled with ``value``."""
        raise NotImplementedError

    # -- elementwise --------------------------------------------------------
    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Select ``a`` where ``cond`` else ``b``; either may be a Python scalar."""
        raise NotImplementedError

    def abs(self, x):
        raise NotImplementedError

    def log(self, x):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def sqrt(self, x):
        raise NotImplementedError

    def acos(self, x):
        raise NotImplementedError

    def asin(self, x):
        raise NotImplementedError

    def isfinite(self, x):
        raise NotImplementedError

    def isnan(self, x):
        raise NotImplementedError

    # -- reductions ---------------------------------------------------------
    def sum(self, x, axis: int | None = None, keepdims: bool = False):
        raise NotImplementedError

    def amax(self, x, axis: int | None = None, keepdims: bool = False):
        """Maximum that propagates NaN (a NaN anywhere gives NaN)."""
        raise NotImplementedError

    def all(self, x):
        raise NotImplementedError

    def norms(self, xs, ord: float, dtype: str) -> list:
        """The ``ord``-norm of each tensor, accumulated and returned in ``dtype``.

        ``ord`` is a positive number or ``inf``. One pass per tensor, no copies.
        """
        raise NotImplementedError

    def all_finite(self, xs):
        """A boolean scalar: every element of every tensor is finite."""
        raise NotImplementedError

    # -- autodiff -----------------------------------------------------------
    def stop_gradient(self, x):
        raise NotImplementedError

    def custom_grad(
        self,
        forward: Callable[..., tuple[Any, Sequence[Any]]],
        backward: Callable[[Sequence[Any], Any], Sequence[Any]],
    ) -> Callable[..., Any]:
        """Wrap ``forward(*xs) -> (y, saved)`` and ``backward(saved, dy) -> dxs``
        as one differentiable function of ``xs`` (first order)."""
        raise NotImplementedError

    # -- misc ---------------------------------------------------------------
    def one_hot(self, labels, num_classes: int, dtype: str):
        raise NotImplementedError

    # -- training (used by the guarded step and the trainer) ----------------
    def zeros_like(self, x):
        raise NotImplementedError

    def state_scalar(self, value: float, like):
        """A 0-d tensor of ``like``'s float dtype and device holding ``value``."""
        raise NotImplementedError

    def scalar_pow(self, base: float, exponent):
        """``base ** exponent`` for a Python float base and a tensor exponent."""
        raise NotImplementedError

    def stack(self, values, dtype: str):
        """A 1-D tensor of scalars, cast to ``dtype`` (one read brings them all back)."""
        raise NotImplementedError

    def value_and_grad(self, loss_fn, params):
        """``(loss, grads)`` of ``loss_fn()`` w.r.t. ``params`` (None where unused)."""
        raise NotImplementedError

    def no_grad(self):
        """A context in which updates are not recorded for differentiation."""
        raise NotImplementedError

    def variable(self, value):
        """A mutable slot holding ``value`` (a torch tensor, a ``tf.Variable``)."""
        raise NotImplementedError

    def assign(self, var, value) -> None:
        raise NotImplementedError

    def copy(self, x):
        """A detached copy on the same device (snapshots)."""
        raise NotImplementedError

    def compile(self, fn):
        """The framework's way to run ``fn`` as one fused step."""
        raise NotImplementedError

    def read(self, x) -> list[float]:
        """Bring a 1-D tensor back to the host: the step's one device-to-host sync."""
        return [float(v) for v in self.to_numpy(x)]

    def build_mlp(self, spec, dtype: str, device: str | None = None):
        """A native model computing ``spec`` from ``spec.weights()``."""
        raise NotImplementedError

    def parameters(self, model) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stabilize backend {self.name!r}>"
