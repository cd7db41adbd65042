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

__all__ = ["TorchBackend", "global_l2", "partial_norms", "tensor_norms"]

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


# torch's float32 ``vector_norm`` of one long tensor drifts: 3.7e-4 relative at 1e7 elements, 2.9e-3 at
# 4e7 (TF's reduction: 6e-8). A tensor longer than two rows is normed per row of ``_ROW`` elements (one
# kernel over a 2-D view, no copy), and the row norms are combined in float64: 2.4e-9 at 4e7 elements,
# and no slower than the single reduction (benchmarks/accuracy.py prints both).
_ROW = 4096


def tensor_norms(xs, ord=2.0, dtype=torch.float32) -> torch.Tensor:
    """The ``ord``-norm of each tensor in ``xs``, as one 1-D tensor of ``dtype``, NaN and inf kept.

    Tensors of up to two rows go through one ``_foreach_norm`` (one multi-tensor kernel on CUDA);
    longer ones are normed row by row. ``ord`` is a positive number or ``inf``.
    """
    out: list = [None] * len(xs)
    small = [i for i, x in enumerate(xs) if 0 < x.numel() <= 2 * _ROW]
    if small:
        for i, n in zip(small, torch._foreach_norm([xs[i] for i in small], ord, dtype=dtype)):
            out[i] = n
    for i, x in enumerate(xs):
        if x.numel() == 0:  # the norm of nothing is 0 (inf-norm included)
            out[i] = torch.zeros((), dtype=dtype, device=x.device)
        elif out[i] is None:
            out[i] = _row_norm(x, ord, dtype)
    return torch.stack(out) if out else torch.zeros(0, dtype=dtype)


def partial_norms(xs, dtype=torch.float32) -> torch.Tensor:
    """A 1-D tensor whose L2 norm is the global L2 norm of ``xs``: the norms of the short tensors (one
    ``_foreach_norm``) and of the rows of the long ones, in ``dtype``. Fewer kernels than
    :func:`tensor_norms` when only the total is wanted (the guarded step's norm and finite flag)."""
    small = [x for x in xs if 0 < x.numel() <= 2 * _ROW]
    parts = [torch.stack(torch._foreach_norm(small, 2.0, dtype=dtype))] if small else []
    parts += [_rows(x, 2.0, dtype) for x in xs if x.numel() > 2 * _ROW]
    if not parts:
        return torch.zeros(1, dtype=dtype, device=xs[0].device if xs else "cpu")
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def global_l2(xs, device) -> torch.Tensor:
    """The global L2 norm of ``xs`` as a float64 scalar on ``device``: partial norms in float32
    (float64 when an input is), combined in float64. Non-finite exactly when an element is
    (or when the float32 squares overflow)."""
    if not xs:
        return torch.zeros((), dtype=torch.float64, device=device)
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return torch.linalg.vector_norm(partial_norms(xs, acc), dtype=torch.float64)


def _rows(x, ord, dtype) -> torch.Tensor:
    """The ``ord``-norms of ``x``'s rows of ``_ROW`` elements (and of the shorter tail), one vector."""
    flat = x.reshape(-1)  # a view for the contiguous gradients and weights the guard sees
    k = flat.numel() // _ROW
    rows = torch.linalg.vector_norm(flat[: k * _ROW].view(k, _ROW), ord, dim=1, dtype=dtype)
    if flat.numel() == k * _ROW:
        return rows
    return torch.cat([rows, torch.linalg.vector_norm(flat[k * _ROW:], ord, dtype=dtype).reshape(1)])


def _row_norm(x, ord, dtype):
    rows = _rows(x, ord, dtype)
    wide = torch.float32 if rows.device.type == "mps" else torch.float64  # MPS has no float64
    return torch.linalg.vector_norm(rows.to(wide), ord).to(dtype)


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


_ACTS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda h: h,
}


class _Dense(torch.nn.Module):
    """``act(x @ W + b)`` with the kernel stored ``(in, out)``, as in the spec."""

    def __init__(self, kernel, bias, act):
        super().__init__()
        self.weight = torch.nn.Parameter(kernel)
        self.bias = torch.nn.Parameter(bias)
        self.act = act

    def forward(self, x):
        return _ACTS[self.act](x @ self.weight + self.bias)

    def extra_repr(self):
        return f"in={self.weight.shape[0]}, out={self.weight.shape[1]}, act={self.act}"


class _MLPModule(torch.nn.Sequential):
    """The MLP spec as a torch module: one ``_Dense`` per layer, parameters in spec order."""

    def __init__(self, spec, dtype, device):
        ws = [torch.tensor(w, dtype=dtype, device=device) for w in spec.weights()]
        super().__init__(*[_Dense(ws[2 * i], ws[2 * i + 1], act) for i, act in enumerate(spec.activations)])


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

    def numel(self, x, dtype):
        return x.numel()

    def rows(self, x, dtype):
        return x.shape[0]

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

    def acos(self, x):
        return torch.acos(x)

    def asin(self, x):
        return torch.asin(x)

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

    def norms(self, xs, ord, dtype):
        return list(tensor_norms(xs, ord, _DTYPES[dtype]).unbind()) if xs else []

    def all_finite(self, xs):
        # min and max are non-finite exactly when some element is (NaN propagates), and
        # cannot overflow. aminmax is one vectorised pass; on CPU, isfinite().all(),
        # amax and the inf-norm each take about 15x longer (measured: benchmarks/overhead.py).
        # Checked in each tensor's own dtype: a cast would turn a large float64 weight into inf.
        flags = [torch.isfinite(torch.stack(torch.aminmax(x))).all() for x in xs if x.numel()]
        return torch.stack(flags).all() if flags else torch.tensor(True)

    def stop_gradient(self, x):
        return x.detach()

    def custom_grad(self, forward, backward):
        return lambda *xs: _CustomGrad.apply(forward, backward, *xs)

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def state_scalar(self, value, like):
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def scalar_pow(self, base, exponent):
        return torch.pow(base, exponent)

    def stack(self, values, dtype):
        return torch.stack([v.detach().to(_DTYPES[dtype]).reshape(()) for v in values])

    def value_and_grad(self, loss_fn, params):
        loss = loss_fn()
        return loss, list(torch.autograd.grad(loss, params, allow_unused=True))

    def no_grad(self):
        return torch.no_grad()

    def variable(self, value):
        return value.detach().clone()

    def assign(self, var, value):
        with torch.no_grad():
            var.copy_(value)

    def copy(self, x):
        return x.detach().clone()

    def compile(self, fn):
        # Eager on purpose: torch.compile adds seconds of warm-up to short runs
        # and the step is already free of host syncs but the one final read.
        return fn

    def read(self, x):
        return x.tolist()  # the one device-to-host sync of a step

    def build_mlp(self, spec, dtype, device=None):
        return _MLPModule(spec, _DTYPES[dtype], self.device(device))

    def parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def one_hot(self, labels, num_classes, dtype):
        # torch raises on out-of-range labels itself.
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(_DTYPES[dtype])
