"""The settings x entry-point x fault matrix: one guarantee, whichever way in.

Every cell trains the same float64 MLP (the same initial weights in torch and Keras) on the same 12
batches, with one fault at batch 7 (after the spike warm-up), and reduces the run to its outcome:
the committed flag of every step, every rate, the events as ``(step, kind, action)``, the applied
and spike counters, the diagnosed step, and the step a run stopped at. Each cell must equal its
reference cell (``trainer-torch`` with the same setting and fault), or be refused at construction
with the message from the one table (:mod:`stabilize.guard.entries`).

Entry points: ``trainer-torch`` (torch.optim), ``trainer-neutral`` (a ``stabilize.optim`` spec over
the torch model), ``trainer-keras`` (a Keras model and optimizer), ``TorchGuard`` (synchronous),
``TorchGuard(sync_free)``, ``keras_guard`` in ``model.fit``.

Faults: clean; NaN in an input (``nan-batch``); an inf loss whose gradients are finite (``inf-loss``);
a finite loss with NaN gradients (``nan-grad``: ``sqrt`` at exactly 0 in the loss); a finite spike (the
targets x300); a NaN BatchNorm statistic (``nan-buffer``: a NaN input through a BatchNorm model; a
``stabilize.optim`` spec cannot hold buffers, so that column is left out for ``trainer-neutral``).

Sampling (the cross product is 19 settings x 6 entry points x 6 faults = 684 cells): the four torch
entry points run every cell (cheap: no tracing). The two Keras entry points (a ``tf.function`` trace
each) run, per setting, the clean run and one fault chosen by rotation (the setting's index in
SETTINGS, plus 0 for ``trainer-keras`` and 3 for ``keras_guard``, modulo the five faults), so that over
the settings every fault meets both Keras entry points. The size is printed by
``test_matrix_size`` and checked there.

Healthy runs are bitwise the plain loop in float32 and float64, on torch and Keras
(:func:`test_healthy_runs_are_the_plain_loop_bitwise`).
"""

import math

import numpy as np
import pytest

from conftest import load_backend

torch = pytest.importorskip("torch")
# the targets carry two fault flags beside the target column, which the loss reads apart on purpose
pytestmark = pytest.mark.filterwarnings("ignore:the model's output has shape")

# Known divergences, each a failing cell kept as a strict xfail until fixed (reported, not hidden):
# rollback and auto now act on the diagnosed cause (the supervisor diagnoses before the policy), and the
# Keras replay of the nan-grad fault names another cause than torch's (tf.Mean against torch.sqrt).
KNOWN = {("snapshot_to=host", "keras_guard", "nan-grad"): "the Keras diagnosis of a sqrt-at-0 gradient names "
         "exploding-gradients, torch's a singular op, and the policy acts on the cause",
         ("auto", "TorchGuard(sync_free)", "inf-loss"): "auto acts on the diagnosed cause; sync_free reads the step "
         "one step late and has no batch left to diagnose, so it backs off where the others stop",
         ("auto", "TorchGuard(sync_free)", "nan-grad"): "as for inf-loss: no diagnosis under sync_free"}

