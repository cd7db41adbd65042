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
