"""StabilityTrainer: the models, optimizers and data it takes, determinism, and its errors."""

import numpy as np
import pytest

import stabilize
from stabilize.models import MLP
from stabilize.optim import SGD, Adam
from stabilize.trainer import StabilityTrainer


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, X @ np.array([[1.0], [-1.0], [0.5]])


def _sgd_reference(spec, X, y, lr, batches):
    """Float64 numpy reference: ReLU MLP, MSE, plain SGD, manual backprop."""
    ws = spec.weights()
    losses = []
    for idx in batches:
        xb, yb = X[idx], y[idx]
        h1 = xb @ ws[0] + ws[1]
        a1 = np.maximum(h1, 0)
        out = a1 @ ws[2] + ws[3]
        d = out - yb
        losses.append(np.mean(d**2))
        g_out = 2 * d / d.size
        g = [None] * 4
        g[2], g[3] = a1.T @ g_out, g_out.sum(0)
        g_a1 = g_out @ ws[2].T * (h1 > 0)
        g[0], g[1] = xb.T @ g_a1, g_a1.sum(0)
        ws = [w - lr * gw for w, gw in zip(ws, g)]
    return np.array(losses), ws


def test_neutral_mlp_matches_float64_numpy_reference(backend):
    X, y = _data()
    spec = MLP((3, 8, 1), seed=3)
    trainer = StabilityTrainer(spec, "mse", SGD(lr=0.05), backend=backend, dtype="float64", progress=False)
    h = trainer.fit(X, y, epochs=2, batch_size=32, shuffle=True, seed=5)
    rng = np.random.default_rng(5)
    batches = [p[i : i + 32] for p in (rng.permutation(96), rng.permutation(96)) for i in range(0, 96, 32)]
    ref_losses, ref_w = _sgd_reference(spec, X, y, 0.05, batches)
    np.testing.assert_allclose(h.losses, ref_losses, rtol=1e-12)
    for a, b in zip(trainer.get_weights(), ref_w):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)


def test_same_seed_same_run_and_initial_weights_equal_the_spec(backend):
    X, y = _data()
    spec = MLP((3, 8, 1), seed=0)
    runs = []
    for _ in range(2):
        t = StabilityTrainer(spec, "mse", Adam(lr=0.01), backend=backend, dtype="float32", progress=False)
        for a, b in zip(t.get_weights(), spec.weights("float32")):
            np.testing.assert_array_equal(a, b)  # step 0: the very same numbers
        runs.append(t.fit(X, y, epochs=2, batch_size=16, seed=7).losses)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_dict_inputs_are_columns_in_key_order(backend):
    X, y = _data()
    spec = MLP((3, 8, 1), seed=0)
    a = StabilityTrainer(spec, "mse", SGD(lr=0.05), backend=backend, dtype="float64", progress=False)
    b = StabilityTrainer(spec, "mse", SGD(lr=0.05), backend=backend, dtype="float64", progress=False)
    ha = a.fit({"input1": X[:, :2], "input2": X[:, 2]}, y, batch_size=32)
    hb = b.fit(X, y, batch_size=32)
    np.testing.assert_array_equal(ha.losses, hb.losses)


def test_native_torch_module_and_optimizer():
    from conftest import load_backend

    load_backend("torch")
    import torch

    X, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    ref = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = StabilityTrainer(model, "mse", opt, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=32)
    h = trainer.fit(loader, epochs=3)
    assert h.first_nonfinite_step is None and h.losses[-1] < h.losses[0]
    # A plain torch loop over the same batches gives the same weights.
    clone = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    with torch.no_grad():
        for p, r in zip(clone.parameters(), ref):
            p.copy_(r)
    opt2 = torch.optim.SGD(clone.parameters(), lr=0.05)
    for _ in range(3):
        for xb, yb in loader:
            opt2.zero_grad()
            torch.nn.functional.mse_loss(clone(xb), yb).backward()
            opt2.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_native_torch_optimizer_skips_a_nan_batch_exactly():
    from conftest import load_backend

    load_backend("torch")
    import torch

    X, y = _data(32)
    y[5] = np.nan
    model = torch.nn.Linear(3, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = StabilityTrainer(model, "mse", opt, progress=False)
    trainer.fit(X[:16], y[:16] * 0 + 1.0, batch_size=16)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    h = trainer.fit(X[:16], y[:16], batch_size=16)
    assert h.events[0].action == "skipped" and h.events[0].nonfinite == ("loss", "gradients")
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, state[k])


