"""The guarded-step core through its torch adapters: what issue rows of the real-models work pin down.

Global step numbers, snapshots that stay intact over several rollbacks, weights a native
update broke, the README's clip + back-off + update-bound combination, rows a rollback
leaves out, a default back-off that recovers, tuple outputs in the diagnosis, lazy
subpackages and untouched global state.
"""

import logging
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402
from zoo_torch import ZOO, assert_same, make, state_of  # noqa: E402


def _xy(n=32, seed=0):
    r = np.random.default_rng(seed)
    X = r.normal(size=(n, 3)).astype(np.float32)
    return X, X.sum(1, keepdims=True)


class BreakingSGD(torch.optim.SGD):
    """An SGD whose update writes +inf into one weight when ``armed``: a finite step that breaks the weights."""

    armed = False

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        if self.armed:
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            self.armed = False
        return out


def test_step_numbers_are_global_across_fits_and_history_says_which():
    X, y = _xy()
    model = torch.nn.Linear(3, 1)
    t = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), 0.01), progress=False)
    h1 = t.fit(X, y, batch_size=8, shuffle=False)
    y2 = y.copy()
    y2[9] = np.nan
    h2 = t.fit(X, y2, batch_size=8, shuffle=False)
    assert h1.steps.tolist() == [0, 1, 2, 3] and h2.steps.tolist() == [4, 5, 6, 7]
    assert h2.first_nonfinite_step == 5 and [e.step for e in h2.events] == [5]
    assert h1.first_nonfinite_step is None
    assert t.history.steps.tolist() == list(range(8))


def test_two_rollbacks_restore_the_same_snapshot_exactly():
    X, y = _xy(64)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    t = stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", max_bad_steps=1, max_rollbacks=5,
                                   snapshot_every=2, progress=False)
    t.fit(X[:16], y[:16], batch_size=8)  # two applied steps: a snapshot holding Adam's state at step 2
    snap = state_of(model, opt)
    bad = y[:8].copy()
    bad[:] = np.nan
    t.fit([(X[:8], bad)])
    assert_same(snap, state_of(model, opt))
    t.fit([(X[:8], y[:8]), (X[:8], bad)])  # Adam updates its state in place before the second rollback
    assert_same(snap, state_of(model, opt))  # the snapshot was not changed by it
    assert opt.state[model.weight]["step"].item() == 2


@pytest.mark.parametrize("verify", [False, True])
def test_weights_a_native_update_broke_are_restored_and_the_cost_is_reported(verify):
    X, y = _xy()
    model = torch.nn.Linear(3, 1)
    opt = BreakingSGD(model.parameters(), lr=0.01)
    # Without verification only a rollback snapshot can bring broken weights back.
    guard = stabilize.TorchGuard(model, opt, verify_updates=verify, snapshot_every=2,
                                 on_nonfinite="skip" if verify else "rollback")
    xs = [torch.from_numpy(X[i : i + 8]) for i in range(0, 32, 8)]
    ys = [torch.from_numpy(y[i : i + 8]) for i in range(0, 32, 8)]
    mse = torch.nn.functional.mse_loss
    for i in range(3):
        assert guard.step(mse(model(xs[i % 4]), ys[i % 4]))
    before = state_of(model, opt)
    opt.armed = True
    applied = guard.step(mse(model(xs[3]), ys[3]))
    if verify:  # the update is checked as it is made, and undone exactly
        assert not applied
        assert_same(before, state_of(model, opt))
        ev = guard.history.events[-1]
        assert ev.step == 3 and ev.nonfinite == ("weights",) and ev.action == "skipped" and ev.steps_lost is None
    else:  # found at the next step; the snapshot (taken after 2 applied steps) comes back, one step lost
        assert applied
        assert not torch.isfinite(model.weight).all()
        assert not guard.step(mse(model(xs[0]), ys[0]))
        assert torch.isfinite(model.weight).all()
        ev = guard.history.events[-1]
        assert ev.action == "rolled-back" and "weights" in ev.nonfinite and ev.steps_lost == 2
        assert "2 applied steps lost" in str(ev)
    assert guard.step(mse(model(xs[1]), ys[1]))  # and training goes on


@pytest.mark.parametrize("policy", ["skip", "backoff", "auto"])
def test_weights_a_native_update_broke_stop_the_run_when_no_snapshot_is_held(policy):
    """Nothing is held that the policy cannot use: without a snapshot, broken weights stop the run
    at the step that finds them, and the error names the two ways out."""
    X, y = _xy()
    model = torch.nn.Linear(3, 1)
    opt = BreakingSGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite=policy)
    assert guard.held_bytes() == 0
    mse = torch.nn.functional.mse_loss
    x, t = torch.from_numpy(X[:8]), torch.from_numpy(y[:8])
    assert guard.step(mse(model(x), t))
    opt.armed = True
    assert guard.step(mse(model(x), t))  # applied before anything could see it
    with pytest.raises(stabilize.NonFiniteError, match=r"holds no snapshot to restore: pass on_nonfinite='rollback'"
                                                       r".*verify_updates=True") as err:
        guard.step(mse(model(x), t))
    last = err.value.report.events[-1]
    assert last.step == 2 and last.action == "raised" and "weights" in last.nonfinite


