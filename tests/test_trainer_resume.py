"""StabilityTrainer resume (issue 17, failure 8): separate fits chain like one, mid-fit checkpoints
continue bit-identically, and epoch numbers continue across resumes."""

import numpy as np
import pytest

import stabilize
from stabilize.checkpoint import CheckpointError

torch = pytest.importorskip("torch")

X = np.random.default_rng(0).normal(size=(60, 3))
Y = X.sum(1, keepdims=True)
X[7, 1] = np.nan  # a bad row: a skipped step, with an event, in every epoch


def make(seed=0, **settings):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    return stabilize.StabilityTrainer(model, "mse", opt, schedule=sched, progress=False, diagnose=False,
                                      on_nonfinite="backoff", **settings)


def record(t) -> dict:
    return {"weights": t.get_weights(), "rows": [dict(r) for r in t.supervisor.rows],
            "events": [str(e) for e in t.supervisor.events], "rng": torch.get_rng_state(), "lr": t.current_lr(),
            "opt": [v.clone() for st in t.optimizer.state.values() for v in st.values()]}


def assert_identical(a, b):
    assert len(a["weights"]) == len(b["weights"]) and all(np.array_equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert all(torch.equal(x, y) for x, y in zip(a["opt"], b["opt"])) and torch.equal(a["rng"], b["rng"])
    assert len(a["rows"]) == len(b["rows"])
    for ra, rb in zip(a["rows"], b["rows"]):  # every number, NaN included, bit for bit
        assert ra.keys() == rb.keys() and all(
            ra[k] == rb[k] or (isinstance(ra[k], float) and np.isnan(ra[k]) and np.isnan(rb[k])) for k in ra), (ra, rb)
    assert a["events"] == b["events"] and a["lr"] == b["lr"]


def test_two_fits_with_a_resume_between_equal_one_fit(tmp_path):
    """fit(epochs=1) + save + load + fit(epochs=1) == fit(epochs=2): the shuffle follows the global epoch."""
    straight = make()
    straight.fit(X, Y, epochs=2, batch_size=16, seed=3)
    first = make()
    first.fit(X, Y, epochs=1, batch_size=16, seed=3)
    first.save_checkpoint(tmp_path / "t.ckpt")
    resumed = make(seed=9)  # other initial weights: the checkpoint brings everything back
    resumed.load_checkpoint(tmp_path / "t.ckpt")
    resumed.fit(X, Y, epochs=1, batch_size=16, seed=3)
    assert_identical(record(resumed), record(straight))
    assert [r["epoch"] for r in resumed.supervisor.rows] == [0] * 4 + [1] * 4  # epochs continue
    assert [e.epoch for e in resumed.supervisor.events] == [0, 1]
    chained = make()  # the same without a checkpoint
    chained.fit(X, Y, epochs=1, batch_size=16, seed=3)
    chained.fit(X, Y, epochs=1, batch_size=16, seed=3)
    assert_identical(record(chained), record(straight))


@pytest.mark.parametrize("every", [3, 5])
def test_a_mid_epoch_checkpoint_continues_bit_identically(tmp_path, every):
    """A crash inside fit: the last checkpoint_every checkpoint, loaded by a fresh trainer, and the same
    fit call finish the run exactly as the uninterrupted one (batches, RNG, records, events)."""
    straight = make()
    straight.fit(X, Y, epochs=3, batch_size=16, seed=1)
    path = tmp_path / "mid.ckpt"
    crashed = make()
    crashed.fit(X, Y, epochs=3, batch_size=16, seed=1, checkpoint_path=path, checkpoint_every=every,
                max_steps=every + 2)  # "killed" two steps after its last checkpoint
    resumed = make(seed=4)
    resumed.load_checkpoint(path)
    assert resumed.step_count == every
    resumed.fit(X, Y, epochs=3, batch_size=16, seed=1, checkpoint_path=path, checkpoint_every=every,
                checkpoint_epochs=True)
    assert_identical(record(resumed), record(straight))
    assert [r["epoch"] for r in resumed.supervisor.rows] == [0] * 4 + [1] * 4 + [2] * 4
    again = make()  # the checkpoint written at the very end of that fit holds the finished run
    again.load_checkpoint(path)
    assert again._resume is None and again._epoch == 3 and again.step_count == 12


def test_epoch_end_checkpoints_and_a_mismatched_continuation(tmp_path):
    path = tmp_path / "e.ckpt"
    straight = make()
    straight.fit(X, Y, epochs=2, batch_size=16, seed=2)
    t = make()
    t.fit(X, Y, epochs=2, batch_size=16, seed=2, checkpoint_path=path, max_steps=6)  # after epoch 0's checkpoint
    resumed = make()
    resumed.load_checkpoint(path)
    with pytest.raises(ValueError, match="batch_size=16 \\(now 8\\)"):
        resumed.fit(X, Y, epochs=2, batch_size=8, seed=2)
    resumed.fit(X, Y, epochs=2, batch_size=16, seed=2)
    assert_identical(record(resumed), record(straight))


def test_a_refused_trainer_load_changes_nothing(tmp_path):
    from stabilize import checkpoint

    t = make()
    t.fit(X, Y, epochs=1, batch_size=16)
    path = t.save_checkpoint(tmp_path / "t.ckpt")
    t.fit(X, Y, epochs=1, batch_size=16)
    state = checkpoint.load(path)
    state["data"]["fit"] = {"epoch": 1}
    bad = checkpoint.save(tmp_path / "bad.ckpt", state, meta={"kind": "StabilityTrainer"})
    before = record(t)
    epoch, applied = t._epoch, t.applied_steps
    with pytest.raises(CheckpointError, match="data position"):
        t.load_checkpoint(bad)
    lin = torch.nn.Linear(3, 1)
    guard_file = stabilize.TorchGuard(lin, torch.optim.SGD(lin.parameters(), lr=1))
    with pytest.raises(CheckpointError, match="written by TorchGuard"):
        t.load_checkpoint(guard_file.save_checkpoint(tmp_path / "g.ckpt"))
    before["rng"] = torch.get_rng_state()  # building the guard's model drew from the RNG; nothing else moved
    assert_identical(record(t), before)
    assert (t._epoch, t.applied_steps) == (epoch, applied)
