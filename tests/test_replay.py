"""Transient or reproducible: the failing step replayed once before a rewind or a rollback.

A fault injected only in the first attempt (a forward hook that corrupts the
output once) is ``"transient"``; a NaN in the data, or a spike the data makes,
is ``"reproducible"``. The replay keeps nothing: the run with it is bit-identical
to the run without it (parameters, buffers, optimizer, scheduler, RNG).
"""

import numpy as np
import pytest
from conftest import load_backend

from stabilize import StabilityTrainer, scenarios
from stabilize.eventlog import read
from stabilize.guard.replay import replay_step, verdict
from stabilize.models import MLP
from stabilize.optim import SGD
from stabilize.scenarios import losses as L

ROLLBACK = dict(on_nonfinite="rollback", max_bad_steps=1, snapshot_every=2, max_rollbacks=5, diagnose=False)


def _torch_setup(**kw):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, StabilityTrainer(model, "mse", opt, scheduler=sched, progress=False, **{**ROLLBACK, **kw})


def _data(nan_at=None):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]])
    if nan_at is not None:
        x[nan_at * 8 + 2, 1] = np.nan  # batch ``nan_at`` (batch_size 8) holds a NaN input
    return x, y


def _corrupt_once(module, at_call):
    """A forward hook that turns the output NaN on call ``at_call`` only: a one-off fault."""
    calls = []

    def hook(mod, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == at_call else output

    return module.register_forward_hook(hook)


def _state(model, trainer):
    import torch

    opt = trainer.optimizer.state_dict()
    tensors = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    tensors += [v.clone() for st in opt["state"].values() for v in st.values() if torch.is_tensor(v)]
    return tensors, trainer.updater.scheduler.state_dict(), torch.get_rng_state(), trainer.applied_steps


def _assert_same(a, b):
    import torch

    assert len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


def test_a_fault_only_in_the_first_attempt_is_transient(tmp_path):
    load_backend("torch")
    model, t = _torch_setup(events_path=str(tmp_path / "run.events.jsonl"))
    handle = _corrupt_once(model[0], at_call=6)  # step 5's forward pass, and only that one
    h = t.fit(*_data(), epochs=1, batch_size=8, shuffle=False)
    handle.remove()
    (event,) = h.events
    assert (event.step, event.kind, event.action, event.replay) == (5, "nonfinite", "rolled-back", "transient")
    assert "replay: transient" in h.report()
    logged = read(tmp_path / "run.events.jsonl")
    assert [(r["step"], r["action"], r["replay"]) for r in logged] == [(5, "rolled-back", "transient")]


def test_a_nan_in_the_data_is_reproducible(tmp_path):
    load_backend("torch")
    _, t = _torch_setup(events_path=str(tmp_path / "run.events.jsonl"))
    h = t.fit(*_data(nan_at=4), epochs=1, batch_size=8, shuffle=False)
    (event,) = h.events
    assert (event.step, event.action, event.replay) == (4, "rolled-back", "reproducible")
    assert read(tmp_path / "run.events.jsonl")[0]["replay"] == "reproducible"


@pytest.mark.parametrize("fault", ["transient", "data"])
@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_the_run_with_the_replay_is_bit_identical_to_the_run_without(fault):
    load_backend("torch")
    results = []
    for replay in ("on", "off"):
        model, t = _torch_setup(replay=replay)
        handle = _corrupt_once(model[0], at_call=6) if fault == "transient" else None
        h = t.fit(*_data(nan_at=4 if fault == "data" else None), epochs=2, batch_size=8, shuffle=False)
        if handle is not None:
            handle.remove()
        results.append((_state(model, t), h))
    (on, h_on), (off, h_off) = results
    _assert_same(on, off)
    np.testing.assert_array_equal(h_on.losses, h_off.losses)
    # (the rollback leaves the NaN row out of the second epoch: one rollback either way)
    assert [e.replay for e in h_on.events if e.action == "rolled-back"] == \
        ["transient" if fault == "transient" else "reproducible"]
    assert all(e.replay is None for e in h_off.events)


def test_a_replay_that_applies_its_update_gives_back_every_bit():
    """The replay of a clean step commits it (Adam, the scheduler, BatchNorm, Dropout's RNG), then
    restores: nothing it did remains."""
    load_backend("torch")
    import torch

    model, t = _torch_setup()
    x, y = _data()
    t.fit(x, y, epochs=1, batch_size=8, shuffle=False, max_steps=4)
    xb, yb = torch.as_tensor(x[:8]), torch.as_tensor(y[:8])
    before = _state(model, t)
    assert model.training  # fit left the model in its own (training) mode, as the trainer runs it
    stats, weights_ok = replay_step(t.updater, xb, yb, t.supervisor.replay_lr)
    assert stats["committed"] == 1.0 and weights_ok and verdict(stats, weights_ok) == "transient"
    _assert_same(_state(model, t), before)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_spike_the_data_makes_is_reproducible(backend):
    load_backend(backend)
    case = scenarios.build("loss-spike", "diverging")
    t = StabilityTrainer(MLP((4, 32, 32, 1), seed=0), L.naive_mse, SGD(lr=0.01, momentum=0.9), backend=backend,
                         dtype="float64", progress=False, spike="rewind", spike_warmup=10, snapshot_every=5,
                         spike_skip_batches=3)
    h = t.fit(case.x, case.y, epochs=1, batch_size=32, shuffle=False, max_steps=25)
    (event,) = h.events
    assert (event.step, event.action, event.replay) == (24, "rewound", "reproducible")


def test_a_one_off_spike_is_transient():
    load_backend("torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    calls = []

    def blow_up_once(mod, inputs, output):  # step 30's first attempt only: a finite 1e3x kick
        calls.append(1)
        return output * 1e3 if len(calls) == 31 else output

    model[2].register_forward_hook(blow_up_once)
    t = StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.01), progress=False,
                         spike="rewind", spike_warmup=10, snapshot_every=5, spike_skip_batches=2, diagnose=False)
    x, y = _data()
    h = t.fit(np.concatenate([x] * 4), np.concatenate([y] * 4), epochs=1, batch_size=8, shuffle=False)
    spikes = [e for e in h.events if e.kind == "spike"]
    assert [(e.step, e.action, e.replay) for e in spikes] == [(30, "rewound", "transient")]


