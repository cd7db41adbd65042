"""Durable checkpoints: atomic writes, verified reads, no unpickling, bit-identical resume."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import stabilize
from stabilize import checkpoint
from stabilize.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_of_plain_values_and_arrays(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "t": (1, 2.5, "a"), 3: [None, True],
             "__odd": {7, 8}, "nan": float("nan"), "big": 2**100}
    path = checkpoint.save(tmp_path / "a.ckpt", state, meta={"note": "x"})
    out = checkpoint.load(path)
    assert out["w"].dtype == np.float32 and np.array_equal(out["w"], state["w"])
    assert out["t"] == (1, 2.5, "a") and out[3] == [None, True] and out["__odd"] == {7, 8}
    assert np.isnan(out["nan"]) and out["big"] == 2**100
    header = checkpoint.read_header(path)
    assert header["version"] == checkpoint.FORMAT_VERSION and header["codec"] == "npz" and header["meta"] == {"note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temp file left


def test_unsupported_values_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        checkpoint.save(tmp_path / "a.ckpt", {"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) - 10], "truncated: .* payload bytes"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b[:-45] + bytes([b[-45] ^ 0xFF]) + b[-44:], "corrupted or truncated: the SHA-256"),
    (lambda b: b[:40] + bytes([b[40] ^ 0x01]) + b[41:], "corrupted or truncated: the SHA-256"),  # in the header
    (lambda b: b"PK" + b[2:], "not a stabilize checkpoint"),
])
def test_damaged_files_give_a_clear_error(tmp_path, damage, message):
    path = checkpoint.save(tmp_path / "a.ckpt", {"w": np.ones(100)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(path)
    assert "a.ckpt" in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.ckpt")


def test_another_version_is_named(tmp_path):
    path = checkpoint.save(tmp_path / "a.ckpt", {"w": 1})
    data = path.read_bytes()[:-32].replace(b'"version": 2', b'"version": 9')
    path.write_bytes(data + hashlib.sha256(data).digest())  # a well-formed file of a future version
    with pytest.raises(CheckpointError, match="format version 9"):
        checkpoint.load(path)


torch = pytest.importorskip("torch")


def test_a_pickled_object_is_never_run(tmp_path):
    """A payload carrying a pickled callable, with a matching checksum, is refused and never executed."""
    import hashlib
    import io
    import struct

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"tensors": [Evil()], "kinds": ["torch"]}, buf)
    payload = buf.getvalue()
    path = tmp_path / "evil.ckpt"
    header = json.dumps({"format": "stabilize-checkpoint", "version": 2, "codec": "torch",
                         "payload_bytes": len(payload), "structure": {"__tensor__": 0}, "meta": {}}).encode()
    body = checkpoint.MAGIC + struct.pack(">Q", len(header)) + header + payload
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(path)
    legacy = json.dumps({"format": "stabilize-checkpoint", "version": 1, "codec": "torch",  # the old format too
                         "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                         "structure": {"__tensor__": 0}, "meta": {}}).encode()
    path.write_bytes(checkpoint.MAGIC + struct.pack(">Q", len(legacy)) + legacy + payload)
    with pytest.raises(CheckpointError, match="format version 1"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.upgrade(path)
    assert not marker.exists()


# -- TorchGuard: the whole training state -------------------------------------------------------
def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    guard = stabilize.TorchGuard(model, opt, scheduler=sched, clip_norm=1.0, on_nonfinite="backoff", spike="skip",
                                 spike_warmup=3)
    return model, opt, sched, guard


def _train(model, guard, sched, start, stop, nan_at=()):
    """Steps draw data from numpy's global RNG and dropout from torch's: both must resume exactly."""
    model.train()
    for step in range(start, stop):
        x = torch.from_numpy(np.random.randn(8, 4).astype(np.float32))
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(8, 1)
        if step in nan_at:
            x[0, 0] = float("nan")
        if guard.step(torch.nn.functional.mse_loss(model(x), y)):
            sched.step()


def _everything(model, opt, sched, guard):
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "opt": [v.clone() for st in opt.state.values() for v in st.values()],
            "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state()[1].copy(),
            "policy": guard.supervisor.policy.state_dict(), "losses": guard.history.losses.tolist(),
            "events": [str(e) for e in guard.history.events], "lr": guard.lr}


def _assert_same(a, b):
    for key in ("params", "buffers", "opt"):
        assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and np.array_equal(a["np_rng"], b["np_rng"])
    assert np.array_equal(a["losses"], b["losses"], equal_nan=True)
    for key in ("sched", "policy", "events", "lr"):
        assert a[key] == b[key], key


def test_resume_is_bit_identical(tmp_path):
    n, faults = 6, (2, 8)
    np.random.seed(1)
    straight = _setup()
    _train(straight[0], straight[3], straight[2], 0, 2 * n, faults)
    expected = _everything(*straight)

    np.random.seed(1)
    first = _setup()
    _train(first[0], first[3], first[2], 0, n, faults)
    first[3].save_checkpoint(tmp_path / "run.ckpt", epoch=0, batch=n)
    del first
    torch.manual_seed(123)  # scramble every RNG: the checkpoint must bring them back
    np.random.seed(123)
    resumed = _setup(seed=5)  # fresh objects, other initial weights
    position = resumed[3].load_checkpoint(tmp_path / "run.ckpt")
    assert position == {"epoch": 0, "batch": n}
    _train(resumed[0], resumed[3], resumed[2], position["batch"], 2 * n, faults)
    _assert_same(_everything(*resumed), expected)
    kinds = [(e.kind, e.action) for e in resumed[3].history.events]  # the detector's state resumed too
    assert kinds.count(("nonfinite", "backed-off")) == 2 and ("spike", "skipped") in kinds


def test_a_bad_checkpoint_leaves_the_live_state_untouched(tmp_path):
    np.random.seed(0)
    model, opt, sched, guard = _setup()
    _train(model, guard, sched, 0, 3)
    path = guard.save_checkpoint(tmp_path / "run.ckpt")
    _train(model, guard, sched, 3, 5)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    other_guard = stabilize.TorchGuard(other, torch.optim.SGD(other.parameters(), lr=0.1))
    other_path = other_guard.save_checkpoint(tmp_path / "other.ckpt")
    before = _everything(model, opt, sched, guard)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        guard.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="another model"):
        guard.load_checkpoint(other_path)
    _assert_same(_everything(model, opt, sched, guard), before)


def test_trainer_resume_between_fits_is_bit_identical(tmp_path):

    X = np.random.default_rng(0).normal(size=(64, 3))
    y = X.sum(1, keepdims=True)
    X[5, 1] = np.nan

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", max_bad_steps=1,
                                          snapshot_every=2, progress=False, diagnose=False)

    straight = make()
    straight.fit(X, y, epochs=1, batch_size=16, seed=3)
    straight.fit(X, y, epochs=1, batch_size=16, seed=4)
    half = make()
    half.fit(X, y, epochs=1, batch_size=16, seed=3)
    half.save_checkpoint(tmp_path / "t.ckpt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "t.ckpt")
    resumed.fit(X, y, epochs=1, batch_size=16, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(straight.get_weights(), resumed.get_weights()))
    assert np.array_equal(resumed.history.losses, straight.history.losses, equal_nan=True)
    assert [str(e) for e in resumed.history.events] == [str(e) for e in straight.history.events]
    assert resumed.supervisor.policy.state_dict() == straight.supervisor.policy.state_dict()
    assert resumed.applied_steps == straight.applied_steps


_SAVER = """
import sys, numpy as np, torch
from stabilize import checkpoint
path = sys.argv[1]
checkpoint.save(path, {"w": torch.arange(1000, dtype=torch.float64), "step": 1})
print("first", flush=True)
big = torch.randn(16_000_000, generator=torch.Generator().manual_seed(0))  # 64 MB: a save that takes a while
while True:
    checkpoint.save(path, {"w": big, "step": 2})
"""


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for attempt in range(5):  # the kill must land while a temp file is being written
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "first"
            deadline, seen = time.monotonic() + 60, False
            while time.monotonic() < deadline and not seen:
                seen = any(p.name.startswith(".run.ckpt.tmp-") for p in tmp_path.iterdir())
            assert seen, "the saver never started its second save"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        state = checkpoint.load(path)  # a load never deletes anything
        if state["step"] == 1:
            break
        path.unlink()
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000, dtype=torch.float64))
    left = [p for p in tmp_path.iterdir() if p.name != "run.ckpt"]
    assert len(left) == 1 and left[0].name.startswith(".run.ckpt.tmp-")
    checkpoint.save(path, {"step": 3})  # another writer's recent temp file: left alone (it may be live)
    assert left[0].exists()
    old = time.time() - checkpoint.STALE_AFTER - 60
    os.utime(left[0], (old, old))
    checkpoint.save(path, {"step": 4})  # older than STALE_AFTER: a dead writer's, removed by the writer
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
