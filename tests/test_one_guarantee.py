"""The eight drifts of issue 16, each reproduced as a user would meet it, then held fixed.

Every test here failed on main before the fix (clip_value crashed the torch step; the Keras trainer
ran a rewind's lowered rate at the full rate; a finite spike took the diagnosis slot; a GradScaler
turned a spike into its own overflow skip; the float64 Keras trainer drifted from the plain loop; a
GuardedOptimizer alone left BatchNorm NaN and needed a hidden import to reload; an accumulated step
was diagnosed from a micro-batch that could not show the fault; the neutral step compared the spike
limits rounded to the parameters' dtype).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import load_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch():
    load_backend("torch")
    import torch

    return torch


def _net(torch, seed=0, dtype=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model.to(dtype) if dtype is not None else model


def _batches(torch, n=6, dtype=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, generator=g)
        y = 3.0 * x.sum(1, keepdim=True) + 1.0
        out.append((x.to(dtype), y.to(dtype)) if dtype is not None else (x, y))
    return out


# -- 1. clip_value on the synchronous torch step ------------------------------------------------------
def test_1_clip_value_clamps_the_torch_step_like_clip_grad_value():
    torch = _torch()
    import stabilize

    plain = _net(torch)
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    guarded = _net(torch)
    gopt = torch.optim.SGD(guarded.parameters(), lr=0.1)
    guard = stabilize.TorchGuard(guarded, gopt, clip_value=0.5)
    for x, y in _batches(torch):
        popt.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        torch.nn.utils.clip_grad_value_(plain.parameters(), 0.5)
        popt.step()
        assert guard.step(torch.nn.functional.mse_loss(guarded(x), y)) is True
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)


def test_1_clip_value_in_the_trainer_with_a_torch_optimizer():
    torch = _torch()
    from stabilize import StabilityTrainer

    data = _batches(torch, 4)
    X = torch.cat([x for x, _ in data]).numpy()
    y = torch.cat([t for _, t in data]).numpy()
    plain = _net(torch)
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for i in range(0, 32, 8):
        popt.zero_grad()
        torch.nn.functional.mse_loss(plain(torch.as_tensor(X[i:i + 8])), torch.as_tensor(y[i:i + 8])).backward()
        torch.nn.utils.clip_grad_value_(plain.parameters(), 0.5)
        popt.step()
    model = _net(torch)
    t = StabilityTrainer(model, torch.nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                         clip_value=0.5, progress=False)
    h = t.fit(X, y, batch_size=8, shuffle=False)
    assert h.committed.all() and h.first_nonfinite_step is None and not h.events
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


# -- 2. the Supervisor hands out the whole rate; Keras applies it as given ----------------------------
def test_2_keras_trainer_runs_the_lowered_rate_after_a_rewind():
    load_backend("tensorflow")
    import keras

    from stabilize import StabilityTrainer, scenarios

    def dense(seed=0):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(32, activation="relu", dtype="float64"),
                                 keras.layers.Dense(1, dtype="float64")])

    case = scenarios.build("loss-spike", "diverging")
    model = dense()
    t = StabilityTrainer(model, "mse", keras.optimizers.SGD(0.01), spike="rewind", spike_warmup=10, snapshot_every=5,
                         spike_skip_batches=3, spike_lr_factor=0.5, spike_lr_steps=4, progress=False)
    h = t.fit(case.x, case.y, epochs=1, batch_size=32, shuffle=False, max_steps=25)
    assert [(e.step, e.action) for e in h.events if e.kind == "spike"] == [(24, "rewound")]
    before = [np.array(w, copy=True) for w in model.get_weights()]
    x, y = case.x[832:960], case.y[832:960]
    h = t.fit(x, y, epochs=1, batch_size=32, shuffle=False, max_steps=1)
    assert h.lrs.tolist() == [float(np.float32(0.01)) * 0.5] and h.committed.tolist() == [True]  # Keras's float32 rate
    ref = dense()
    ref.set_weights(before)
    StabilityTrainer(ref, "mse", keras.optimizers.SGD(0.005), progress=False).fit(x[96:], y[96:], batch_size=32,
                                                                                   shuffle=False)
    for got, want in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_2_the_rate_is_one_record_with_one_formula():
    from stabilize.guard.settings import GuardSettings
    from stabilize.guard.supervisor import Rate, Supervisor

    sup = Supervisor(GuardSettings(on_nonfinite="backoff", min_lr=0.004, spike="rewind", spike_lr_factor=0.5,
                                   spike_lr_steps=2))
    assert sup.rate() == Rate(1.0, 0.004, 1.0) and sup.lr(0.01) == 0.01
    sup.policy.backoffs, sup.lowered = 1, 2
    rate = sup.rate()
    assert rate == Rate(0.5, 0.004, 0.5)
    # back-off floored at min_lr, then the spike lowering: max(0.01 * 0.5, min(0.004, 0.01)) * 0.5
    assert sup.lr(0.01) == rate.apply(0.01) == 0.0025
    sup.policy.backoffs = 2  # 0.01 * 0.25 = 0.0025 is below the floor: 0.004, then halved
    assert sup.lr(0.01) == 0.002
    assert sup.rate().apply(0.001) == 0.0005  # a schedule already below min_lr is left as it is, then lowered


# -- 3. only non-finite steps are diagnosed, the first one ----------------------------------------------
def test_3_a_finite_spike_does_not_take_the_diagnosis_slot_in_torch_guard():
    torch = _torch()
    import stabilize

    model = _net(torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, spike="skip", spike_warmup=4, loss_fn=torch.nn.functional.mse_loss)
    for step, (x, y) in enumerate(_batches(torch, 14)):
        if step == 7:
            y = y * 300.0  # a finite spike
        if step == 12:
            x = x.clone()
            x[0, 0] = float("nan")
        guard.step(torch.nn.functional.mse_loss(model(x), y), batch=(x, y))
    h = guard.history
    assert [(e.step, e.kind) for e in h.events] == [(7, "spike"), (12, "nonfinite")]
    assert h.diagnosis is not None and h.diagnosis.step == 12


def test_3_a_clipped_spike_is_not_diagnosed_by_torch_guard():
    torch = _torch()
    import stabilize

    model = _net(torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, spike="clip", spike_warmup=4, loss_fn=torch.nn.functional.mse_loss)
    for step, (x, y) in enumerate(_batches(torch, 10)):
        guard.step(torch.nn.functional.mse_loss(model(x), y * (300.0 if step == 7 else 1.0)), batch=(x, y))
    h = guard.history
    assert [(e.step, e.action) for e in h.events] == [(7, "clipped")] and h.diagnosis is None


# -- 4. a GradScaler never turns a finite spike into its own overflow skip -----------------------------
def test_4_gradscaler_with_spike_skip_counts_the_spike():
    torch = _torch()
    import stabilize

    model = _net(torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = stabilize.TorchGuard(model, opt, scaler=scaler, spike="skip", spike_warmup=4)
    scales = []
    for step, (x, y) in enumerate(_batches(torch, 10)):
        applied = guard.step(torch.nn.functional.mse_loss(model(x), y * (300.0 if step == 7 else 1.0)))
        assert applied == (step != 7)
        scales.append(scaler.get_scale())
    h = guard.history
    assert [(e.step, e.kind, e.action) for e in h.events] == [(7, "spike", "skipped")]
    assert guard.supervisor.spikes.spikes == 1
    assert scales[7] == scales[6]  # the scaler saw no overflow: its scale did not back off


def test_4_the_verdict_names_a_scaler_skip_only_for_non_finite_gradients():
    from stabilize.guard.stats import StepStats, scaler_overflow, verdict

    assert not scaler_overflow(True, True, True, 256.0, 1.0)  # finite gradients: a spike, never an overflow
    assert scaler_overflow(True, False, True, 256.0, 1.0)
    assert not scaler_overflow(True, False, True, 0.5, 1.0)  # the scale collapsed: the policy's
    assert not scaler_overflow(False, False, True, 256.0, 1.0)  # a non-finite loss: the policy's
    assert verdict(StepStats(loss=5.0, grad_norm=9.0, committed=0.0, spike=1.0)) == "spike"
    overflow = StepStats(loss=5.0, grad_norm=float("inf"), grads_finite=0.0, committed=0.0)
    assert verdict(overflow) == "nonfinite" and verdict(overflow._replace(scaler_skip=1.0)) == "scaler-skip"
    assert verdict(StepStats(loss=1.0, grad_norm=1.0, large_update=1.0, committed=0.0)) == "large-update"
    assert verdict(StepStats(loss=1.0, grad_norm=1.0, committed=1.0)) == "committed"


# -- 5. the float64 Keras trainer is the plain Keras loop, bit for bit ---------------------------------
def test_5_keras_trainer_on_a_float64_model_is_bitwise_the_plain_loop():
    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    import stabilize
    from stabilize import StabilityTrainer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 3))
    y = X.sum(1, keepdims=True) ** 2

    def dense():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh", dtype="float64"),
                                 keras.layers.Dense(1, dtype="float64")])

    plain, popt = dense(), keras.optimizers.Adam(0.01)
    loss = keras.losses.MeanSquaredError()
    for i in range(0, 32, 8):  # the plain loop, clipped by the library's own clip_grads (float64 here)
        with tf.GradientTape() as tape:
            value = loss(y[i:i + 8], plain(X[i:i + 8], training=True))
        grads, _ = stabilize.clip_grads(tape.gradient(value, plain.trainable_variables), max_norm=1.0)
        popt.apply(grads, plain.trainable_variables)
    model, opt = dense(), keras.optimizers.Adam(0.01)
    h = StabilityTrainer(model, loss, opt, clip_norm=1.0, progress=False).fit(X, y, batch_size=8, shuffle=False)
    assert (h.grad_norms > 1.0).all()  # every step was clipped: the clip coefficient is compared too
    for a, b in zip(plain.get_weights() + [v.numpy() for v in popt.variables],
                    model.get_weights() + [v.numpy() for v in opt.variables]):
        np.testing.assert_array_equal(a, b)


# -- 6. a GuardedOptimizer without its callback; a reload needs only `import stabilize` -----------------
def _bn_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                             keras.layers.Dense(1)])


def test_6_guarded_optimizer_alone_refuses_to_train_naming_the_callback():
    load_backend("tensorflow")
    import keras

    import stabilize

    opt, _ = stabilize.keras_guard(keras.optimizers.SGD(0.01))
    model = _bn_model()
    model.compile(optimizer=opt, loss="mse")
    X = np.ones((8, 3), np.float32)
    X[0, 0] = np.nan
    with pytest.raises(RuntimeError, match="callbacks=\\[cb\\]"):
        model.fit(X, np.ones((8, 1), np.float32), batch_size=8, verbose=0)
    bn = model.layers[1]
    assert np.isfinite(bn.moving_mean.numpy()).all() and np.isfinite(bn.moving_variance.numpy()).all()


@pytest.mark.slow  # a subprocess that imports TensorFlow and Keras
def test_6_a_saved_guarded_model_reloads_after_only_import_stabilize(tmp_path):
    load_backend("tensorflow")
    import keras

    import stabilize

    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(1e-3), clip_norm=1.0)
    model = _bn_model()
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3), np.float32), np.ones((8, 1), np.float32), verbose=0, callbacks=[cb])
    model.save(tmp_path / "m.keras")
    for first, second in (("stabilize", "keras"), ("keras", "stabilize")):
        code = textwrap.dedent(f"""
            import sys
            import {first}, {second}
            m = keras.models.load_model(sys.argv[1])
            print(type(m.optimizer).__name__, m.optimizer.settings.clip_norm)
        """)
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.keras")], capture_output=True, text=True,
                             env=env, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-2:] == ["GuardedOptimizer", "1.0"]


# -- 7. gradient accumulation: the diagnosis never contradicts the step -------------------------------
def test_7_a_nan_in_an_earlier_micro_batch_is_not_blamed_on_the_last_one():
    torch = _torch()
    import stabilize

    model = _net(torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, loss_fn=torch.nn.functional.mse_loss)
    (x1, y1), (x2, y2) = _batches(torch, 2)
    x1 = x1.clone()
    x1[0, 0] = float("nan")
    guard.backward(torch.nn.functional.mse_loss(model(x1), y1) / 2)
    assert guard.step(torch.nn.functional.mse_loss(model(x2), y2) / 2, batch=(x2, y2)) is False
    d = guard.history.diagnosis
    assert d is not None and d.step == 0
    assert d.cause == "unknown" and "micro-batch 1 of 2" in d.line() and d.evidence["micro-batches"] == 2
    assert "overflow" not in d.line()


# -- 8. the neutral step compares the spike limits in float64 ------------------------------------------
def test_8_neutral_step_compares_spike_limits_in_float64():
    torch = _torch()
    from stabilize.backends.torch import TorchBackend  # noqa: F401 - the backend the spec runs on
    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.neutral import NeutralUpdater
    from stabilize.models import MLP
    from stabilize.optim import SGD
    from stabilize.registry import get_backend

    B = get_backend("torch")
    model = B.build_mlp(MLP((3, 1), seed=0), "float32", None)
    params = B.parameters(model)
    upd = NeutralUpdater(B, model, params, SGD(lr=1e-30), lambda p, t: ((p - t) ** 2).mean(),
                         GuardSettings(spike="skip"))
    x = torch.ones(4, 3)
    y = torch.zeros(4, 1)
    with torch.no_grad():
        loss = float(((model(x) - y) ** 2).mean().double())
    # a limit just below the float32 loss but above it once rounded to float32: float64 says "spike"
    limit = np.nextafter(loss, -np.inf)
    assert np.float32(limit) == np.float32(loss)
    upd.limits = lambda: (limit, float("inf"))
    stats = upd.run(x, y, lambda base: base)
    assert stats["spike"] == 1.0 and stats["committed"] == 0.0