N, BATCH, FAULT_AT = 48, 4, 7
FAULTS = ("nan-batch", "inf-loss", "nan-grad", "spike", "nan-buffer")
ENTRIES = ("trainer-torch", "trainer-neutral", "TorchGuard", "TorchGuard(sync_free)", "trainer-keras", "keras_guard")
TORCH_ENTRIES = ENTRIES[:4]
SPIKE = {"spike_warmup": 4, "spike_z": 4.0}
SETTINGS = {
    "default": {},
    "clip_norm": {"clip_norm": 0.5},
    "clip_value": {"clip_value": 0.05},
    "skip": {"on_nonfinite": "skip"},
    "backoff+grow_after": {"on_nonfinite": "backoff", "grow_after": 2},
    "rollback": {"on_nonfinite": "rollback", "max_bad_steps": 1, "snapshot_every": 2},
    "raise": {"on_nonfinite": "raise"},
    "auto": {"on_nonfinite": "auto"},
    "ignore": {"on_nonfinite": "ignore"},
    "max_update_ratio": {"max_update_ratio": 0.5},
    "verify_updates": {"verify_updates": True},
    "spike=clip": {"spike": "clip", **SPIKE},
    "spike=skip": {"spike": "skip", **SPIKE},
    "spike=rewind": {"spike": "rewind", "snapshot_every": 2, "spike_skip_batches": 2, "spike_lr_factor": 0.5,
                     "spike_lr_steps": 2, **SPIKE},
    "snapshot_to=host": {"on_nonfinite": "rollback", "max_bad_steps": 1, "snapshot_every": 2, "snapshot_to": "host"},
    "snapshot_to=disk": {"on_nonfinite": "rollback", "max_bad_steps": 1, "snapshot_every": 2, "snapshot_to": "disk"},
    "skip_alarm": {"skip_alarm": "raise", "skip_alarm_window": 4, "skip_alarm_fraction": 0.2},
    "min_lr": {"on_nonfinite": "backoff", "min_lr": 0.04, "grow_after": None},
    "scaler": {"scaler": "GradScaler"},
}


def _cells():
    names = list(SETTINGS)
    cells = []
    for i, name in enumerate(names):
        for fault in ("clean",) + FAULTS:
            for entry in TORCH_ENTRIES:
                if not (entry == "trainer-neutral" and fault == "nan-buffer"):
                    cells.append((name, entry, fault))
        for offset, entry in ((0, "trainer-keras"), (3, "keras_guard")):
            for fault in ("clean", FAULTS[(i + offset) % len(FAULTS)]):
                cells.append((name, entry, fault))
    return cells


CELLS = _cells()


# -- data, models, losses ---------------------------------------------------------------
def _data(fault):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 3))
    y = np.stack([np.tanh(X @ np.array([1.0, -2.0, 0.5])), np.zeros(N), np.zeros(N)], axis=1)  # target, 2 flags
    rows = slice(FAULT_AT * BATCH, (FAULT_AT + 1) * BATCH)
    if fault in ("nan-batch", "nan-buffer"):
        X[FAULT_AT * BATCH + 1, 0] = np.nan
    elif fault == "inf-loss":
        y[rows, 1] = 1.0  # -log(1 - flag) = inf: the loss alone, the gradients stay finite
    elif fault == "nan-grad":
        y[rows, 2] = 1.0  # sqrt(flag * (p - p) + 1 - flag) at 0: a finite loss, NaN gradients
    elif fault == "spike":
        y[rows, 0] *= 300.0
    return X, y


def _weights():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(3, 8)) * 0.5, np.zeros(8), rng.normal(size=(8, 1)) * 0.5, np.zeros(1)]


def _torch_model(bn):
    w = _weights()
    layers = [torch.nn.Linear(3, 8)] + ([torch.nn.BatchNorm1d(8)] if bn else []) + [torch.nn.Tanh(),
                                                                                   torch.nn.Linear(8, 1)]
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(w[0].T))
        model[0].bias.copy_(torch.as_tensor(w[1]))
        model[-1].weight.copy_(torch.as_tensor(w[2].T))
        model[-1].bias.copy_(torch.as_tensor(w[3]))
    return model


def _keras_model(bn):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((3,)), keras.layers.Dense(8, dtype="float64")]
    layers += [keras.layers.BatchNormalization(dtype="float64", momentum=0.9, epsilon=1e-5)] if bn else []
    layers += [keras.layers.Activation("tanh", dtype="float64"), keras.layers.Dense(1, dtype="float64")]
    model = keras.Sequential(layers)
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    w = _weights()
    dense[0].set_weights(w[:2])
    dense[1].set_weights(w[2:])
    return model


def _torch_loss(pred, t):
    f1, f2 = t[:, 1:2], t[:, 2:3]
    return ((pred - t[:, :1]) ** 2).mean() - torch.log(1.0 - f1).mean() \
        + torch.sqrt(f2 * (pred - pred) + 1.0 - f2).mean() - 1.0


