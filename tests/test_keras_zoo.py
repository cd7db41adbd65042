"""The Keras zoo through ``keras_guard`` in ``model.fit`` and through the trainer's ``KerasTrainStep``.

For every model: a clean guarded run is bit-identical to the same unguarded
run; a NaN batch, an inf loss (finite gradients), a NaN gradient element and a
NaN BatchNorm statistic each leave every variable (trainable, non-trainable,
optimizer: iterations, loss scale) exactly as before the step, under skip,
back-off and rollback; eval-mode predictions stay finite.
"""

import numpy as np
import pytest

import zoo_keras as Z

# Every zoo model fits guarded and unguarded, and under each fault and policy: long Keras fits (~60 s CPU).
pytestmark = pytest.mark.slow

NAMES = ["cnn_bn_dropout", "lstm", "mha_masked", "two_inputs_dict", "mixed_float16"]
POLICIES = {"skip": {"on_nonfinite": "skip"},
            "backoff": {"on_nonfinite": "backoff"},
            "rollback": {"on_nonfinite": "rollback", "max_bad_steps": 1, "max_rollbacks": 10, "snapshot_every": 1}}
ACTION = {"skip": "skipped", "backoff": "backed-off", "rollback": "rolled-back"}


@pytest.fixture(autouse=True)
def _tf():
    from conftest import load_backend

    load_backend("tensorflow")


def _case(name):
    return {c.name: c for c in Z.cases()}[name]


def _has_buffers(model):
    return any("float" in str(v.dtype) for v in model.non_trainable_variables)


def _grad_fault(guarded, flag):
    """Make the first element of the last gradient NaN while ``flag`` is set (as a bad kernel would)."""
    from keras import ops

    apply = type(guarded).apply.__get__(guarded)

    def faulty(grads, trainable_variables=None):
        grads = list(grads)
        g = grads[-1]
        first = ops.reshape(ops.arange(int(np.prod(g.shape))) == 0, g.shape)
        grads[-1] = ops.where(ops.logical_and(flag > 0, first), float("nan"), g)
        return apply(grads, trainable_variables)

    object.__setattr__(guarded, "apply", faulty)


def _fit(case, guard=None, x=None, y=None, epochs=1, callbacks=()):
    import keras

    import stabilize

    keras.utils.set_random_seed(0)
    model = case.build()
    opt, cbs, cb = keras.optimizers.Adam(0.01), [], None
    if guard is not None:
        opt, cb = stabilize.keras_guard(opt, **guard)
        cbs = [cb]
    model.compile(optimizer=opt, loss=case.loss)
    h = model.fit(case.x if x is None else x, case.y if y is None else y, batch_size=Z.BATCH, epochs=epochs,
                  shuffle=False, verbose=0, callbacks=cbs + [c(model, opt) for c in callbacks])
    return model, h, cb


@pytest.mark.parametrize("name", NAMES)
def test_clean_fit_is_bit_identical_to_unguarded(name):
    case = _case(name)
    plain, hp, _ = _fit(case, epochs=2)
    guarded, hg, cb = _fit(case, {}, epochs=2)
    assert Z.same(Z.state(plain), Z.state(guarded))
    assert hp.history == hg.history
    events = [e for e in cb.history.events if e.kind != "scaler"]  # float16 overflow at the initial scale
    assert events == [] and len(cb.history.losses) == 16
    assert int(np.sum(cb.history.committed)) + len(cb.history.events) == 16


class _Probe:
    """A callback factory: faults at given steps, the state before and after each step."""

    def __init__(self, faults):
        self.faults, self.records = faults, []

    def __call__(self, model, guarded):
        import keras

        probe = self
        flag = keras.Variable(0.0, trainable=False, name="fault_flag")
        _grad_fault(guarded, flag)

        class Cb(keras.callbacks.Callback):
            step = 0

            def on_train_batch_begin(self, batch, logs=None):
                self.pre = Z.state(model)
                kind = probe.faults.get(Cb.step)
                if kind == "grad":
                    flag.assign(1.0)
                if kind == "buffer":
                    v = next(v for v in model.non_trainable_variables if "float" in str(v.dtype))
                    value = keras.ops.convert_to_numpy(v).copy()
                    value.reshape(-1)[0] = np.nan
                    v.assign(value)

            def on_train_batch_end(self, batch, logs=None):
                flag.assign(0.0)
                probe.records.append((Cb.step, probe.faults.get(Cb.step), Z.same(Z.state(model), self.pre),
                                      float(logs["loss"])))
                Cb.step += 1

        return Cb()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", NAMES)
