"""TorchGuard's public core: ``check`` / ``commit`` / ``discard``, ``step(backward=False)``, positions."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402
from zoo_torch import assert_same, state_of  # noqa: E402


def _bn_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _xy(i, n=8, bad=False):
    r = np.random.default_rng(i)
    x = torch.as_tensor(r.normal(size=(n, 3)), dtype=torch.float32)
    if bad:
        x[2, 1] = float("nan")
    return x, x.sum(1, keepdim=True)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _run(mode, steps=6, bad_at=3):
    model = _bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, clip_norm=1.0, on_nonfinite="backoff")
    for i in range(steps):
        x, y = _xy(i, bad=i == bad_at)
        loss = _loss(model, x, y)
        if mode == "step":
            guard.step(loss)
        elif mode == "split":
            guard.commit(guard.check(loss))
        else:  # the framework ran the backward pass
            loss.backward()
            guard.step(loss, backward=False)
    return state_of(model, opt), guard


@pytest.mark.parametrize("mode", ["split", "no-backward"])
def test_check_commit_and_backward_false_equal_step_bitwise(mode):
    ref, g_ref = _run("step")
    got, g = _run(mode)
    assert_same(ref, got)
    assert [(e.step, e.action) for e in g.history.events] == [(e.step, e.action) for e in g_ref.history.events]
    assert g.history.events[0].action == "backed-off"


def test_verdict_names_the_bad_part_before_anything_is_applied():
    model = _bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt)
    guard.step(_loss(model, *_xy(0)))
    before = state_of(model, opt)
    verdict = guard.check(_loss(model, *_xy(1, bad=True)))
    assert not verdict.ok and not verdict.applies
    assert verdict.stats["loss_finite"] == 0.0 and verdict.stats["buffers_finite"] == 0.0
    assert guard.commit(verdict) is False
    assert_same(before, state_of(model, opt))  # BN statistics and RNG included
    good = guard.check(_loss(model, *_xy(2)))
    assert good.ok and good.applies and np.isfinite(good.stats["grad_norm"])
    assert guard.commit(good) is True


def test_discard_puts_everything_back_and_records_nothing():
    model = _bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt)
    guard.step(_loss(model, *_xy(0)))
    before = state_of(model, opt)
    torch.rand(3)  # an RNG draw after the step: a discarded step gives it back too
    guard.check(_loss(model, *_xy(1)))
    guard.discard()
    assert_same(before, state_of(model, opt))
    assert all(p.grad is None for p in model.parameters())
    assert guard.supervisor.step == 1 and guard.history.events == []
    guard.backward(_loss(model, *_xy(1)))  # a backward alone can be discarded as well
    guard.discard()
    with pytest.raises(RuntimeError, match="no loss was backpropagated"):
        guard.check()


def test_commit_misuse_is_refused():
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt)
    verdict = guard.check(_loss(model, *_xy(0)))
    with pytest.raises(RuntimeError, match="neither committed nor discarded"):
        guard.check(_loss(model, *_xy(1)))
    guard.commit(verdict)
    with pytest.raises(RuntimeError, match="once"):
        guard.commit(verdict)


def test_events_carry_the_epoch_and_batch_given():
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="skip")
    for epoch in range(2):
        for b in range(3):
            x, y = _xy(10 * epoch + b, bad=(epoch, b) == (1, 2))
            guard.step(_loss(model, x, y), epoch=epoch, batch=b, data=(x, y))
    ev = guard.history.events
    assert [(e.epoch, e.batch_index, e.step, e.action) for e in ev] == [(1, 2, 5, "skipped")]
    # the old spelling batch=(x, y) still means the data
    x, y = _xy(7, bad=True)
    guard.step(_loss(model, x, y), batch=(x, y), epoch=3)
    assert (guard.history.events[-1].epoch, guard.history.events[-1].batch_index) == (3, 6)


def test_sync_free_events_carry_their_positions():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    guard = stabilize.TorchGuard(model, opt, sync_free=True, on_nonfinite="skip")
    for b in range(4):
        x, y = _xy(b, bad=b == 1)
        guard.step(torch.nn.functional.mse_loss(model(x), y), epoch=2, batch=b)
    guard.step(torch.nn.functional.mse_loss(model(_xy(9, bad=True)[0]), _xy(9)[1]))  # no position given
    assert [(e.epoch, e.batch_index, e.step) for e in guard.history.events] == [(2, 1, 1), (None, 4, 4)]
    with pytest.raises(ValueError, match="sync_free"):
        guard.check(torch.nn.functional.mse_loss(model(_xy(0)[0]), _xy(0)[1]))
