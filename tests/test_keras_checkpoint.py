"""keras_guard checkpoints: N steps, save, load into fresh objects, N steps == 2N steps straight, bitwise."""

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import stabilize
from stabilize.checkpoint import CheckpointError, load

BS, N = 8, 3


def data():
    rng = np.random.RandomState(0)
    X = rng.randn(2 * N * BS, 4).astype("float32")
    Y = (X @ np.array([1.0, -2.0, 0.5, 1.0], "float32"))[:, None]
    X[BS + 1, 0] = np.nan  # step 1: a bad batch the guard skips (the history must carry over)
    return X, Y


def build(seed, width=8):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.3), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-2), clip_norm=1.0, on_nonfinite="backoff")
    model.compile(optimizer=opt, loss="mse")
    return model, opt, cb


def fit(model, cb, X, Y):
    model.fit(X, Y, batch_size=BS, epochs=1, shuffle=False, callbacks=[cb], verbose=0)


def values(model, opt):
    return [np.array(v.numpy()) for v in list(model.variables) + list(opt.variables)]


def sup(cb):  # the Supervisor's state as JSON: NaN losses compare equal, tuples as lists
    return json.dumps(cb.supervisor.state_dict(), sort_keys=True)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)


@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_resume_is_bitwise_equal_to_a_straight_run(tmp_path):
    X, Y = data()
    m1, o1, c1 = build(0)
    fit(m1, c1, X, Y)

    m2, o2, c2 = build(0)
    fit(m2, c2, X[: N * BS], Y[: N * BS])
    np.random.seed(5)
    path = c2.save_checkpoint(tmp_path / "run.ckpt", epoch=0, batch=N)
    expected_draw = np.random.rand()
    saved = load(path)
    paths = [p for p, _, _ in saved["keras"]["model"]["spec"]]
    assert any("seed_generator" in p for p in paths) and any("moving_mean" in p for p in paths)
    assert any("iteration" in p for p, _, _ in saved["keras"]["optimizer"]["spec"])

    m3, o3, c3 = build(1)  # fresh objects, another initialization, an unbuilt optimizer
    np.random.seed(99)
    assert c3.load_checkpoint(path, model=m3) == {"epoch": 0, "batch": N}
    assert np.random.rand() == expected_draw  # numpy's RNG came back
    assert sup(c3) == sup(c2)
    fit(m3, c3, X[N * BS:], Y[N * BS:])

    assert_same(values(m3, o3), values(m1, o1))
    assert int(o3.iterations.numpy()) == int(o1.iterations.numpy()) == 2 * N - 1  # one step skipped
    assert [r["committed"] for r in c3.supervisor.rows] == [r["committed"] for r in c1.supervisor.rows]
    assert float(o3.state.lr_factor.numpy()) == float(o1.state.lr_factor.numpy()) < 1.0


@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_a_corrupt_or_foreign_checkpoint_changes_nothing(tmp_path):
    X, Y = data()
    m, o, c = build(0)
    fit(m, c, X[: N * BS], Y[: N * BS])
    path = c.save_checkpoint(tmp_path / "run.ckpt")
    other, _, oc = build(2, width=5)
    fit(other, oc, X[:BS], Y[:BS])
    foreign = oc.save_checkpoint(tmp_path / "other.ckpt")

    m2, o2, c2 = build(3)
    fit(m2, c2, X[:BS], Y[:BS])
    before, sup_before = values(m2, o2), sup(c2)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(raw))
    for broken in (bad, foreign):
        with pytest.raises(CheckpointError):
            c2.load_checkpoint(broken, model=m2)
        assert_same(values(m2, o2), before)
        assert sup(c2) == sup_before
    c2.load_checkpoint(path, model=m2)  # the good one still loads
    assert_same(values(m2, o2), values(m, o))


