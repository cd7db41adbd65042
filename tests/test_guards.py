"""Drop-in guards: a hand-written torch loop and Keras model.fit, rescued on the high-lr scenario."""

import numpy as np
import pytest

import stabilize
from stabilize import scenarios


def _high_lr():
    case = scenarios.build("high-lr", "diverging")
    return case, case.x.astype(np.float32), case.y.astype(np.float32)


def _torch_loop(make_guard=None, epochs=10):
    import torch

    case, X, y = _high_lr()
    model = stabilize.get_backend("torch").build_mlp(case.model, "float32", "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = make_guard(model, opt) if make_guard else None
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for i in range(0, len(y), 32):
            xb, yb = torch.from_numpy(X[perm[i : i + 32]]), torch.from_numpy(y[perm[i : i + 32]])
            loss = stabilize.safe_mse(model(xb), yb)
            if guard is None:
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                guard.step(loss, batch=(xb, yb))
            losses.append(loss.item())
    return np.array(losses), model, guard


@pytest.mark.slow  # a long fit (about 10 s of CPU)
def test_torch_guard_rescues_a_hand_written_loop_on_high_lr():
    from conftest import load_backend

    load_backend("torch")
    plain, _, _ = _torch_loop()
    assert not np.all(np.isfinite(plain))  # the unguarded loop diverges
    losses, model, guard = _torch_loop(lambda m, o: stabilize.TorchGuard(
        m, o, on_nonfinite="backoff", max_update_ratio=0.5, loss_fn=stabilize.safe_mse))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())
    assert guard.lr == 0.5 * 0.5**3 and [e.action for e in guard.history.events] == ["backed-off"] * 3
    # The same policy code as StabilityTrainer: the trainer's backoff variant ends on the same loss.
    traj = scenarios.run("high-lr", "backoff", backend="torch", dtype="float32")
    np.testing.assert_allclose(losses[-1], traj.losses[-1], rtol=1e-6)


def test_torch_guard_skips_a_nan_batch_exactly_and_diagnoses_it():
    from conftest import load_backend

    load_backend("torch")
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, loss_fn=stabilize.safe_mse)
    x = torch.randn(8, 3)
    assert guard.step(stabilize.safe_mse(model(x), torch.zeros(8, 1)))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    bad_x = x.clone()
    bad_x[2, 1] = float("nan")
    applied = guard.step(stabilize.safe_mse(model(bad_x), torch.zeros(8, 1)), batch=(bad_x, torch.zeros(8, 1)))
    assert not applied
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, state[k])
    d = guard.history.diagnosis
    assert d.cause == "dirty-data" and "(2, 1)" in str(d)


def test_torch_guard_raise_policy():
    from conftest import load_backend

    load_backend("torch")
    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="raise")
    with pytest.raises(stabilize.NonFiniteError, match=r"step 0\b.*nonfinite \[loss, gradients\]"):
        guard.step(model(torch.full((1, 2), float("inf"))).sum() * 0)


def test_keras_guard_rescues_model_fit_on_high_lr():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    case, X, y = _high_lr()
    B = stabilize.get_backend("tensorflow")
    plain = B.build_mlp(case.model, "float32")
    plain.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    h = plain.fit(X, y, epochs=10, batch_size=32, verbose=0, shuffle=False)
    assert not np.isfinite(h.history["loss"][-1])

    model = B.build_mlp(case.model, "float32")
    inner = keras.optimizers.SGD(0.5)
    opt, cb = stabilize.keras_guard(inner, on_nonfinite="backoff", max_update_ratio=0.5,
                                    diagnose_data=(X, y), loss_fn=stabilize.safe_mse)
    model.compile(optimizer=opt, loss="mse")
    h = model.fit(X, y, epochs=10, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
    assert np.all(np.isfinite(h.history["loss"])) and h.history["loss"][-1] < 0.8
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert cb.supervisor.lr(0.5) < 0.5 and cb.supervisor.policy.backoffs > 0
    assert {e.action for e in cb.history.events} == {"backed-off"}


def test_keras_guard_skips_nan_targets_inside_fit():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)
    y[40] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    opt, cb = stabilize.keras_guard(keras.optimizers.Adam(0.01))
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, epochs=2, batch_size=16, verbose=0, shuffle=False, callbacks=[cb])
    assert all(np.isfinite(w).all() for w in model.get_weights())
    skipped = [e for e in cb.history.events if e.action == "skipped"]
    assert [e.step for e in skipped] == [2, 6]  # the batch holding row 40, once per epoch