def _keras_loss(t, pred):
    from keras import ops

    f1, f2 = t[:, 1:2], t[:, 2:3]
    return ops.mean((pred - t[:, :1]) ** 2) - ops.mean(ops.log(1.0 - f1)) \
        + ops.mean(ops.sqrt(f2 * (pred - pred) + 1.0 - f2)) - 1.0


# -- one cell ----------------------------------------------------------------------------
class Refused(Exception):
    pass


def _split(entry, name, tmp_path):
    kw = dict(SETTINGS[name])
    options = {}
    for key in ("verify_updates", "scaler"):
        if key in kw:
            options[key] = kw.pop(key)
    if options.get("scaler") == "GradScaler":
        options["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if kw.get("snapshot_to") == "disk":
        kw["snapshot_path"] = str(tmp_path / f"{entry}.snap")
    return kw, options


def _outcome(sup, raised):
    h = sup.history()
    return {"committed": tuple(bool(c) for c in h.committed), "lrs": tuple(float(v) for v in h.lrs),
            "events": tuple((e.step, e.kind, e.action) for e in h.events), "applied": sup.applied,
            "spikes": sup.spikes.spikes if sup.spikes is not None else 0, "rollbacks": sup.policy.rollbacks,
            "diagnosis": None if h.diagnosis is None else h.diagnosis.step, "raised": raised}


def _run(entry, name, fault, tmp_path):
    from stabilize import NonFiniteError, StabilityTrainer, TorchGuard
    from stabilize.errors import SkipAlarmError
    from stabilize.optim import SGD

    X, y = _data(fault)
    bn = fault == "nan-buffer"
    kw, options = _split(entry, name, tmp_path)
    raised = None
    if entry.startswith("trainer"):
        if entry == "trainer-keras":
            load_backend("tensorflow")
            import keras

            model, opt, loss = _keras_model(bn), keras.optimizers.SGD(0.05), _keras_loss
        else:
            model = _torch_model(bn)
            opt = SGD(lr=0.05) if entry == "trainer-neutral" else torch.optim.SGD(model.parameters(), lr=0.05)
            loss = _torch_loss
        try:
            t = StabilityTrainer(model, loss, opt, progress=False, **options, **kw)
        except (ValueError, TypeError) as exc:
            raise Refused(str(exc)) from exc
        try:
            t.fit(X, y, batch_size=BATCH, shuffle=False)
        except (NonFiniteError, SkipAlarmError):
            raised = t.supervisor.step - 1
        return _outcome(t.supervisor, raised)
    if entry == "keras_guard":
        load_backend("tensorflow")
        import keras

        import stabilize

        model = _keras_model(bn)
        try:
            opt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.05), loss_fn=_keras_loss,
                                            diagnose_data=(X[FAULT_AT * BATCH:(FAULT_AT + 1) * BATCH],
                                                           y[FAULT_AT * BATCH:(FAULT_AT + 1) * BATCH]),
                                            **options, **kw)
        except (ValueError, TypeError) as exc:
            raise Refused(str(exc)) from exc
        model.compile(optimizer=opt, loss=_keras_loss)
        try:
            model.fit(X, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])
        except (NonFiniteError, SkipAlarmError):
            raised = cb.supervisor.step - 1
        return _outcome(cb.supervisor, raised)
    model = _torch_model(bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        guard = TorchGuard(model, opt, loss_fn=_torch_loss, sync_free=entry.endswith("(sync_free)"), **options, **kw)
    except (ValueError, TypeError) as exc:
        raise Refused(str(exc)) from exc
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    try:
        for i in range(0, N, BATCH):
            xb, yb = Xt[i:i + BATCH], yt[i:i + BATCH]
            guard.step(_torch_loss(model(xb), yb), data=(xb, yb))
        guard.flush()
    except (NonFiniteError, SkipAlarmError):
        raised = guard.supervisor.step - 1
    return _outcome(guard.supervisor, raised)


_REFERENCE: dict = {}


def _reference(name, fault, tmp_path):
    key = (name, fault)
    if key not in _REFERENCE:
        _REFERENCE[key] = _run("trainer-torch", name, fault, tmp_path)
    return _REFERENCE[key]


def _expected_refusal(entry, name):
    """The refusals the one table gives for this cell, or None."""
    import dataclasses

    from stabilize.guard.entries import refusals_for
    from stabilize.guard.settings import GuardSettings

    kw = dict(SETTINGS[name])
    values = {k: v for k, v in kw.items() if k not in ("verify_updates", "scaler")}
    values = dict(dataclasses.asdict(GuardSettings(**values, **({"snapshot_path": "x"} if kw.get("snapshot_to") ==
                                                                   "disk" else {}))),
                  verify_updates=kw.get("verify_updates", False), scaler=kw.get("scaler"))
    found = refusals_for(entry, values, kw)
    if entry == "TorchGuard(sync_free)":
        found = refusals_for("TorchGuard", values, kw) or found
    return found


# Where two cells may differ, and why (each a documented property of the entry point):
# - sync_free cannot replay the failing batch (read one step late): no diagnosis to compare;
# - the Keras entry points run Keras's float32 rate variable: rates compared to 1e-7.
def _compare(entry, got, want):
    assert got["committed"] == want["committed"]
    assert got["events"] == want["events"]
    for key in ("applied", "spikes", "rollbacks", "raised"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["lrs"], want["lrs"], rtol=1e-7 if "keras" in entry else 0)
    if entry != "TorchGuard(sync_free)":
        assert got["diagnosis"] == want["diagnosis"]


@pytest.mark.parametrize("name,entry,fault", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason=KNOWN[c])) if c in KNOWN else c for c in CELLS],
    ids=[f"{n}-{e}-{f}" for n, e, f in CELLS])