def test_faults_in_fit_leave_every_variable_as_before_the_step(name, policy):
    case = _case(name)
    x, y = Z.inject(case, "batch", 1)
    x, y = Z.inject(Z.Case(case.name, case.build, case.loss, x, y), "loss", 3)
    faults = {1: "batch", 3: "loss", 5: "grad"}
    keras_model = case.build()
    if _has_buffers(keras_model):
        faults[7] = "buffer"
    probe = _Probe(faults)
    model, h, cb = _fit(case, POLICIES[policy], x, y, callbacks=[probe])
    held = {step: kept for step, kind, kept, _ in probe.records if kind}
    assert held == {step: True for step in faults}  # exact pre-step state after every fault
    scaler = {e.step for e in cb.history.events if e.kind == "scaler"}
    assert {step for step, kind, kept, _ in probe.records if not kind and kept} - scaler == set()  # clean steps trained
    events = [e for e in cb.history.events if e.kind != "scaler"]
    assert [(e.step, e.action) for e in events] == [(s, ACTION[policy]) for s in sorted(faults)]
    assert [e.epoch for e in events] == [0] * len(faults) and [e.batch_index for e in events] == sorted(faults)
    assert all(np.isfinite(loss) for *_, loss in probe.records) and np.isfinite(h.history["loss"][0])
    pred = model.predict(case.x, verbose=0, batch_size=Z.BATCH)
    assert all(np.isfinite(p).all() for p in (pred.values() if isinstance(pred, dict) else [pred]))


def _trainer_loss(case):
    if isinstance(case.loss, dict):
        return lambda yt, yp: sum(case.loss[k](yt[k], yp[k]) for k in sorted(case.loss))
    return case.loss


def _batches(x, y, n):
    take = lambda d, i: {k: v[i * Z.BATCH:(i + 1) * Z.BATCH] for k, v in d.items()} if isinstance(d, dict) \
        else d[i * Z.BATCH:(i + 1) * Z.BATCH]
    return [(take(x, i), take(y, i)) for i in range(n)]


def _optimizer(case):
    import keras

    opt = keras.optimizers.Adam(0.01)
    return keras.optimizers.LossScaleOptimizer(opt) if case.mixed else opt


@pytest.mark.parametrize("name", NAMES)
def test_trainer_step_clean_is_bit_identical_and_faults_are_held(name):
    import keras
    import tensorflow as tf

    from stabilize.guard.settings import GuardSettings
    from stabilize.integrations.keras import KerasTrainStep

    case = _case(name)
    loss_fn = _trainer_loss(case)
    keras.utils.set_random_seed(0)
    plain, popt = case.build(), _optimizer(case)

    @tf.function
    def plain_step(x, y):
        with tf.GradientTape() as tape:
            scaled = popt.scale_loss(loss_fn(y, plain(x, training=True)))
        popt.apply(tape.gradient(scaled, plain.trainable_variables), plain.trainable_variables)

    keras.utils.set_random_seed(0)
    model = case.build()
    step = KerasTrainStep(model, _optimizer(case), loss_fn, GuardSettings())
    flag = keras.Variable(0.0, trainable=False)
    _grad_fault(step.guard, flag)  # before the step is traced; inert while the flag is 0
    popt.build(plain.trainable_variables)
    every = lambda m, opt: [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in
                            list(m.trainable_variables) + list(m.non_trainable_variables) + list(opt.variables)]
    for xb, yb in _batches(case.x, case.y, 3):
        plain_step(xb, yb)
        stats = step.run(xb, yb, 1.0)  # float16 may overflow at the initial scale: the scaler's own skip
        assert stats["committed"] == 1.0 or (case.mixed and stats["scaler_skip"] == 1.0)
    assert Z.same(every(plain, popt), every(model, step.guard))

    faults = ["batch", "loss", "grad"] + (["buffer"] if _has_buffers(model) else [])
    for i, kind in enumerate(faults):
        x, y = Z.inject(case, kind if kind in ("batch", "loss") else "batch", 0) if kind in ("batch", "loss") \
            else (case.x, case.y)
        (xb, yb), = _batches(x, y, 1)
        before = every(model, step.guard)
        scale = float(step.guard.inner_optimizer.dynamic_scale.numpy()) if case.mixed else None
        if kind == "grad":
            flag.assign(1.0)
        if kind == "buffer":
            v = next(v for v in model.non_trainable_variables if "float" in str(v.dtype))
            value = np.array(keras.ops.convert_to_numpy(v), copy=True)
            value.reshape(-1)[0] = np.nan
            v.assign(value)
        stats = step.run(xb, yb, 1.0)
        flag.assign(0.0)
        assert stats["committed"] == 0.0, kind
        if case.mixed and kind == "grad":  # with a scaler, a non-finite gradient of a finite loss is its overflow
            assert stats["scaler_skip"] == 1.0
            n = len(model.trainable_variables)
            assert Z.same(every(model, step.guard)[:n], before[:n])
            assert float(step.guard.inner_optimizer.dynamic_scale.numpy()) == scale / 2
            continue
        assert stats["scaler_skip"] == 0.0 and Z.same(every(model, step.guard), before), kind
    pred = step.predict(_batches(case.x, case.y, 1)[0][0])
    assert all(np.isfinite(p).all() for p in (pred.values() if isinstance(pred, dict) else [pred]))
