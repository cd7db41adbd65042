"""What a newcomer met (issue 21): each report or error they found unclear or wrong, checked here."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import stabilize

ROOT = Path(__file__).resolve().parents[1]


def _torch_linear(n_in=4):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, 1)
    return torch, model, torch.optim.SGD(model.parameters(), lr=0.1)


def _keras_bn_fit(**guard_kw):
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    X = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    y = X.sum(1, keepdims=True)
    X[5, 1] = np.nan  # row 5: batch 0 of each epoch (no shuffling)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    opt, guard = stabilize.keras_guard(keras.optimizers.SGD(0.01), **guard_kw)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, y, batch_size=16, epochs=2, callbacks=[guard], verbose=0, shuffle=False)
    return guard


def test_keras_logs_a_skipped_step_without_diagnose_data_and_names_buffers_not_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="stabilize"):
        guard = _keras_bn_fit()
    events = guard.history.events
    assert [(e.step, e.epoch, e.batch_index, e.action) for e in events] == [(0, 0, 0, "skipped"), (4, 1, 0, "skipped")]
    # The NaN batch makes BatchNorm's moving statistics non-finite (put back): "buffers", never "weights".
    assert all(e.nonfinite == ("loss", "gradients", "buffers") for e in events)
    lines = [r.getMessage() for r in caplog.records if "nonfinite" in r.getMessage()]
    # caplog is a handler whose format names the logger: the message itself carries no "stabilize: " tag
    assert len(lines) == 1 and lines[0].startswith("step 0 (epoch 0, batch 0): nonfinite [loss, gradients, "
                                                   "buffers]") and "-> skipped" in lines[0]


def test_torch_guard_logs_its_first_skip_and_names_no_epoch_it_does_not_know(caplog):
    torch, model, opt = _torch_linear()
    guard = stabilize.TorchGuard(model, opt)
    with caplog.at_level(logging.WARNING, logger="stabilize"):
        for step in range(4):
            x = torch.randn(8, 4)
            if step in (1, 2):
                x[0, 0] = float("nan")
            guard.step(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))
    assert [str(e).split(":")[0] for e in guard.history.events] == ["step 1", "step 2"]
    assert "epoch" not in guard.history.report()
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and logged[0].startswith("step 1: nonfinite [loss, gradients]")


def test_a_history_with_every_step_skipped_for_nan_gradients_says_no_step_was_applied():
    torch, model, opt = _torch_linear()
    guard = stabilize.TorchGuard(model, opt, max_bad_steps=10)  # skip keeps going (it stops after 10 in a row)
    w0 = model.weight.detach().clone()
    for _ in range(3):
        x = torch.randn(8, 4)
        guard.backward(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))
        model.weight.grad[0, 0] = float("nan")  # a finite loss over a NaN gradient
        guard.step()
    report = guard.history.report()
    first = report.splitlines()[0]
    assert "3 steps, 0 applied, 3 not applied" in first
    assert "no step applied (the weights are as they were at the start; last loss " in first
    assert "final loss nan" not in report and np.isfinite(guard.history.losses).all()
    assert torch.equal(model.weight.detach(), w0)


@pytest.mark.slow  # a subprocess that imports the frameworks
def test_a_name_formatter_shows_stabilize_once_and_the_default_handler_tags_it(tmp_path):
    code = (
        "import logging, sys, torch, stabilize\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(2, 1); g = stabilize.TorchGuard(m, torch.optim.SGD(m.parameters(), lr=0.1))\n"
        "if sys.argv[1] == 'handler':\n"
        "    logging.basicConfig(format='%(name)s: %(message)s')\n"
        "g.step(m(torch.full((4, 2), float('nan'))).sum())\n"
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for how in ("handler", "none"):
        out = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stabilize: step 0: nonfinite"), (how, lines)


@pytest.mark.slow  # a subprocess that trains on both frameworks
@pytest.mark.needs("tensorflow")
def test_the_parity_command_prints_its_table_whole_then_the_log_lines():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", "stabilize", "scenarios", "parity", "log-zero", "--variant",
                          "diverging", "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, timeout=300)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout[-2000:]
    assert lines[0].startswith("scenario") and lines[1].startswith("log-zero")
    rest = [line for line in lines[2:] if line.strip()]
    assert rest and rest[0].endswith("logged during the runs (distinct ones):")
    assert all(line.startswith("  stabilize: ") for line in rest[1:])


def test_importorskip_names_the_extra(monkeypatch):
    import conftest

    monkeypatch.setitem(conftest.OPTIONAL, "no_such_module_xyz", ("docs", None))
    with pytest.raises(pytest.skip.Exception, match=r"needs no_such_module_xyz \(the 'docs' extra\), not installed"):
        pytest.importorskip("no_such_module_xyz")
    monkeypatch.setitem(conftest.OPTIONAL, "no_such_module_xyz", ("tensorflow", "tensorflow"))
    monkeypatch.setattr(conftest, "REQUIRED", ["tensorflow"])
    with pytest.raises(pytest.fail.Exception, match="STABILIZE_TEST_BACKENDS asks for"):
        pytest.importorskip("no_such_module_xyz")


def test_audit_names_one_corrupted_image_not_3072_columns():
    rng = np.random.default_rng(0)
    X = rng.random((200, 32, 32, 3)).astype(np.float32)
    X[17] = 3e38
    report = stabilize.audit(X, rng.integers(0, 10, 200), num_classes=10)
    assert report.kinds() == {"outlier-rows"}
    finding = report.findings[0]
    assert finding.where == "row 17 (1 of 200) makes 3072 column(s) look unscaled"
    assert finding.figures == {"row 17 largest |value|": float(np.float32(3e38))}
    assert "StandardScaler" not in finding.remedy
    X[17] = rng.random((32, 32, 3)) * 1000  # a whole column set out of scale is still unscaled-inputs
    X[:, 0, 0, 0] *= 1e4
    assert "unscaled-inputs" in stabilize.audit(X).kinds()


def test_sigmoid_bce_by_hand_gets_the_binary_advice():
    torch, model, opt = _torch_linear(3)
    with torch.no_grad():
        model.weight.fill_(100.0)

    def bce(z, y):
        p = torch.sigmoid(z)
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()

    guard = stabilize.TorchGuard(model, opt, loss_fn=bce)
    x, y = torch.ones(8, 3), torch.zeros(8, 1)
    assert not guard.step(bce(model(x), y), batch=(x, y))
    d = guard.history.diagnosis
    assert d.cause == "log-zero"
    assert "binary_cross_entropy_with_logits" in d.advice and "safe_cross_entropy" not in d.advice


def test_clip_grads_refuses_none():
    with pytest.raises(TypeError, match=r"clip_grads: grads is None; pass the gradients"):
        stabilize.clip_grads(None, 1.0)


def test_fit_refuses_a_target_the_builtin_loss_would_broadcast_and_warns_for_a_users_loss():
    torch, model, opt = _torch_linear()
    X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = np.zeros((32, 3), np.float32)
    with pytest.raises(ValueError, match=r"pred has shape \(16, 1\) but target has shape \(16, 3\)"):
        stabilize.StabilityTrainer(model, "mse", opt, progress=False).fit(X, y, epochs=1, batch_size=16)
    w0 = model.weight.detach().clone()
    assert torch.equal(model.weight.detach(), w0)

    def l1(pred, target):  # a loss of the user's own, which broadcasts like torch's
        return (pred - target).abs().mean()

    with pytest.warns(UserWarning, match=r"output has shape \(16, 1\) but the targets \(16, 3\): the loss l1 "
                                         r"broadcasts"):
        stabilize.StabilityTrainer(model, l1, opt, progress=False).fit(X, y, epochs=1, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching shapes, and class logits against labels: no warning
        stabilize.StabilityTrainer(model, l1, opt, progress=False).fit(X, y[:, :1], epochs=1, batch_size=16)
    from stabilize.frameworks import broadcasts_silently

    assert broadcasts_silently((16, 1), (16,)) and broadcasts_silently((16,), (16, 1))
    assert not broadcasts_silently((16, 10), (16,)) and not broadcasts_silently((16, 3), (16, 3))


def test_keras_loss_object_with_a_broadcasting_target_is_warned_about():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"output has shape \(16, 1\) but the targets \(16, 3\)"):
        stabilize.StabilityTrainer(model, keras.losses.MeanSquaredError(), keras.optimizers.SGD(0.01),
                                   progress=False).fit(X, np.zeros((32, 3), np.float32), epochs=1, batch_size=16)


@pytest.mark.parametrize("x, y, error, message", [
    ("X", np.array(["cat", "dog"] * 16), TypeError, r"fit: y holds strings \(<U3\), not numbers; labels: encode "
                                                   r"them as integer ids first"),
    (np.array([["a"] * 4] * 32), "y", TypeError, r"fit: x holds strings .*encode them as numbers first"),
    (np.float32(3.0), "y", TypeError, r"fit: x must hold one row per sample, got a 0-d float32"),
    ("X", np.float32(1.0), TypeError, r"fit: y must hold one row per sample, got a 0-d float32"),
    (np.zeros((32, 5), np.float32), "y", ValueError, r"fit: x has 5 features \(columns\) but the model's first layer "
                                                     r"takes 4"),
])
def test_fit_refuses_strings_scalars_and_a_wrong_feature_count_naming_the_argument(x, y, error, message):
    torch, model, opt = _torch_linear()
    X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    x = X if isinstance(x, str) else x
    y = np.zeros((32, 1), np.float32) if isinstance(y, str) else y
    w0 = model.weight.detach().clone()
    with pytest.raises(error, match=message):
        stabilize.StabilityTrainer(model, "mse", opt, progress=False).fit(x, y, epochs=1, batch_size=16)
    assert torch.equal(model.weight.detach(), w0)  # nothing ran


def test_load_and_save_checkpoint_name_the_path_argument(tmp_path):
    torch, model, opt = _torch_linear()
    guard = stabilize.TorchGuard(model, opt)
    with pytest.raises(TypeError, match=r"load_checkpoint: path must be a file path \(a str or a pathlib.Path\), "
                                        r"got int 123"):
        guard.load_checkpoint(123)
    with pytest.raises(TypeError, match=r"save_checkpoint: path must be a file path .*got NoneType None"):
        guard.save_checkpoint(None)
    assert not list(tmp_path.iterdir())


def test_a_stabilize_toml_that_is_not_utf8_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "stabilize.toml").write_bytes(b'backend = "torch\xff"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("STABILIZE_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "stabilize", "scenarios", "run", "high-lr", "fixed"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"stabilize: error: {tmp_path / 'stabilize.toml'} is not UTF-8 text (byte 0xff at offset 16), so not valid "
        f"TOML; save it as UTF-8 or remove it"]


def test_a_model_that_slices_its_input_is_not_refused_for_its_first_layer():
    import torch

    class Coupling(torch.nn.Module):  # its first layer sees half of x: no feature count can be read off it
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

        def forward(self, x):
            return (x[:, 2:] * torch.exp(torch.tanh(self.net(x[:, :2])))).sum(1, keepdim=True)

    torch.manual_seed(0)
    model = Coupling()
    X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    history = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.01),
                                         progress=False).fit(X, X[:, :1], epochs=1, batch_size=16)
    assert len(history.losses) == 2 and history.skipped_steps == 0
