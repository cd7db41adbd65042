"""Loss spikes with Keras optimizers: keras_guard and StabilityTrainer, skip, clip (ZClip) and rewind.

The detector's limits are a variable of the compiled step (assigned only when they change, never a
retrace); the device compares the step's loss and norm with them. Under ``skip`` a spiking step is held
back like a bad one and recorded as a spike, so a run with spikes ends where a run without those
batches ends, bitwise (float32, CPU, no dropout: the same applied steps in the same order).
"""

import numpy as np
import pytest

N, B, SPIKES = 64, 4, (10, 13)  # 16 batches of 4; batches 10 and 13 have targets x30


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _data(spiked=SPIKES):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True).astype(np.float32)
    for b in spiked:
        y[b * B:(b + 1) * B] *= 30.0
    return X, y


def _without(X, y, left_out):
    keep = np.concatenate([np.arange(b * B, (b + 1) * B) for b in range(N // B) if b not in left_out])
    return X[keep], y[keep]


def _dense():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])


def _values(model, opt):
    import keras

    return [np.array(keras.ops.convert_to_numpy(v), copy=True)
            for v in list(model.trainable_variables) + list(opt.variables)]


def _bitwise(a, b):
    assert len(a) == len(b)
    for x, z in zip(a, b):
        assert x.dtype == z.dtype and np.array_equal(x, z)


def test_keras_guard_skip_holds_spikes_back_as_if_their_batches_were_not_there():
    import keras

    import stabilize

    X, y = _data()
    model, inner = _dense(), keras.optimizers.SGD(0.05)
    opt, cb = stabilize.keras_guard(inner, spike="skip", spike_warmup=5)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, batch_size=B, shuffle=False, verbose=0, callbacks=[cb])
    spikes = [(e.step, e.action) for e in cb.history.events if e.kind == "spike"]
    assert spikes == [(b, "skipped") for b in SPIKES]
    assert cb.supervisor.spikes.spikes == 2 and cb.tracing_count == 1  # new limits never retrace the step
    plain, popt = _dense(), keras.optimizers.SGD(0.05)  # unguarded Keras fit on the 14 other batches
    plain.compile(optimizer=popt, loss="mse")
    plain.fit(*_without(X, y, SPIKES), batch_size=B, shuffle=False, verbose=0)
    _bitwise(_values(model, inner), _values(plain, popt))
    assert int(inner.iterations.numpy()) == N // B - len(SPIKES)