@pytest.mark.slow  # a long fit (about 3 s of CPU or more)
def test_trainer_keras_path_resumes_bitwise(tmp_path):
    rng = np.random.RandomState(1)
    X = rng.randn(64, 3).astype("float32")
    y = X.sum(1, keepdims=True).astype("float32")
    X[5, 1] = np.nan

    def make(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dropout(0.2), keras.layers.Dense(1)])
        opt = keras.optimizers.Adam(1e-2)
        t = stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", max_bad_steps=1,
                                       snapshot_every=2, progress=False, diagnose=False)
        return t, model, opt

    straight, sm, so = make(0)
    straight.fit(X, y, epochs=1, batch_size=16, seed=3)
    straight.fit(X, y, epochs=1, batch_size=16, seed=4)
    half, _, _ = make(0)
    half.fit(X, y, epochs=1, batch_size=16, seed=3)
    path = half.save_checkpoint(tmp_path / "t.ckpt")
    resumed, rm, ro = make(7)  # fresh objects, another initialization
    before = values(rm, ro)
    with pytest.raises(CheckpointError):  # a keras_guard checkpoint is not a trainer's: nothing changes
        m, _o, c = build(0)
        fit(m, c, *[a[:8] for a in data()])
        resumed.load_checkpoint(c.save_checkpoint(tmp_path / "guard.ckpt"))
    assert_same(values(rm, ro), before)
    resumed.load_checkpoint(path)
    resumed.fit(X, y, epochs=1, batch_size=16, seed=4)
    assert_same(values(rm, ro), values(sm, so))
    assert np.array_equal(resumed.history.losses, straight.history.losses, equal_nan=True)
    assert [str(e) for e in resumed.history.events] == [str(e) for e in straight.history.events]
    assert resumed.applied_steps == straight.applied_steps


def _forged(path, target, edit, kind):
    """A checkpoint with a valid checksum whose late section is wrong: the load must refuse it whole."""
    from stabilize import checkpoint

    state = checkpoint.load(path)
    edit(state)
    return checkpoint.save(target, state, meta={"kind": kind})


def _rng_garbage(s):
    s["rng"]["python"] = (3, (1, 2), None)


def _rows(s):
    s["supervisor"]["rows"] = "x"


def _dtype(s):
    s["keras"]["model"]["values"][0] = s["keras"]["model"]["values"][0].astype("float64")


@pytest.mark.parametrize("edit, message", [(_rng_garbage, "RNG"), (_rows, "policy state"), (_dtype, "float32")])
def test_keras_guard_refuses_a_late_bad_section_before_changing_anything(tmp_path, edit, message):
    """Issue 17, failure 2 on the keras path: the variables were assigned before the policy state and the
    RNG were read, so a bad late section left the model overwritten."""
    X, Y = data()
    m, o, c = build(0)
    fit(m, c, X[: N * BS], Y[: N * BS])
    path = c.save_checkpoint(tmp_path / "run.ckpt", epoch=0)
    bad = _forged(path, tmp_path / "bad.ckpt", edit, "keras_guard")
    fit(m, c, X[N * BS:], Y[N * BS:])
    np.random.seed(11)
    before, sup_before, draw_state = values(m, o), sup(c), np.random.get_state()[1].copy()
    with pytest.raises(CheckpointError, match=message):
        c.load_checkpoint(bad, model=m)
    assert_same(values(m, o), before)
    assert sup(c) == sup_before and np.array_equal(np.random.get_state()[1], draw_state)


def test_trainer_keras_path_refuses_a_late_bad_section(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(1e-2)
    t = stabilize.StabilityTrainer(model, "mse", opt, progress=False, diagnose=False)
    X = np.random.RandomState(0).randn(32, 3).astype("float32")
    t.fit(X, X.sum(1, keepdims=True), epochs=1, batch_size=8)
    path = t.save_checkpoint(tmp_path / "t.ckpt")
    t.fit(X, X.sum(1, keepdims=True), epochs=1, batch_size=8)

    def late(s):
        s["keras"]["rng"]["python"] = (3, (1, 2), None)

    bad = _forged(path, tmp_path / "bad.ckpt", late, "StabilityTrainer")
    before, rows = values(model, opt), json.dumps(t.supervisor.state_dict(), sort_keys=True)
    with pytest.raises(CheckpointError, match="RNG"):
        t.load_checkpoint(bad)
    assert_same(values(model, opt), before)
    assert json.dumps(t.supervisor.state_dict(), sort_keys=True) == rows and t._epoch == 2