def test_clip_backoff_and_update_bound_together_train():
    X, y = _xy(64)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = stabilize.TorchGuard(model, opt, clip_norm=1.0, on_nonfinite="backoff", max_update_ratio=0.5)
    mse = torch.nn.functional.mse_loss
    applied = [guard.step(mse(model(torch.from_numpy(X[i:i + 8])), torch.from_numpy(y[i:i + 8])))
               for i in range(0, 64, 8)]
    assert applied == [True] * 8
    h = guard.history
    assert np.all(h.update_ratios <= 0.5) and np.all(h.update_ratios > 0)
    assert h.losses[-1] < h.losses[0]


def test_rollback_leaving_out_every_row_is_a_clear_error():
    X, y = _xy(16)
    y[:] = np.nan
    model = torch.nn.Linear(3, 1)
    t = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), 0.1), on_nonfinite="rollback",
                                   max_bad_steps=1, max_rollbacks=10, progress=False)
    with pytest.raises(ValueError, match="every row has been left out"):
        t.fit(X, y, batch_size=8, epochs=3)


def test_default_backoff_recovers_from_an_intermittent_bad_batch():
    X, y = _xy(8)
    model = torch.nn.Linear(3, 1)
    guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), 0.05), on_nonfinite="backoff")
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    mse = torch.nn.functional.mse_loss
    assert not guard.step(mse(model(x), t) * float("nan"))
    assert guard.lr == 0.025
    for _ in range(100):
        guard.step(mse(model(x), t))
    assert guard.lr == 0.05 and guard.history.events[-1].kind == "lr-growth"


def test_a_tuple_output_model_is_trained_and_diagnosed_without_crashing(caplog):
    build, batch, loss_fn = ZOO["vae-tuple"]
    model = make("vae-tuple")
    data = [batch(i) for i in range(3)]
    bad = data[1][0].clone()
    bad[0, 0] = float("nan")
    data[1] = (bad, data[1][1])
    t = stabilize.StabilityTrainer(model, loss_fn, torch.optim.Adam(model.parameters(), 1e-3), progress=False)
    with caplog.at_level(logging.WARNING, logger="stabilize"):
        h = t.fit(data)
    assert h.committed.tolist() == [True, False, True]
    assert "step 1" in caplog.text  # the diagnosis (or why it could not be made) is reported


def test_the_trainer_is_bitwise_the_plain_loop_on_the_zoo():
    for name in ("cnn-batchnorm-dropout", "transformer-padding-mask", "dict-output"):
        build, batch, loss_fn = ZOO[name]
        data = [batch(i) for i in range(3)]
        model = make(name)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        torch.manual_seed(5)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        plain = state_of(model, opt)
        model = make(name)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        torch.manual_seed(5)
        stabilize.StabilityTrainer(model, loss_fn, opt, progress=False).fit(data)
        model.train()
        assert_same(plain, state_of(model, opt))


def test_subpackages_resolve_lazily_and_import_no_framework():
    code = ("import sys, stabilize; s = stabilize.scenarios; p = stabilize.parity; "
            "print(s.__name__, p.__name__, 'torch' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["stabilize.scenarios", "stabilize.parity", "False", "False"], out.stderr


def test_public_entry_points_change_no_global_torch_state():
    def snapshot():
        return (torch.get_default_dtype(), torch.initial_seed(), torch.is_grad_enabled(),
                torch.is_anomaly_enabled(), list(logging.getLogger().handlers),
                list(logging.getLogger("stabilize").handlers), logging.getLogger("stabilize").level)

    before = snapshot()
    X, y = _xy()
    y[3] = np.nan
    model = make("cnn-batchnorm-dropout")
    t = stabilize.StabilityTrainer(torch.nn.Linear(3, 1), "mse", stabilize.optim.SGD(lr=0.1), progress=False)
    t.fit(X, y, batch_size=8)
    t.predict(X)
    g = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), 0.1), loss_fn=ZOO["cnn-batchnorm-dropout"][2])
    x, lab = ZOO["cnn-batchnorm-dropout"][1](0)
    x[0, 0, 0, 0] = float("nan")
    g.step(ZOO["cnn-batchnorm-dropout"][2](model(x), lab), batch=(x, lab))
    stabilize.scenarios.run("high-lr", "fixed", backend="torch", dtype="float32")
    stabilize.clip_grads([torch.ones(3)], max_norm=1.0)
    assert snapshot() == before


