"""spike="rewind" (PaLM-style): back to the last rollback snapshot, then the next K batches left out, as events."""

import numpy as np
import pytest
from conftest import load_backend

from stabilize import StabilityTrainer, scenarios
from stabilize.models import MLP
from stabilize.optim import SGD
from stabilize.scenarios import losses as L

REWIND = dict(spike="rewind", spike_warmup=10, snapshot_every=5, spike_skip_batches=3)


def _trainer(backend, **kw):
    case = scenarios.build("loss-spike", "diverging")
    t = StabilityTrainer(MLP((4, 32, 32, 1), seed=0), L.naive_mse, SGD(lr=0.01, momentum=0.9), backend=backend,
                         dtype="float64", progress=False, **kw)
    return t, case


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_rewind_restores_the_snapshot_before_the_spike_bit_identically(backend):
    load_backend(backend)
    t, case = _trainer(backend, **REWIND)
    h = t.fit(case.x, case.y, epochs=1, batch_size=32, shuffle=False, max_steps=25)  # step 24: the spike
    (event,) = h.events
    assert (event.step, event.kind, event.action, event.steps_lost) == (24, "spike", "rewound", 4)
    ref, _ = _trainer(backend)
    ref.fit(case.x, case.y, epochs=1, batch_size=32, shuffle=False, max_steps=20)  # the snapshot: 20 applied
    for a, b in zip(t.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert t.applied_steps == 20 and t.supervisor.leave_out == 3


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_rewind_leaves_out_the_next_batches_as_events_and_the_run_stays_on_track(backend):
    load_backend(backend)
    t, case = _trainer(backend, **REWIND)
    h = t.fit(case.x, case.y, epochs=4, batch_size=32, shuffle=False)
    assert h.first_nonfinite_step is None and np.all(np.isfinite(h.losses)) and h.final_loss < 0.1
    spikes = [e for e in h.events if e.kind == "spike"]
    left = [(e.epoch, e.batch_index) for e in h.events if e.kind == "left-out"]
    assert spikes and all(e.action == "rewound" for e in spikes)
    # each rewind leaves out exactly the 3 batches after the spiking one, never silently
    expected = [(e.epoch, e.batch_index + k) for e in spikes for k in (1, 2, 3)]
    assert left == expected, (left, expected)
    assert len(h.losses) == 4 * 32 - len(left)
    assert "left-out [a batch after a spike rewind]" in str([e for e in h.events if e.kind == "left-out"][0])
    assert t.supervisor.state_dict()["leave_out"] == 0


def test_rewind_with_a_torch_optimizer():
    load_backend("torch")
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).double()
    case = scenarios.build("loss-spike", "diverging")
    t = StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), progress=False,
                         **REWIND)
    h = t.fit(case.x, case.y, epochs=2, batch_size=32, shuffle=False)
    kinds = [(e.kind, e.action) for e in h.events]
    assert ("spike", "rewound") in kinds and kinds.count(("left-out", "skipped")) == 3 * kinds.count(("spike", "rewound"))
    assert np.all(np.isfinite(h.losses))


def test_rewind_is_refused_by_the_torch_guard_and_checked():
    load_backend("torch")
    import torch
    import stabilize

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="needs StabilityTrainer's data loop"):
        stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), spike="rewind")
    with pytest.raises(ValueError, match="spike_skip_batches"):
        StabilityTrainer(MLP((2, 1)), "mse", SGD(lr=0.1), backend="torch", spike="rewind", spike_skip_batches=-1)


# -- a lower rate for a while after a rewind (PaLM) --------------------------------------------
LOWER = dict(REWIND, spike_lr_factor=0.5, spike_lr_steps=4)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_after_a_rewind_the_rate_is_lowered_for_spike_lr_steps_applied_steps(backend):
    load_backend(backend)
    t, case = _trainer(backend, **LOWER)
    h = t.fit(case.x, case.y, epochs=2, batch_size=32, shuffle=False, max_steps=36)
    assert [(e.step, e.action) for e in h.events if e.kind == "spike"] == [(24, "rewound")]
    # rows are attempted steps: 0-24 before and at the spike, the 3 left-out batches make no row,
    # then 4 applied steps at 0.01 * 0.5 exactly, then the schedule's own 0.01 again (into epoch 2)
    assert h.lrs.tolist() == [0.01] * 25 + [0.005] * 4 + [0.01] * 7
    assert h.committed[25:].all() and t.supervisor.lowered == 0
    assert t.supervisor.state_dict()["lowered"] == 0


def _sgd_reference(ws, x, y, lr):
    """One float64 SGD step of the relu MLP under ``mean((out - y)**2)``, by hand in numpy."""
    acts, pre, h = [x], [], x
    for i in range(0, len(ws), 2):
        z = h @ ws[i] + ws[i + 1]
        pre.append(z)
        h = np.maximum(z, 0.0) if i < len(ws) - 2 else z
        acts.append(h)
    d = 2.0 * (h - y) / h.size
    grads = [None] * len(ws)
    for i in range(len(ws) - 2, -1, -2):
        layer = i // 2
        grads[i], grads[i + 1] = acts[layer].T @ d, d.sum(0)
        if layer:
            d = (d @ ws[i].T) * (pre[layer - 1] > 0)
    return [w - lr * g for w, g in zip(ws, grads)]


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_the_lowered_step_matches_a_float64_reference(backend):
    load_backend(backend)
    case = scenarios.build("loss-spike", "diverging")
    t = StabilityTrainer(MLP((4, 32, 32, 1), seed=0), L.naive_mse, SGD(lr=0.01), backend=backend, dtype="float64",
                         progress=False, **LOWER)
    h = t.fit(case.x, case.y, epochs=1, batch_size=32, shuffle=False, max_steps=25)
    assert [(e.step, e.action) for e in h.events] == [(24, "rewound")] and t.supervisor.leave_out == 3
    before = [w.copy() for w in t.get_weights()]  # torch hands out views of the live weights
    x, y = case.x[832:960], case.y[832:960]  # 4 batches: the 3 left out, then one step at the lowered rate
    h = t.fit(x, y, epochs=1, batch_size=32, shuffle=False, max_steps=1)
    assert h.lrs.tolist() == [0.005] and h.committed.tolist() == [True]
    expected = _sgd_reference(before, x[96:], y[96:], 0.005)
    for got, want in zip(t.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_spike_lr_settings_are_checked():
    load_backend("torch")
    make = lambda **kw: StabilityTrainer(MLP((2, 1)), "mse", SGD(lr=0.1), backend="torch", **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"spike_lr_factor must lie in \(0, 1\]"):
        make(spike="rewind", spike_lr_factor=0.0, spike_lr_steps=5)
    with pytest.raises(ValueError, match=r"spike_lr_factor must lie in \(0, 1\]"):
        make(spike="rewind", spike_lr_factor=1.5, spike_lr_steps=5)
    with pytest.raises(TypeError, match="spike_lr_factor must be a number"):
        make(spike="rewind", spike_lr_factor="0.5", spike_lr_steps=5)
    with pytest.raises(ValueError, match="spike_lr_steps must be an integer >= 0"):
        make(spike="rewind", spike_lr_steps=-1)
    with pytest.raises(ValueError, match="pass spike='rewind'"):
        make(spike="skip", spike_lr_factor=0.5, spike_lr_steps=5)
    with pytest.raises(ValueError, match="pass e.g. spike_lr_steps=100"):
        make(spike="rewind", spike_lr_factor=0.5)
