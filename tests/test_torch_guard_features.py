"""TorchGuard with the rest of a real torch loop: GradScaler, schedulers, accumulation,
torch.compile, several optimizers, and clear errors for what it cannot guard."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402
from zoo_torch import assert_same, make, state_of  # noqa: E402


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def _xy(i, n=8):
    r = np.random.default_rng(i)
    x = torch.as_tensor(r.normal(size=(n, 3)), dtype=torch.float32)
    return x, x.sum(1, keepdim=True)


def test_gradscaler_overflow_is_a_scaler_event_and_a_forward_nan_goes_to_the_policy():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = stabilize.TorchGuard(model, opt, scaler=scaler, on_nonfinite="backoff")
    x, y = _xy(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    assert guard.step(loss)
    before = state_of(model, opt)
    # Finite loss whose scaled gradients overflow float32: the scaler's own business.
    huge = torch.nn.functional.mse_loss(model(x * 1e17), y * 1e17)
    assert torch.isfinite(huge)
    assert not guard.step(huge)
    assert scaler.get_scale() == 2.0**15  # the scaler halved its scale
    assert_same(before, state_of(model, opt))
    ev = guard.history.events[-1]
    assert ev.kind == "scaler" and ev.action == "scaler-skip" and guard.supervisor.policy.backoffs == 0
    # A NaN in the forward pass is a real failure: the policy backs off, the scaler is untouched.
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    assert not guard.step(torch.nn.functional.mse_loss(model(x_bad), y))
    assert scaler.get_scale() == 2.0**15 and guard.supervisor.policy.backoffs == 1
    assert guard.history.events[-1].action == "backed-off"
    assert_same(before, state_of(model, opt))


def test_a_collapsed_loss_scale_goes_to_the_policy():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    guard = stabilize.TorchGuard(model, opt, scaler=scaler, on_nonfinite="skip", min_loss_scale=1.0)
    x, y = _xy(0)
    assert not guard.step(torch.nn.functional.mse_loss(model(x * 1e19), y * 1e19))
    assert guard.history.events[-1].kind == "nonfinite" and guard.history.events[-1].action == "skipped"


def test_scheduler_keeps_its_rates_and_backoff_multiplies_them():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    guard = stabilize.TorchGuard(model, opt, scheduler=sched, on_nonfinite="backoff", grow_after=None)
    x, y = _xy(0)
    assert guard.step(torch.nn.functional.mse_loss(model(x), y))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05  # StepLR did its work: the guard did not reset it
    assert not guard.step(torch.nn.functional.mse_loss(model(x), y) * float("nan"))
    assert opt.param_groups[0]["lr"] == 0.05  # a skipped step does not advance the schedule
    w0 = model.weight.detach().clone()
    loss = torch.nn.functional.mse_loss(model(x), y)
    g = torch.autograd.grad(loss, model.weight, retain_graph=True)[0]
    assert guard.step(loss)
    # this update used the scheduler's rate times the back-off factor: 0.05 * 0.5
    assert torch.equal(model.weight.detach(), w0 - np.float32(0.025) * g) or torch.allclose(
        model.weight.detach(), w0 - 0.025 * g, rtol=0, atol=1e-7)
    assert opt.param_groups[0]["lr"] == 0.05 and guard.history.lrs[-1] == 0.025


def test_gradient_accumulation_checks_once_and_equals_the_plain_accumulated_loop():
    def run(guarded, bad=False):
        model = make("cnn-batchnorm-dropout")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = stabilize.TorchGuard(model, opt) if guarded else None
        torch.manual_seed(2)
        from zoo_torch import ZOO

        _, batch, loss_fn = ZOO["cnn-batchnorm-dropout"]
        applied = []
        for step in range(3):
            for micro in range(2):
                x, y = batch(2 * step + micro)
                if bad and step == 1 and micro == 0:
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
                loss = loss_fn(model(x), y) / 2
                if guard is None:
                    loss.backward()
                elif micro == 0:
                    guard.backward(loss)
                else:
                    applied.append(guard.step(loss))
            if guard is None:
                opt.step()
                opt.zero_grad()
        return state_of(model, opt), applied, guard

    plain, _, _ = run(False)
    guarded, applied, guard = run(True)
    assert applied == [True] * 3
    assert_same(plain, guarded)
    _, applied, guard = run(True, bad=True)
    assert applied == [True, False, True] and len(guard.history.losses) == 3


def test_torch_compile_model_is_guarded_without_graph_breaks():
    from torch._dynamo.utils import counters

    counters.clear()
    model = _linear()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = stabilize.TorchGuard(compiled, opt)
    results = []
    for i in range(4):
        x, y = _xy(i)
        if i == 2:
            y = y * float("nan")
        results.append(guard.step(torch.nn.functional.mse_loss(compiled(x), y)))
    assert results == [True, True, False, True]
    assert not counters["graph_break"]


def test_two_optimizers_each_with_its_own_guard_as_in_a_gan():
    torch.manual_seed(0)
    G, D = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    # One RNG, two guards: neither rewinds the draws of the other.
    guard_g = stabilize.TorchGuard(G, opt_g, restore_rng=False)
    guard_d = stabilize.TorchGuard(D, opt_d, restore_rng=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for step in range(3):
        z, real = torch.randn(8, 2), torch.randn(8, 3)
        d_loss = bce(D(real), torch.ones(8, 1)) + bce(D(G(z).detach()), torch.zeros(8, 1))
        if step == 1:
            d_loss = d_loss * float("nan")
        before_d = state_of(D, opt_d)
        applied_d = guard_d.step(d_loss)
        if step == 1:
            assert not applied_d
            assert_same(before_d, state_of(D, opt_d))
        g_loss = bce(D(G(z)), torch.ones(8, 1))
        assert guard_g.step(g_loss)
        opt_d.zero_grad()  # the generator's backward reached D's gradients; they are not D's step
    assert [e.step for e in guard_d.history.events] == [1] and not guard_g.history.events


def test_clear_errors_for_what_the_guard_cannot_guard():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="TorchGuard\\(model, optimizer"):
        stabilize.TorchGuard(clip_norm=1.0)
    with pytest.raises(ValueError, match="clip_norm must be a positive finite number, got -1"):
        stabilize.TorchGuard(model, opt, clip_norm=-1)
    with pytest.raises(TypeError, match="clip_norm must be a positive finite number, got the str"):
        stabilize.TorchGuard(model, opt, clip_norm="1.0")
    with pytest.raises(ValueError, match="snapshot_every must be an integer >= 1, got 0"):
        stabilize.TorchGuard(model, opt, on_nonfinite="rollback", snapshot_every=0)
    other = torch.optim.SGD(_linear(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        stabilize.TorchGuard(model, other)
    frozen = _linear()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        stabilize.TorchGuard(frozen, opt)
    guard = stabilize.TorchGuard(model, opt)
    x, y = _xy(0)
    with pytest.raises(ValueError, match="must be a scalar"):
        guard.step((model(x) - y) ** 2)
    with pytest.raises(ValueError, match="must be a scalar"):
        stabilize.StabilityTrainer(model, lambda p, t: (p - t) ** 2, opt, progress=False).fit(
            x.numpy(), y.numpy(), batch_size=4)


def test_trainer_accepts_a_torch_scheduler_and_a_skipped_step_does_not_advance_it():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    X = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    y[8:16] = np.nan  # the second batch
    t = stabilize.StabilityTrainer(model, "mse", opt, scheduler=sched, progress=False)
    h = t.fit(X, y, batch_size=8, shuffle=False)
    assert h.committed.tolist() == [True, False, True, True]
    assert h.lrs.tolist() == [0.1, 0.05, 0.05, 0.025] and opt.param_groups[0]["lr"] == 0.0125
