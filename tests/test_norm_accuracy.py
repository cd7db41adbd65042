"""The global gradient norm is accurate on every backend: within 1e-6 relative of float64 at 4e7
float32 elements (torch's own float32 ``vector_norm`` of one tensor that long is off by 2.9e-3)."""

import numpy as np
import pytest

import stabilize

N = 40_000_000


@pytest.fixture(scope="module")
def long_gradient():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(N, dtype=np.float32) + np.float32(0.5)  # a mean keeps the sum from cancelling
    small = rng.standard_normal((300, 7)).astype(np.float32)
    ref = np.sqrt(np.sum(g.astype(np.float64) ** 2) + np.sum(small.astype(np.float64) ** 2))
    return g, small, ref


def test_global_norm_of_a_40M_element_gradient_is_within_1e_6(backend, long_gradient):
    g, small, ref = long_gradient
    B = stabilize.get_backend(backend)
    norm = float(B.to_numpy(stabilize.global_norm([B.convert(g), B.convert(small)], backend=backend)))
    assert abs(norm - ref) / ref < 1e-6, (norm, ref)


@pytest.mark.needs("torch")
def test_the_torch_guard_step_reads_the_accurate_norm(long_gradient):
    import torch

    g, small, ref = long_gradient
    w = torch.nn.Parameter(torch.zeros(N))
    v = torch.nn.Parameter(torch.zeros(300, 7))
    opt = torch.optim.SGD([w, v], lr=0.0)
    guard = stabilize.TorchGuard(torch.nn.ParameterList([w, v]), opt)
    loss = (w * torch.from_numpy(g)).sum() + (v * torch.from_numpy(small)).sum()  # grads: exactly g and small
    guard.step(loss)
    assert abs(guard.history.grad_norms[-1] - ref) / ref < 1e-6
    assert abs(float(torch.linalg.vector_norm(torch.from_numpy(g))) - np.sqrt(np.sum(g.astype(np.float64) ** 2))) \
        / ref > 1e-5  # what the step would read without the row-wise accumulation
