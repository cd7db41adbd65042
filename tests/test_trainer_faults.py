"""The trainer's reliability rows: faults injected on purpose, exact state asserted after."""

import numpy as np
import pytest

import stabilize
from stabilize.models import MLP
from stabilize.optim import SGD, Adam
from stabilize.trainer import StabilityTrainer
from faults import FaultySGD, Switch, faulty_loss, gradient_fault


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, (X @ np.array([[1.0], [-1.0], [0.5]]))


def _state(trainer):
    B = trainer.backend
    return [B.to_numpy(p).copy() for p in trainer.params] + [B.to_numpy(v).copy() for v in trainer.state_vars]


def _batches(X, y, bs=16):
    return [(X[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]


class _Watch:
    """Runs batches one at a time, flipping the switch at step k, recording state before/after."""

    def __init__(self, trainer, switch):
        self.trainer, self.switch = trainer, switch

    def step(self, batch, fault=0.0):
        self.switch.set(fault)
        before = _state(self.trainer)
        lr_before, applied_before = self.trainer.current_lr(), self.trainer.applied_steps
        h = self.trainer.fit([batch], epochs=1)
        self.switch.set(0.0)
        return before, _state(self.trainer), h, (lr_before, applied_before)


@pytest.mark.parametrize("where", ["loss", "gradient", "weight"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_skip_leaves_params_optimizer_state_and_schedule_exactly_as_before(backend, where, value):
    X, y = _data()
    switch = Switch(backend, "float32")
    ref = []
    if where == "loss":
        loss, opt = faulty_loss(switch), Adam(lr=0.01)
    elif where == "gradient":
        loss, opt = gradient_fault(switch, stabilize.safe_mse, ref), Adam(lr=0.01)
    else:
        loss, opt = stabilize.safe_mse, FaultySGD(switch, lr=0.01, momentum=0.9)
    schedule_calls = []
    trainer = StabilityTrainer(MLP((3, 8, 1), seed=1), loss, opt, backend=backend, dtype="float32",
                               scheduler=lambda k: schedule_calls.append(k) or 0.5 ** (k // 2), progress=False)
    ref.append(trainer.params[0])
    w = _Watch(trainer, switch)
    batches = _batches(X, y)
    for b in batches[:2]:
        w.step(b)
    before, after, h, (lr_before, applied_before) = w.step(batches[2], fault=1.0 if np.isnan(value) else 2.0)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)  # weights, optimizer moments and the step counter
    assert trainer.applied_steps == applied_before == 2  # the schedule did not advance
    assert trainer.current_lr() == lr_before
    (event,) = h.events
    assert event.step == 2 and event.kind == "nonfinite" and event.action == "skipped"
    # A NaN gradient also makes the candidate weights NaN; a NaN loss term without
    # a gradient path leaves the gradients finite.
    expected = {"loss": ("loss",), "gradient": ("gradients", "weights"), "weight": ("weights",)}[where]
    assert event.nonfinite == expected
    assert h.first_nonfinite_step == 2 and not h.committed[0]
    # The next clean step is applied again.
    _, after2, h2, _ = w.step(batches[3])
    assert h2.committed.tolist() == [True] and not np.array_equal(after2[0], after[0])


def test_faulty_run_equals_control_run_without_that_batch(backend):
    X, y = _data(96)
    batches = _batches(X, y)
    k = 3
    switch = Switch(backend, "float32")

    def make():
        return StabilityTrainer(MLP((3, 8, 8, 1), seed=2), faulty_loss(switch), Adam(lr=0.01), backend=backend,
                                dtype="float32", progress=False)

    faulty, control = make(), make()
    for i, b in enumerate(batches):
        switch.set(1.0 if i == k else 0.0)
        faulty.fit([b])
        switch.set(0.0)
        if i != k:
            control.fit([b])
    for a, b in zip(faulty.get_weights(), control.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
    assert faulty.applied_steps == control.applied_steps == len(batches) - 1


def test_backoff_sequence_is_exact_and_grows_back(backend):
    X, y = _data(16 * 12)
    switch = Switch(backend, "float64")
    trainer = StabilityTrainer(MLP((3, 4, 1), seed=0), faulty_loss(switch), SGD(lr=0.1), backend=backend,
                               dtype="float64", on_nonfinite="backoff", backoff_factor=0.3, min_lr=0.005,
                               grow_after=2, max_bad_steps=5, progress=False)  # 4 faults in a row: not yet stopped
    faults = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    lrs, applied = [], []
    for f, b in zip(faults, _batches(X, y)):
        switch.set(float(f))
        h = trainer.fit([b])
        lrs.append(h.lrs[0])
        applied.append(trainer.applied_steps)
    lr0, fac, lo = 0.1, 0.3, 0.005
    expected = [lr0, lr0 * fac, max(lr0 * fac**2, lo), max(lr0 * fac**3, lo),
                max(lr0 * fac**4, lo), max(lr0 * fac**4, lo), max(lr0 * fac**3, lo), max(lr0 * fac**3, lo),
                max(lr0 * fac**2, lo), max(lr0 * fac**3, lo), max(lr0 * fac**3, lo)]
    assert lrs == expected  # exact: lr_k = max(lr0 * factor**k, min_lr)
    assert applied == [0, 0, 0, 0, 1, 2, 3, 4, 4, 5, 6]  # skipped steps do not advance the schedule


def test_rollback_restores_snapshot_and_raises_after_r_rollbacks(backend):
    X, y = _data(16 * 20)
    switch = Switch(backend, "float64")
    trainer = StabilityTrainer(MLP((3, 4, 1), seed=0), faulty_loss(switch), SGD(lr=0.05, momentum=0.9),
                               backend=backend, dtype="float64", on_nonfinite="rollback", max_bad_steps=2,
                               max_rollbacks=1, snapshot_every=2, progress=False)
    batches = _batches(X, y)
    for b in batches[:4]:  # 4 clean steps: snapshots at applied = 2 and 4
        trainer.fit([b])
    snap = _state(trainer)
    trainer.fit([batches[4]])  # one more clean step, not yet snapshotted
    assert trainer.applied_steps == 5
    switch.set(1.0)
    h1 = trainer.fit([batches[5]])
    assert [e.action for e in h1.events] == ["skipped"]
    h2 = trainer.fit([batches[6]])  # second bad step in a row: roll back
    assert [e.action for e in h2.events] == ["rolled-back"]
    for a, b in zip(snap, _state(trainer)):
        np.testing.assert_array_equal(a, b)  # weights and optimizer state of the snapshot
    assert trainer.applied_steps == 4 and trainer.current_lr() == 0.05 * 0.5
    trainer.fit([batches[7]])
    with pytest.raises(stabilize.NonFiniteError, match="training stopped") as info:
        trainer.fit([batches[8]])
    assert info.value.report.events[-1].action == "raised"
    for a, b in zip(snap, _state(trainer)):
        np.testing.assert_array_equal(a, b)  # a NaN update was never applied


def test_raise_policy_reports_step_and_kind(backend):
    X, y = _data()
    switch = Switch(backend, "float32")
    trainer = StabilityTrainer(MLP((3, 4, 1)), faulty_loss(switch), SGD(lr=0.01), backend=backend,
                               dtype="float32", on_nonfinite="raise", progress=False)
    trainer.fit(X[:16], y[:16], batch_size=16)
    switch.set(1.0)
    with pytest.raises(stabilize.NonFiniteError, match=r"step 1 .*nonfinite \[loss\]"):
        trainer.fit(X[:16], y[:16], batch_size=16)


def test_ignore_policy_applies_the_nan_update_like_a_plain_loop(backend):
    X, y = _data()
    switch = Switch(backend, "float32")
    trainer = StabilityTrainer(MLP((3, 4, 1)), stabilize.safe_mse, FaultySGD(switch, lr=0.01), backend=backend,
                               dtype="float32", on_nonfinite="ignore", progress=False)
    switch.set(1.0)
    h = trainer.fit(X[:16], y[:16], batch_size=16)
    assert h.events[0].action == "applied" and h.first_nonfinite_step == 0 and h.events[0].nonfinite == ("weights",)
    assert not all(np.isfinite(w).all() for w in trainer.get_weights())


def test_rollback_leaves_out_the_implicated_rows_for_the_rest_of_the_fit(backend):
    X, y = _data(64)
    y = y.copy()
    y[[3, 40]] = np.nan  # two poisoned rows; batches of 8 without shuffling
    trainer = StabilityTrainer(MLP((3, 4, 1), seed=0), stabilize.safe_mse, SGD(lr=0.05), backend=backend,
                               dtype="float64", on_nonfinite="rollback", max_bad_steps=1, max_rollbacks=5,
                               snapshot_every=1, progress=False)
    h = trainer.fit(X, y, epochs=3, batch_size=8, shuffle=True, seed=0)
    rolled = [e for e in h.events if e.action == "rolled-back"]
    assert len(rolled) == 2  # each poisoned batch is met once, then its rows are left out
    assert trainer.skipped_rows == {3, 40}  # only the offending rows, not their whole batches
    assert np.all(np.isfinite(h.losses[h.committed])) and all(np.isfinite(w).all() for w in trainer.get_weights())