def test_keras_model_and_tf_data():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    X, y = _data()
    model = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(8, activation="relu", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    trainer = StabilityTrainer(model, "mse", SGD(lr=0.05), clip_norm=5.0, progress=False)
    assert trainer.backend.name == "tensorflow" and trainer.dtype == "float64"
    h = trainer.fit(tf.data.Dataset.from_tensor_slices((X, y)).batch(32), epochs=4)
    assert h.first_nonfinite_step is None and h.losses[-1] < h.losses[0] / 2


def test_torch_step_makes_exactly_one_host_read(monkeypatch):
    from conftest import load_backend

    load_backend("torch")
    import torch

    X, y = _data()
    trainer = StabilityTrainer(MLP((3, 8, 1)), "mse", Adam(lr=0.01), backend="torch", dtype="float32",
                               clip_norm=1.0, progress=False)
    calls = {"n": 0}
    names = ["item", "tolist", "numpy", "__bool__", "__float__", "__int__", "cpu"]
    originals = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        def wrapped(self, *a, _n=n, **k):
            calls["n"] += 1
            return originals[_n](self, *a, **k)
        monkeypatch.setattr(torch.Tensor, n, wrapped)
    h = trainer.fit(X, y, epochs=1, batch_size=32, shuffle=False)
    assert len(h.losses) == 3 and calls["n"] == 3  # one read of the stacked statistics per step


@pytest.mark.parametrize("kwargs,match", [
    ({"on_nonfinite": "retry"}, "on_nonfinite must be one of"),
    ({"clip_norm": -1.0}, "clip_norm must be a positive finite number"),
    ({"backoff_factor": 1.5}, "backoff_factor must lie in"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StabilityTrainer(MLP((3, 1)), "mse", SGD(lr=0.1), backend="numpy", **kwargs)


def test_bad_model_loss_optimizer_and_data_are_clear_errors(backend):
    with pytest.raises(TypeError, match="model must be a stabilize.models.MLP spec"):
        StabilityTrainer(object(), "mse", SGD())
    with pytest.raises(ValueError, match="loss must be a callable or one of"):
        StabilityTrainer(MLP((3, 1)), "hinge", SGD(), backend=backend)
    with pytest.raises(TypeError, match="pass an optimizer"):
        StabilityTrainer(MLP((3, 1)), "mse", None, backend=backend)
    with pytest.raises(ValueError, match="learning rate must be a positive number"):
        SGD(lr=0)
    t = StabilityTrainer(MLP((3, 1)), "mse", SGD(), backend=backend, progress=False)
    with pytest.raises(ValueError, match="inputs 'x' have 10 rows but the targets have 9"):
        t.fit(np.zeros((10, 3)), np.zeros((9, 1)))
    with pytest.raises(ValueError, match="MLP activation must be one of"):
        MLP((3, 1), activation="gelu")


def test_keras_model_with_keras_optimizer_skips_a_nan_batch_exactly():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    X, y = _data(32)
    y[5] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(0.01)
    trainer = StabilityTrainer(model, "mse", opt, clip_norm=1.0, progress=False)
    h = trainer.fit(X[16:], y[16:], batch_size=16)
    assert h.committed.tolist() == [True] and int(opt.iterations.numpy()) == 1
    weights = [w.copy() for w in model.get_weights()]
    opt_state = [np.array(v.numpy()) for v in opt.variables]
    h = trainer.fit(X[:16], y[:16], batch_size=16)
    assert h.events[0].action == "skipped" and h.events[0].nonfinite == ("loss", "gradients")
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for v, s in zip(opt.variables, opt_state):
        np.testing.assert_array_equal(v.numpy(), s)  # moments and the iteration counter
    h = trainer.fit(X[16:], y[16:], batch_size=16, epochs=3)
    assert h.first_nonfinite_step is None and int(opt.iterations.numpy()) == 4


def test_keras_optimizer_backoff_sets_its_learning_rate():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    X, y = _data(32)
    y[:16] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(0.1)
    trainer = StabilityTrainer(model, "mse", opt, on_nonfinite="backoff", backoff_factor=0.5, progress=False)
    h = trainer.fit(X, y, batch_size=16, shuffle=False, epochs=2)
    lr0 = float(np.float32(0.1))  # the keras optimizer holds its rate as a float32 variable
    assert h.lrs.tolist() == [lr0, lr0 * 0.5, lr0 * 0.5, lr0 * 0.25]
    # back-off scales each update; the optimizer's own rate (a user's or a callback's) is left alone
    assert float(opt.learning_rate.numpy()) == np.float32(0.1)


def test_native_optimizer_update_that_overflows_weights_is_rolled_back():
    from conftest import load_backend

    load_backend("torch")
    import torch

    X, y = _data(48)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=3e38)  # finite lr and gradients; lr*g overflows float32
    trainer = StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", progress=False)
    start = [p.detach().clone() for p in model.parameters()]
    h = trainer.fit(X, y, batch_size=16, shuffle=False)
    rolled = [e for e in h.events if e.action == "rolled-back"]
    # Step 1 finds the weights step 0 broke; the last update is checked when fit ends.
    assert [e.step for e in rolled] == [1, 2] and all("weights" in e.nonfinite for e in rolled)
    assert h.first_nonfinite_step == 1
    for p, s in zip(model.parameters(), start):  # back at the snapshot taken when fit began
        assert torch.equal(p, s)


def test_without_a_snapshot_an_update_that_overflows_weights_stops_the_fit():
    """Under skip no snapshot is held (nothing the policy cannot use): the fit stops at the step
    that finds the broken weights and says how to keep one."""
    from conftest import load_backend

    load_backend("torch")
    import torch

    X, y = _data(48)
    model = torch.nn.Linear(3, 1)
    trainer = StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=3e38), progress=False,
                               diagnose=False)
    assert trainer.held_bytes() == 0
    with pytest.raises(stabilize.NonFiniteError, match="holds no snapshot to restore") as err:
        trainer.fit(X, y, batch_size=16, shuffle=False)
    assert [e.step for e in err.value.report.events] == [1] and trainer.held_bytes() == 0


def test_fit_refuses_degenerate_input_with_clear_errors():
    from conftest import load_backend

    load_backend("torch")
    t = StabilityTrainer(MLP((3, 1)), "mse", SGD(lr=0.1), backend="torch", progress=False)
    X = np.zeros((4, 3))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0; no step would run"):
        t.fit(X, np.zeros((4, 1)), epochs=0)
    with pytest.raises(ValueError, match="y has 0 rows, so no training step can run"):
        t.fit(X[:0], np.zeros((0, 1)))
    with pytest.raises(TypeError, match="batch_size must be an integer >= 1, got the str"):
        t.fit(X, np.zeros((4, 1)), batch_size="8")


def test_unshuffled_batches_are_views_of_the_arrays_and_shuffled_ones_copies():
    from stabilize.data import batches

    X = np.arange(40.0).reshape(20, 2)
    y = np.arange(20.0)
    rng = np.random.default_rng(0)
    views = list(batches(X, y, batch_size=8, shuffle=False, rng=rng, epoch=0, skip_rows=set(), skip_positions=set()))
    assert [len(b.y) for b in views] == [8, 8, 4]
    assert all(np.shares_memory(b.x, X) and np.shares_memory(b.y, y) for b in views)
    np.testing.assert_array_equal(np.concatenate([b.x for b in views]), X)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in views]), np.arange(20))
    left_out = list(batches(X, y, batch_size=8, shuffle=False, rng=rng, epoch=0, skip_rows={3}, skip_positions=set()))
    assert 3 not in np.concatenate([b.rows for b in left_out]) and not np.shares_memory(left_out[0].x, X)
