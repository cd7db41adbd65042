"""TorchGuard(sync_free=True): decided and committed on the device, read one step late.

The run equals the synchronous guard's bit for bit (parameters, BatchNorm buffers, optimizer state,
history), for a fused optimizer (skipped inside its kernel) and a plain one (selected per tensor); a
NaN gradient leaves Adam's moments exactly as they were (a select, never ``update * ok``); on CUDA no
step makes a host sync (``torch.cuda.set_sync_debug_mode("error")``)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402

FAULTS = {3: "nan_input", 5: "inf_loss", 7: "nan_grad"}


def _nan_grad(model):
    """0 in the forward pass, NaN in the backward one: d sqrt(0 * w) / dw = 0 * inf."""
    return torch.sqrt(model[0].weight * 0.0).sum()


def _net(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 1)).to(device)


def _batches(n=12, device="cpu"):
    rng = np.random.default_rng(0)
    return [(torch.from_numpy(rng.normal(size=(8, 4)).astype(np.float32)).to(device),
             torch.from_numpy(rng.normal(size=(8, 1)).astype(np.float32)).to(device)) for _ in range(n)]


def _train(sync_free, fused, policy="backoff", device="cpu", clip_norm=0.5):
    model = _net(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite=policy, clip_norm=clip_norm, sync_free=sync_free,
                                 restore_rng=False)
    for i, (x, y) in enumerate(_batches(device=device)):
        fault = FAULTS.get(i)
        if fault == "nan_input":
            x = x.clone()
            x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(model(x), y)
        if fault == "inf_loss":
            loss = loss * float("inf")
        if fault == "nan_grad":
            loss = loss + _nan_grad(model)
        guard.step(loss)
    return model, opt, guard.history


def _tensors(model, opt):
    out = [t.detach().cpu() for t in list(model.parameters()) + list(model.buffers())]
    for p in model.parameters():
        out += [v.detach().cpu() for v in opt.state[p].values()]
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused (found_inf)", "plain (select)"])
def test_sync_free_equals_the_synchronous_guard_bitwise(fused):
    m1, o1, h1 = _train(sync_free=False, fused=fused)
    m2, o2, h2 = _train(sync_free=True, fused=fused)
    for a, b in zip(_tensors(m1, o1), _tensors(m2, o2)):
        assert torch.equal(a, b)
    assert [(e.step, e.action, e.nonfinite) for e in h1.events] == [(e.step, e.action, e.nonfinite) for e in h2.events]
    assert [e.step for e in h2.events if e.action == "backed-off"] == [3, 5, 7]
    np.testing.assert_array_equal(h1.losses, h2.losses)
    np.testing.assert_array_equal(h1.lrs, h2.lrs)  # the back-off reaches the very next update
    np.testing.assert_array_equal(h1.grad_norms, h2.grad_norms)
    assert o2.state[m2[0].weight]["step"].item() == 12 - len(FAULTS)


@pytest.mark.parametrize("fused", [True, False], ids=["fused (found_inf)", "plain (select)"])
def test_a_nan_gradient_leaves_adam_moments_bitwise_unchanged(fused):
    """NaN * 0 is NaN: a skip written as ``update * ok`` would poison exp_avg; a select does not."""
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    guard = stabilize.TorchGuard(model, opt, sync_free=True)
    (x, y), = _batches(1)
    guard.step(torch.nn.functional.mse_loss(model(x), y))
    before = _tensors(model, opt)
    loss = torch.nn.functional.mse_loss(model(x), y) + _nan_grad(model)
    applied = guard.step(loss)
    assert isinstance(applied, torch.Tensor) and not applied.item()
    assert all(torch.isfinite(t.float()).all() for t in _tensors(model, opt))
    for a, b in zip(before, _tensors(model, opt)):
        assert torch.equal(a, b)
    assert guard.history.events[-1].nonfinite == ("gradients",)


def test_held_bytes_and_a_checkpoint_include_the_last_step(tmp_path):
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = stabilize.TorchGuard(model, opt, sync_free=True)
    for x, y in _batches(3):
        guard.step(torch.nn.functional.mse_loss(model(x), y))
    params = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # the pre-step copies of parameters and Adam's state (two moments and a step per parameter)
    assert guard.held_bytes() == buffers + params + 2 * params + 4 * len(list(model.parameters()))
    guard.save_checkpoint(tmp_path / "c.ckpt")
    net = _net()
    opt2 = torch.optim.Adam(net.parameters())
    fresh = stabilize.TorchGuard(net, opt2, sync_free=True)
    fresh.load_checkpoint(tmp_path / "c.ckpt")
    assert fresh.history.steps.size == 3
    for a, b in zip(_tensors(model, opt), _tensors(net, opt2)):
        assert torch.equal(a, b)


def test_a_bad_first_step_leaves_no_optimizer_state_behind():
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = stabilize.TorchGuard(model, opt, sync_free=True)
    (x, y), = _batches(1)
    guard.step(torch.nn.functional.mse_loss(model(x), y) * float("nan"))
    assert len(opt.state) == 0 and guard.history.events[0].action == "skipped"


def test_auto_skips_bad_data_without_backing_off_as_the_synchronous_guard_does():
    out = []
    for sync_free in (False, True):
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = stabilize.TorchGuard(model, opt, sync_free=sync_free, on_nonfinite="auto")
        for i, (x, y) in enumerate(_batches(6)):
            if i in (2, 4):
                x = x.clone()
                x[1, 2] = float("nan")
            guard.step(torch.nn.functional.mse_loss(model(x), y), batch=(x, y))
        h = guard.history
        out.append(([(e.step, e.action) for e in h.events], h.lrs.tolist(), _tensors(model, opt)))
    assert out[0][0] == out[1][0] == [(2, "skipped"), (4, "skipped")]
    assert out[0][1] == out[1][1] == [1e-2] * 6  # bad data: no back-off
    for a, b in zip(out[0][2], out[1][2]):
        assert torch.equal(a, b)


def test_raise_is_taken_when_the_step_is_read_one_step_late():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = stabilize.TorchGuard(model, opt, sync_free=True, on_nonfinite="raise")
    (x, y), = _batches(1)
    guard.step(torch.nn.functional.mse_loss(model(x), y) * float("nan"))  # not applied, read at the next call
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(stabilize.NonFiniteError, match="step 0"):
        guard.step(torch.nn.functional.mse_loss(model(x), y))
    for p, b in zip(model.parameters(), before):  # the next update was not made either
        assert torch.equal(p, b)


def test_what_needs_the_verdict_first_is_refused_up_front():
    model = _net()
    opt = torch.optim.Adam(model.parameters())
    cases = [({"on_nonfinite": "rollback"}, "on_nonfinite='rollback'"),
             ({"scaler": torch.amp.GradScaler("cpu")}, "GradScaler"),
             ({"verify_updates": True}, "verify_updates"),
             ({"max_update_ratio": 0.1}, "max_update_ratio")]
    for options, word in cases:
        with pytest.raises(ValueError, match=f"sync_free=True cannot be combined with .*{word}"):
            stabilize.TorchGuard(model, opt, sync_free=True, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fused", [True, False], ids=["fused (found_inf)", "capturable (select)"])
def test_no_step_makes_a_host_sync_on_cuda(fused):
    model = _net("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None, capturable=not fused)
    guard = stabilize.TorchGuard(model, opt, sync_free=True, clip_norm=0.5)
    data = _batches(device="cuda")
    guard.step(torch.nn.functional.mse_loss(model(data[0][0]), data[0][1]))  # creates Adam's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y) in enumerate(data[1:]):
            loss = torch.nn.functional.mse_loss(model(x), y)
            guard.step(loss * float("nan") if i == 4 else loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    h = guard.history
    assert [e.step for e in h.events] == [5] and h.steps.size == len(data)


@pytest.mark.parametrize("spike", ["skip", "clip"])
def test_spike_verdicts_match_the_synchronous_guard(spike):
    out = []
    for sync_free in (False, True):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        guard = stabilize.TorchGuard(model, opt, sync_free=sync_free, spike=spike, spike_warmup=5, restore_rng=False)
        for i, (x, y) in enumerate(_batches(16)):
            guard.step(torch.nn.functional.mse_loss(model(x), y * 30.0 if i == 11 else y))
        h = guard.history
        out.append(([(e.step, e.kind, e.action) for e in h.events], h.grad_norms, _tensors(model, opt)))
    assert out[0][0] == out[1][0] and (11, "spike", "skipped" if spike == "skip" else "clipped") in out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    for a, b in zip(out[0][2], out[1][2]):
        assert torch.equal(a, b)
