"""Framework backends. Each module translates the primitives of
:class:`stabilize.backends.base.Backend` into one framework; no formula lives here."""

from .base import ACCUMULATE, FLOAT_INFO, Backend, FloatInfo

__all__ = ["Backend", "FloatInfo", "FLOAT_INFO", "ACCUMULATE"]
