"""Each framework's own names: torch-facing calls take torch's, Keras-facing calls Keras's, and the other
framework's name is refused with the name to pass; ``scheduler=`` is one keyword everywhere."""

import warnings

import numpy as np
import pytest

import stabilize
from stabilize.names import axis_from, settings_for


def test_settings_for_translates_own_names_and_refuses_the_others():
    assert settings_for("torch", {"max_norm": 2.0, "on_nonfinite": "skip"}, "X") == {"clip_norm": 2.0,
                                                                                       "on_nonfinite": "skip"}
    assert settings_for("tensorflow", {"clipnorm": 1.0, "clipvalue": 0.5}, "X") == {"clip_norm": 1.0,
                                                                                     "clip_value": 0.5}
    assert settings_for(None, {"clipnorm": 1.0}, "X") == {"clip_norm": 1.0}  # a neutral model: either
    with pytest.raises(TypeError, match=r"TorchGuard: clipnorm= is Keras's name; pass clip_norm= \(torch's max_norm"):
        settings_for("torch", {"clipnorm": 1.0}, "TorchGuard")
    with pytest.raises(TypeError, match=r"keras_guard: max_norm= is torch's name; pass clip_norm= \(Keras's clipnorm"):
        settings_for("tensorflow", {"max_norm": 1.0}, "keras_guard")
    with pytest.raises(TypeError, match="clip_norm= and max_norm= name the same setting"):
        settings_for("torch", {"max_norm": 1.0, "clip_norm": 1.0}, "TorchGuard")
    given = {"clipnorm": 1.0}
    settings_for("tensorflow", given, "X")
    assert given == {"clipnorm": 1.0}  # what the user gave is not changed


def test_axis_from_takes_torch_names_and_refuses_both():
    assert axis_from("op", None, 1, False, True) == (1, True)
    assert axis_from("op", 0, None, True, None) == (0, True)
    with pytest.raises(TypeError, match="safe_norm: axis= and dim= name the same argument"):
        axis_from("safe_norm", 0, 1)
    with pytest.raises(TypeError, match="keepdims= and keepdim="):
        axis_from("safe_var", None, None, True, True)


def test_safe_norm_var_std_softmax_accept_dim_and_keepdim_on_torch():
    torch = pytest.importorskip("torch")
    x64 = np.random.default_rng(0).normal(size=(3, 5))
    x = torch.tensor(x64)
    got = stabilize.safe_norm(x, dim=1, keepdim=True)
    assert got.shape == (3, 1)
    np.testing.assert_allclose(got.numpy()[:, 0], np.linalg.norm(x64, axis=1), rtol=1e-12)
    np.testing.assert_allclose(stabilize.safe_var(x, dim=0, ddof=1).numpy(), x64.var(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(stabilize.safe_std(x, dim=0, keepdim=True).numpy(), x64.std(axis=0, keepdims=True),
                               rtol=1e-12)
    e = np.exp(x64 - x64.max(axis=0))
    np.testing.assert_allclose(stabilize.masked_softmax(x, dim=0).numpy(), e / e.sum(axis=0), rtol=1e-12)
    with pytest.raises(TypeError, match="dim is torch's name"):
        stabilize.safe_norm(x, axis=1, dim=1)


def _torch_setup():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return torch, model, opt


def test_torch_guard_takes_max_norm_and_refuses_clipnorm():
    torch, model, opt = _torch_setup()
    assert stabilize.TorchGuard(model, opt, max_norm=0.5).settings.clip_norm == 0.5
    with pytest.raises(TypeError, match="clipnorm= is Keras's name; pass clip_norm="):
        stabilize.TorchGuard(model, opt, clipnorm=0.5)


def test_torch_guard_refuses_a_scheduler_that_is_not_one():
    torch, model, opt = _torch_setup()
    with pytest.raises(TypeError, match=r"scheduler must be a torch.optim.lr_scheduler scheduler .*got str 'x'"):
        stabilize.TorchGuard(model, opt, scheduler="x")
    other = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="built for another optimizer"):
        stabilize.TorchGuard(model, opt, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_trainer_takes_scheduler_and_schedule_still_works_with_a_deprecation_warning():
    torch, model, opt = _torch_setup()
    X = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = X.sum(1, keepdims=True)

    def run(**kw):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        s = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
        key = next(iter(kw))
        t = stabilize.StabilityTrainer(m, "mse", o, progress=False, **{key: s})
        t.fit(X, y, epochs=1, batch_size=4, shuffle=False)
        return s.last_epoch, t.history.lrs.tolist(), [p.detach().clone() for p in m.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = run(scheduler=True)
    with pytest.warns(DeprecationWarning, match=r"schedule=.*deprecated: pass scheduler="):
        old = run(schedule=True)
    assert new[0] == old[0] == 4 and new[1] == old[1] == [0.1, 0.05, 0.025, 0.0125]
    assert all(torch.equal(a, b) for a, b in zip(new[2], old[2]))
    s = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(TypeError, match="scheduler= and schedule= are the same argument"):
        stabilize.StabilityTrainer(model, "mse", opt, scheduler=s, schedule=s)


def test_keras_guard_takes_clipnorm_and_refuses_max_norm():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    opt, guard = stabilize.keras_guard(keras.optimizers.SGD(0.1), clipnorm=1.0, clipvalue=0.5)
    assert (opt.settings.clip_norm, opt.settings.clip_value) == (1.0, 0.5)
    with pytest.raises(TypeError, match="max_norm= is torch's name; pass clip_norm="):
        stabilize.keras_guard(keras.optimizers.SGD(0.1), max_norm=1.0)