def test_ignore_policy_diagnoses_without_copying_the_weights(monkeypatch):
    from stabilize.integrations.torch_state import TorchState

    X, y = _xy()
    y[9] = np.nan
    model = torch.nn.Linear(3, 1)
    captures = []
    monkeypatch.setattr(TorchState, "capture", lambda self, extra=None: captures.append(1))
    t = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), 0.01), on_nonfinite="ignore",
                                   progress=False)
    h = t.fit(X, y, batch_size=8, shuffle=False)
    assert captures == []  # no per-step copy of the weights
    assert h.diagnosis is not None and h.diagnosis.cause == "dirty-data" and h.diagnosis.step == 1
    assert h.events[0].action == "applied" and not torch.isfinite(model.weight).all()


def test_fit_reads_no_configuration_file_per_step(monkeypatch, tmp_path):
    from stabilize import config

    (tmp_path / "stabilize.toml").write_text('device = "cpu"\n')
    reads = []
    original = config._read_toml
    monkeypatch.setattr(config, "_read_toml", lambda path: reads.append(path) or original(path))
    X, y = _xy(64)
    for model_spec in (torch.nn.Linear(3, 1), stabilize.models.MLP((3, 4, 1))):
        opt = torch.optim.SGD(model_spec.parameters(), 0.1) if isinstance(model_spec, torch.nn.Module) \
            else stabilize.optim.SGD(lr=0.1)
        t = stabilize.StabilityTrainer(model_spec, "mse", opt, backend="torch", progress=False)
        reads.clear()
        t.fit(X, y, batch_size=8, epochs=2)
        assert reads == []  # 16 steps, no configuration read


def test_auto_policy_reacts_by_cause():
    mse = torch.nn.functional.mse_loss
    X, y = _xy(8)
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    model = torch.nn.Linear(3, 1)
    guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), 0.05), on_nonfinite="auto")
    # bad data: skipped and listed, no back-off
    bad_t = t.clone()
    bad_t[2] = float("nan")
    assert not guard.step(mse(model(x), bad_t), batch=(x, bad_t))
    assert guard.history.events[-1].action == "skipped" and guard.lr == 0.05
    assert guard.step(mse(model(x), t), batch=(x, t))
    # instability with finite data: back off
    assert not guard.step(mse(model(x), t) * float("inf"), batch=(x, t))
    assert guard.history.events[-1].action == "backed-off" and guard.lr == 0.025
    # the same failure on every batch (a singular op hit by every batch): stop, not skip forever
    with pytest.raises(stabilize.NonFiniteError, match="raised"):
        for _ in range(3):
            guard.step(torch.sqrt(-mse(model(x), t)), batch=(x, t))
    assert guard.history.events[-1].action == "raised"


def test_auto_policy_in_the_trainer_skips_bad_rows_without_backing_off():
    X, y = _xy(32)
    y[[3, 20]] = np.nan
    model = torch.nn.Linear(3, 1)
    t = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), 0.05), on_nonfinite="auto",
                                   progress=False)
    h = t.fit(X, y, batch_size=8, shuffle=False, epochs=2)
    assert [e.action for e in h.events] == ["skipped"] * 4 and t.current_lr() == 0.05


def test_a_step_that_raises_gets_the_diagnosis_as_a_note():
    r = np.random.default_rng(0)
    X = r.normal(size=(16, 4)).astype(np.float32)
    labels = r.integers(1, 4, 16)  # 1-based labels for 3 classes: label 3 is out of range
    model = torch.nn.Linear(4, 3)
    t = stabilize.StabilityTrainer(model, torch.nn.functional.cross_entropy,
                                   torch.optim.SGD(model.parameters(), 0.1), progress=False)
    with pytest.raises(IndexError) as info:
        t.fit(X, labels, batch_size=16)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "bad-labels" in notes


@pytest.mark.slow  # a long fit
def test_the_high_lr_advice_works_with_a_torch_optimizer():
    # The diagnosis of high-lr advises StabilityTrainer(on_nonfinite='backoff', max_update_ratio=0.5):
    # with a torch.optim optimizer it must run (it raised ValueError before).
    case = stabilize.scenarios.build("high-lr", "diverging")
    model = stabilize.get_backend("torch").build_mlp(case.model, "float32", "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    t = stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite="backoff", max_update_ratio=0.5, progress=False)
    h = t.fit(case.x.astype(np.float32), case.y.astype(np.float32), batch_size=32, epochs=10, shuffle=False)
    assert np.isfinite(h.losses[h.committed]).all() and h.first_nonfinite_step is None
    assert {e.kind for e in h.events} == {"large-update"} and t.current_lr() < 0.5
    assert h.losses[-1] < 0.8 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_keras_model_given_to_the_torch_guard_is_a_clear_error():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match="for a keras model use stabilize.keras_guard"):
        stabilize.TorchGuard(model, torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), 0.1))