def test_replay_setting_is_checked():
    load_backend("torch")
    with pytest.raises(ValueError, match="replay must be one of"):
        StabilityTrainer(MLP((2, 1)), "mse", SGD(lr=0.1), backend="torch", replay="yes")


def test_keras_replay_is_reproducible_on_nan_data_and_keeps_nothing():
    load_backend("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.Dropout(0.3), keras.layers.Dense(1)])
    t = StabilityTrainer(model, "mse", keras.optimizers.Adam(0.01), progress=False, **ROLLBACK)
    x, y = _data(nan_at=4)
    h = t.fit(x.astype("float32"), y.astype("float32"), epochs=1, batch_size=8, shuffle=False)
    (event,) = h.events
    assert (event.step, event.action, event.replay) == (4, "rolled-back", "reproducible")
    # a clean replay commits (Adam, BatchNorm, Dropout's seed), then every variable is given back
    xb, yb = t._convert(x[:8].astype("float32")), t._convert(y[:8].astype("float32"))
    variables = list(model.variables) + list(t.updater.step.guard.variables)
    before = [np.array(v.numpy()) for v in variables]
    stats, weights_ok = replay_step(t.updater, xb, yb, t.supervisor.replay_lr)
    assert stats["committed"] == 1.0 and verdict(stats, weights_ok) == "transient"
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(np.asarray(v.numpy()), b)


def test_a_keras_replay_runs_at_the_rate_the_failing_step_ran_with():
    """After a rollback has backed off, the replay still uses the failing step's own rate: the same
    update as a step at the un-backed-off rate, bit for bit."""
    load_backend("tensorflow")
    import keras

    x, y = _data()
    xb, yb = x[:8].astype("float32"), y[:8].astype("float32")
    weights = []
    for backed_off in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
        t = StabilityTrainer(model, "mse", keras.optimizers.SGD(0.1), progress=False)
        sup = t.supervisor
        if backed_off:  # the policy has backed off since the step ran (a rollback does)
            sup.policy.backoffs = 1
            assert sup.lr(0.1) == 0.05 and sup.replay_lr(0.1) == 0.1
        stats = t.updater.run(t._convert(xb), t._convert(yb), sup.replay_lr if backed_off else sup.lr)
        assert stats["lr"] == float(np.float32(0.1)) and stats["committed"] == 1.0
        weights.append([np.array(w) for w in model.get_weights()])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
