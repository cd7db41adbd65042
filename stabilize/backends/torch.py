"""The PyTorch backend.

Work created from numpy goes to CUDA when ``torch.cuda.is_available()``,
unless the device config (``STABILIZE_DEVICE``, ``device = "cpu"`` in
``stabilize.toml``/``[tool.stabilize]``) says otherwise. Native tensors stay
where they are.
"""

from __future__ import annotations

import torch

from .. import config
from .base import Backend

__all__ = ["TorchBackend"]

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class _CustomGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, backward, *xs):
        y, saved = forward(*xs)
        ctx.backward_fn = backward
        ctx.saved = saved
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        grads = ctx.backward_fn(ctx.saved, dy)
        return (None, None, *grads)


class TorchBackend(Backend):
    name = "torch"
    framework_module = "torch"

    def device(self, explicit: str | None = None) -> torch.device:
        """The device for new tensors: config first, else CUDA when available."""
        value, _ = config.resolve_device(explicit)
        if value == "auto":
            value = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(value)

    def is_tensor(self, x):
        return isinstance(x, torch.Tensor)

    def convert(self, x, dtype=None):
        tdtype = _DTYPES[dtype] if dtype is not None else None
        if isinstance(x, torch.Tensor):
            return x if tdtype is None or x.dtype == tdtype else x.to(tdtype)
        return torch.as_tensor(x, dtype=tdtype, device=self.device())

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.to(torch.float32)
        return x.numpy()

    def dtype(self, x):
        return _NAMES.get(x.dtype, str(x.dtype).replace("torch.", ""))

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def shape(self, x):
        return tuple(x.shape)

    def full_like(self, x, value):
        return torch.full_like(x, value)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def abs(self, x):
        return torch.abs(x)

    def log(self, x):
        return torch.log(x)

    def exp(self, x):
        return torch.exp(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def isfinite(self, x):
        return torch.isfinite(x)

    def isnan(self, x):
        return torch.isnan(x)

    def sum(self, x, axis=None, keepdims=False):
        return torch.sum(x) if axis is None else torch.sum(x, dim=axis, keepdim=keepdims)

    def amax(self, x, axis=None, keepdims=False):
        return torch.amax(x) if axis is None else torch.amax(x, dim=axis, keepdim=keepdims)

    def all(self, x):
        return torch.all(x)

    def stop_gradient(self, x):
        return x.detach()

    def custom_grad(self, forward, backward):
        return lambda *xs: _CustomGrad.apply(forward, backward, *xs)

    def one_hot(self, labels, num_classes, dtype):
        # torch raises on out-of-range labels itself.
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(_DTYPES[dtype])