def test_trainer_skip_with_a_keras_optimizer_holds_spikes_back():
    import keras

    from stabilize import StabilityTrainer

    X, y = _data()
    model, opt = _dense(), keras.optimizers.SGD(0.05)
    t = StabilityTrainer(model, "mse", opt, spike="skip", spike_warmup=5, progress=False)
    h = t.fit(X, y, batch_size=B, shuffle=False)
    assert [(e.step, e.action) for e in h.events if e.kind == "spike"] == [(b, "skipped") for b in SPIKES]
    assert t.updater.step.tracing_count == 1 and t.applied_steps == N // B - len(SPIKES)
    rows = t.supervisor.rows
    assert [r["spike"] for r in rows] == [float(i in SPIKES) for i in range(N // B)]
    assert all(r["norm_max"] == np.inf for r in rows[:5]) and np.isfinite(rows[SPIKES[0]]["loss_max"])
    control, copt = _dense(), keras.optimizers.SGD(0.05)
    StabilityTrainer(control, "mse", copt, progress=False).fit(*_without(X, y, SPIKES), batch_size=B, shuffle=False)
    _bitwise(_values(model, opt), _values(control, copt))


def _clipped_step(kind):
    """Warm up on 8 clean batches, then one spiking batch under spike="clip": the weights before and
    after it, the batch, and the step's row."""
    import keras

    import stabilize

    X, y = _data(spiked=(8,))
    model, inner = _dense(), keras.optimizers.SGD(0.05)
    mse = keras.losses.MeanSquaredError()
    if kind == "keras_guard":
        opt, cb = stabilize.keras_guard(inner, spike="clip", spike_warmup=5)
        model.compile(optimizer=opt, loss=mse)
        fit = lambda a, b: model.fit(a, b, batch_size=B, shuffle=False, verbose=0, callbacks=[cb])  # noqa: E731
        sup = cb.supervisor
    else:
        t = stabilize.StabilityTrainer(model, mse, inner, spike="clip", spike_warmup=5, progress=False)
        fit = lambda a, b: t.fit(a, b, batch_size=B, shuffle=False)  # noqa: E731
        sup = t.supervisor
    fit(X[:8 * B], y[:8 * B])
    before = [np.asarray(v.numpy(), dtype=np.float64) for v in model.trainable_variables]
    xb, yb = X[8 * B:9 * B], y[8 * B:9 * B]
    fit(xb, yb)
    after = [np.asarray(v.numpy(), dtype=np.float64) for v in model.trainable_variables]
    return before, after, xb.astype(np.float64), yb.astype(np.float64), sup


@pytest.mark.parametrize("kind", ["keras_guard", "trainer"])
def test_clip_applies_a_spiking_step_with_its_norm_clipped_to_the_limit(kind):
    before, after, xb, yb, sup = _clipped_step(kind)
    row = sup.rows[-1]
    assert row["spike"] == 1.0 and row["committed"] == 1.0 and row["grad_norm"] > row["norm_max"]
    assert [(e.step, e.action) for e in sup.events if e.kind == "spike"] == [(8, "clipped")]
    # float64 reference: Dense(4, tanh) -> Dense(1), mean squared error, one SGD step on clipped gradients
    w1, b1, w2, b2 = before
    h = np.tanh(xb @ w1 + b1)
    r = 2.0 * (h @ w2 + b2 - yb) / len(xb)
    dh = (r @ w2.T) * (1.0 - h * h)
    grads = [xb.T @ dh, dh.sum(0), h.T @ r, r.sum(0)]
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
    np.testing.assert_allclose(row["grad_norm"], norm, rtol=1e-5)
    coef = row["norm_max"] / (norm + 1e-6)
    assert coef < 1.0
    for w, g, a in zip(before, grads, after):
        np.testing.assert_allclose(a, w - 0.05 * coef * g, rtol=1e-5, atol=1e-7)


def test_trainer_rewind_with_a_keras_optimizer_goes_back_and_leaves_batches_out():
    """A spike at batch 10: back to the snapshot of 8 applied steps (2 lost), then batches 11 and 12
    are left out, so the run ends where batches 0-7 then 13-15 end."""
    import keras

    from stabilize import StabilityTrainer

    X, y = _data(spiked=(10,))
    model, opt = _dense(), keras.optimizers.SGD(0.05)
    t = StabilityTrainer(model, "mse", opt, spike="rewind", spike_warmup=5, snapshot_every=4, spike_skip_batches=2,
                         progress=False)
    h = t.fit(X, y, batch_size=B, shuffle=False)
    assert t.held_bytes() == sum(v.nbytes for v in _values(model, opt))
    rewound = [e for e in h.events if e.kind == "spike"]
    assert [(e.step, e.action, e.steps_lost) for e in rewound] == [(10, "rewound", 2)]
    assert [(e.batch_index, e.action) for e in h.events if e.kind == "left-out"] == [(11, "skipped"), (12, "skipped")]
    control, copt = _dense(), keras.optimizers.SGD(0.05)
    StabilityTrainer(control, "mse", copt, progress=False).fit(*_without(X, y, (8, 9, 10, 11, 12)), batch_size=B,
                                                               shuffle=False)
    _bitwise(_values(model, opt), _values(control, copt))


def test_keras_guard_refuses_rewind():
    import keras

    import stabilize

    with pytest.raises(ValueError, match="spike='rewind': it leaves batches out.*StabilityTrainer"):
        stabilize.keras_guard(keras.optimizers.SGD(0.1), spike="rewind")
