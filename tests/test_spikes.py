"""Loss-spike detection: the neutral detector, skip and ZClip-style clip on torch, the skip alarm."""

import logging
import math

import pytest

import stabilize
from stabilize.errors import SkipAlarmError
from stabilize.guard.settings import GuardSettings
from stabilize.guard.spikes import SpikeDetector


def test_detector_warms_up_then_flags_only_upward_outliers():
    det = SpikeDetector(GuardSettings(spike="skip", spike_warmup=4, spike_z=3.0, spike_alpha=0.1))
    assert det.limits() == (math.inf, math.inf)
    for v in (1.0, 1.2, 0.8, 1.0):
        det.update(v, 2 * v)
    mean, std = 1.0, math.sqrt(0.02)  # the plain warm-up mean and variance
    assert det.limits() == pytest.approx((mean + 3 * std, 2 * mean + 3 * 2 * std))
    assert not det.is_spike(1.3, 2.0) and det.is_spike(1.5, 2.0) and det.is_spike(1.0, 3.0)
    assert not det.is_spike(-100.0, 0.0) and not det.is_spike(float("nan"), 2.0)
    det.update(1.2, 2.0)  # EMA from here on
    assert det.loss.mean == pytest.approx(1.02) and det.loss.var == pytest.approx(0.9 * (0.02 + 0.1 * 0.04))
    other = SpikeDetector(det.settings)
    other.load_state_dict(det.state_dict())
    assert other.limits() == det.limits()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="spike must be one of"):
        GuardSettings(spike="rewinds")
    with pytest.raises(ValueError, match="skip_alarm must be one of"):
        GuardSettings(skip_alarm="loud")
    with pytest.raises(ValueError, match="spike_warmup must be an integer >= 2, got 1"):
        GuardSettings(spike="skip", spike_warmup=1)


torch = pytest.importorskip("torch")

SPIKE_AT, STEPS = 30, 80


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(STEPS):
        x = torch.randn(32, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])
        if step == SPIKE_AT:
            y = y * 300.0  # finite, far off: the loss jumps by orders of magnitude
        out.append((x, y))
    return out


def _run(skip_batch=False, **settings):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = stabilize.TorchGuard(model, opt, **settings)
    for step, (x, y) in enumerate(_batches()):
        if skip_batch and step == SPIKE_AT:
            continue
        guard.step(torch.nn.functional.mse_loss(model(x), y))
    x, y = _batches()[-1]
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x), y))
    return model, guard, final


def test_skip_rescues_the_run_and_equals_the_run_without_the_batch():
    _, _, unguarded = _run()
    control, _, clean = _run(skip_batch=True)
    model, guard, final = _run(spike="skip")
    assert not (unguarded < 100 * clean)  # without the detector the spike ruins the run (or makes it NaN)
    assert final == clean and final < 0.1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), control.parameters()))
    events = [(e.step, e.kind, e.action) for e in guard.history.events]
    assert events == [(SPIKE_AT, "spike", "skipped")]
    h = guard.history
    assert h.spikes == 1 and h.skipped_steps == 1 and "1 not applied, 1 spikes" in h.report()


def test_clip_applies_the_spike_with_the_norm_clipped_to_the_limit():
    model, guard, final = _run(spike="clip")
    row = guard.supervisor.rows[SPIKE_AT]
    assert row["committed"] == 1.0 and row["spike"] == 1.0 and row["grad_norm"] > row["norm_max"]
    assert [(e.step, e.action) for e in guard.history.events] == [(SPIKE_AT, "clipped")]
    _, _, unguarded = _run()
    assert final < 0.1 and not (unguarded < 100 * final)


def test_clip_moves_the_weights_by_exactly_lr_times_the_limit():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = stabilize.TorchGuard(model, opt, spike="clip", spike_warmup=3)
    x = torch.randn(16, 4)
    for _ in range(3):
        guard.step(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))
    limit = guard.supervisor.spike_limits()[1]
    before = [p.detach().clone() for p in model.parameters()]
    guard.step(torch.nn.functional.mse_loss(model(x), 1e3 * x.sum(1, keepdim=True)))
    moved = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), before)))
    assert guard.supervisor.rows[-1]["grad_norm"] > 10 * limit
    assert moved == pytest.approx(0.1 * limit, rel=1e-4)


@pytest.mark.parametrize("alarm", ["warn", "raise"])
def test_skip_alarm_is_never_silent(alarm, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_alarm=alarm,
                                 skip_alarm_window=10, skip_alarm_fraction=0.5)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    bad = torch.full((4, 1), float("nan"))
    with caplog.at_level(logging.WARNING, logger="stabilize"):
        for step in range(9):  # 5 of 9 bad: the window is not full yet
            guard.step(torch.nn.functional.mse_loss(model(x), bad if step % 2 == 0 else y))
        assert guard.supervisor.alarms == 0
        if alarm == "raise":
            with pytest.raises(SkipAlarmError, match="6 of the last 10 steps were not applied"):
                guard.step(torch.nn.functional.mse_loss(model(x), bad))
        else:
            guard.step(torch.nn.functional.mse_loss(model(x), bad))
            assert "6 of the last 10 steps were not applied" in caplog.text
    assert guard.supervisor.alarms == 1