def test_cell(name, entry, fault, tmp_path):
    if "keras" in entry:
        load_backend("tensorflow")
    refused = _expected_refusal(entry, name)
    try:
        got = _run(entry, name, fault, tmp_path)
    except Refused as exc:
        assert refused, f"{entry} refused {name} without a row in the table: {exc}"
        for reason in refused:
            assert reason in str(exc)
        return
    assert not refused, f"{entry} accepted {name}, which the table refuses: {refused}"
    want = _reference(name, fault, tmp_path)
    if fault == "clean":
        assert all(want["committed"]) and not want["events"] and want["diagnosis"] is None
    elif fault != "spike":  # a non-finite fault is never silent (a finite spike is, unless watched)
        assert want["events"] or want["raised"] is not None, (name, fault, want)
    _compare(entry, got, want)


def test_matrix_size():
    full = len(SETTINGS) * len(ENTRIES) * (len(FAULTS) + 1)
    assert full == 19 * 6 * 6
    assert len(CELLS) == 19 * (4 * 6 - 1) + 19 * 2 * 2
    print(f"matrix: {len(CELLS)} of {full} cells run")


# -- healthy runs are the plain loop, bit for bit ---------------------------------------------
def _plain_torch(dtype, X, y):
    model = _torch_model(False).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, N, BATCH):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[i:i + BATCH]), y[i:i + BATCH]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()] + [opt.state[p]["momentum_buffer"] for p in model.parameters()]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_healthy_torch_runs_are_the_plain_loop_bitwise(dtype):
    from stabilize import StabilityTrainer, TorchGuard

    dt = getattr(torch, dtype)
    X, y = _data("clean")
    Xt, yt = torch.as_tensor(X, dtype=dt), torch.as_tensor(y[:, :1], dtype=dt)
    want = _plain_torch(dt, Xt, yt)
    for entry in ("trainer-torch", "TorchGuard", "TorchGuard(sync_free)"):
        model = _torch_model(False).to(dt)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if entry == "trainer-torch":
            StabilityTrainer(model, torch.nn.functional.mse_loss, opt, clip_norm=1e9, progress=False).fit(
                X.astype(dtype), y[:, :1].astype(dtype), batch_size=BATCH, shuffle=False)
        else:
            guard = TorchGuard(model, opt, clip_norm=1e9, sync_free=entry.endswith("(sync_free)"))
            for i in range(0, N, BATCH):
                guard.step(torch.nn.functional.mse_loss(model(Xt[i:i + BATCH]), yt[i:i + BATCH]))
            guard.flush()
        got = [p.detach() for p in model.parameters()] + [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), entry


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_healthy_keras_runs_are_the_plain_loop_bitwise(dtype):
    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    import stabilize
    from stabilize import StabilityTrainer

    X, y = _data("clean")
    X, y = X.astype(dtype), y[:, :1].astype(dtype)

    def model_of():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh", dtype=dtype),
                              keras.layers.Dense(1, dtype=dtype)])
        w = _weights()
        m.set_weights([v.astype(dtype) for v in w])
        return m

    def state(m, opt):
        return [np.asarray(v) for v in m.get_weights()] + [np.asarray(v.numpy()) for v in opt.variables]

    mse = keras.losses.MeanSquaredError()
    plain, popt = model_of(), keras.optimizers.SGD(0.05, momentum=0.9)
    for i in range(0, N, BATCH):
        with tf.GradientTape() as tape:
            loss = mse(y[i:i + BATCH], plain(X[i:i + BATCH], training=True))
        popt.apply(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables)
    model, opt = model_of(), keras.optimizers.SGD(0.05, momentum=0.9)
    StabilityTrainer(model, mse, opt, progress=False).fit(X, y, batch_size=BATCH, shuffle=False)
    for a, b in zip(state(model, opt), state(plain, popt)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    fitted, fopt = model_of(), keras.optimizers.SGD(0.05, momentum=0.9)  # keras_guard against the plain fit
    fitted.compile(optimizer=fopt, loss="mse")
    fitted.fit(X, y, batch_size=BATCH, shuffle=False, verbose=0)
    guarded = model_of()
    gopt, cb = stabilize.keras_guard(keras.optimizers.SGD(0.05, momentum=0.9))
    guarded.compile(optimizer=gopt, loss="mse")
    guarded.fit(X, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])
    for a, b in zip(state(guarded, gopt), state(fitted, fopt)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# -- settings: a wrong keyword, and the one table ----------------------------------------------
def test_a_wrong_keyword_names_the_closest_setting_at_every_entry_point():
    load_backend("torch")
    import stabilize
    from stabilize import StabilityTrainer, TorchGuard
    from stabilize.guard.settings import GuardSettings
    from stabilize.optim import SGD

    model = _torch_model(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"^TorchGuard: unknown setting on_nonfinit=; did you mean on_nonfinite=\?$"):
        TorchGuard(model, opt, on_nonfinit="skip")
    with pytest.raises(TypeError, match=r"^StabilityTrainer: unknown setting schedular=; did you mean scheduler=\?$"):
        StabilityTrainer(model, "mse", SGD(lr=0.1), schedular=None)
    with pytest.raises(TypeError, match=r"^GuardSettings: unknown setting spike_warm_up=; did you mean spike_warmup="):
        GuardSettings(spike_warm_up=3)
    with pytest.raises(ValueError, match=r"TorchGuard cannot take replay: a guard does not own the forward pass"):
        TorchGuard(model, opt, replay="on")
    load_backend("tensorflow")
    import keras

    with pytest.raises(ValueError, match=r"keras_guard cannot take replay: a guard does not own the forward pass"):
        stabilize.keras_guard(keras.optimizers.SGD(0.1), replay="off")
    with pytest.raises(TypeError, match=r"^keras_guard: unknown setting clip_nrm=; did you mean clip_norm=\?$"):
        stabilize.keras_guard(keras.optimizers.SGD(0.1), clip_nrm=1.0)
