"""State you can trust after a crash (issue 17): every failure of the fault campaign against format 1.

Each test names the failure it pins down. A refused load is checked bitwise
against everything a load may change: parameters, buffers, optimizer,
scheduler, RNG (torch, numpy, Python), policy counters and history.
"""

import hashlib
import json
import os
import random
import struct
import warnings

import numpy as np
import pytest

import stabilize
from stabilize import checkpoint
from stabilize.checkpoint import CheckpointError

torch = pytest.importorskip("torch")


def build(seed=0, spike=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    guard = stabilize.TorchGuard(model, opt, scheduler=sched, on_nonfinite="backoff", clip_norm=1.0, spike=spike)
    return model, opt, sched, guard


def train(model, guard, sched, steps, nan_at=()):
    model.train()
    for step in range(steps):
        x = torch.from_numpy(np.random.randn(8, 3).astype(np.float32))
        if step in nan_at:
            x[0, 0] = float("nan")
        if guard.step(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))):
            sched.step()


def everything(model, opt, sched, guard) -> dict:
    """Every piece of state a load may change, as comparable values."""
    state = opt.state_dict()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.detach().clone() for b in model.buffers()],
            "opt_state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                          for i, st in state["state"].items()},
            "opt_groups": json.dumps(state["param_groups"]), "opt_type": {type(v).__name__ for v in opt.state.values()},
            "sched": json.dumps(sched.state_dict()), "torch_rng": torch.get_rng_state().clone(),
            "np_rng": repr(np.random.get_state()), "py_rng": random.getstate(),
            "supervisor": json.dumps(guard.supervisor.state_dict(), default=str)}


def same(a: dict, b: dict) -> bool:
    for key in ("params", "buffers"):
        if len(a[key]) != len(b[key]) or not all(torch.equal(x, y) for x, y in zip(a[key], b[key])):
            return False
    if a["opt_state"].keys() != b["opt_state"].keys():
        return False
    for i in a["opt_state"]:
        sa, sb = a["opt_state"][i], b["opt_state"][i]
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                             for k in sa):
            return False
    return torch.equal(a["torch_rng"], b["torch_rng"]) and all(
        a[k] == b[k] for k in ("opt_groups", "opt_type", "sched", "np_rng", "py_rng", "supervisor"))


@pytest.fixture
def trained(tmp_path):
    """A guard with history (a backed-off step), its checkpoint, then two more steps."""
    np.random.seed(0)
    model, opt, sched, guard = build()
    train(model, guard, sched, 4, nan_at=(1,))
    path = guard.save_checkpoint(tmp_path / "run.ckpt", epoch=0, batch=4)
    saved = everything(model, opt, sched, guard)
    train(model, guard, sched, 2)
    return model, opt, sched, guard, path, saved


def forge(path, target, edit, kind="TorchGuard"):
    """A well-formed checkpoint (valid checksum) whose state is ``edit(state)``: what only a bug or a
    foreign writer produces, so every check after the checksum is exercised."""
    state = checkpoint.load(path)
    if edit is not None:
        edit(state)
    return checkpoint.save(target, state, meta={"kind": kind})


def _opt_list(s):
    s["torch"]["optimizer"]["state"][0] = [1, 2]


def _rename(s):
    s["torch"]["optimizer"]["state"][0]["exp_avg_renamed"] = s["torch"]["optimizer"]["state"][0].pop("exp_avg")


def _dtype(s):
    s["torch"]["params"][2] = s["torch"]["params"][2].double()


def _bad_python_rng(s):
    s["torch"]["rng"]["python"] = (3, (1, 2), None)


def _rows(s):
    s["supervisor"]["rows"] = "x"


@pytest.mark.parametrize("edit, message", [
    (_opt_list, "optimizer"),                    # one flip left optimizer.state holding a list
    (_rename, "exp_avg"),                        # Adam's moments silently restarting
    (_dtype, r"params\[2\] is float64"),
    (_bad_python_rng, "RNG"),
    (_rows, "policy state"),
    (lambda s: s.update(position=["sdep", 5]), "position"),
    (lambda s: s["supervisor"].pop("events"), "policy state holds"),
    (lambda s: s.pop("position"), r"sections missing \['position'\]"),
    (lambda s: s.update(extra=1), r"unknown \['extra'\]"),
    (lambda s: s["torch"].pop("scaler"), "torch state holds"),
    (lambda s: s["torch"]["optimizer"]["param_groups"][0].update(lr2=1), "parameter groups"),
])
def test_a_refused_load_changes_nothing(trained, tmp_path, edit, message):
    """Failure 2: format 1 wrote the parameters before checking the later sections, then raised a raw
    TypeError/KeyError with the model already overwritten."""
    model, opt, sched, guard, path, _ = trained
    bad = forge(path, tmp_path / "bad.ckpt", edit)
    before = everything(model, opt, sched, guard)
    with pytest.raises(CheckpointError, match=message) as info:
        guard.load_checkpoint(bad)
    assert "bad.ckpt" in str(info.value)
    assert same(everything(model, opt, sched, guard), before)


def test_a_good_load_restores_everything(trained):
    model, opt, sched, guard, path, saved = trained
    assert guard.load_checkpoint(path) == {"epoch": 0, "batch": 4}
    assert same(everything(model, opt, sched, guard), saved)


def test_header_bits_are_covered_by_the_checksum(trained):
    """Failure 1: 91 of 300 flips in the format-1 header loaded with different state. Every bit of
    the header is flipped here; each must be refused, and the live state stays as it was."""
    model, opt, sched, guard, path, _ = trained
    data = path.read_bytes()
    (hlen,) = struct.unpack(">Q", data[15:23])
    before = everything(model, opt, sched, guard)
    rng = np.random.default_rng(1)
    for byte in rng.choice(np.arange(23, 23 + hlen), size=60, replace=False):
        flipped = bytearray(data)
        flipped[byte] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            guard.load_checkpoint(path)
    assert same(everything(model, opt, sched, guard), before)


def test_foreign_files_get_one_clear_error(trained, tmp_path):
    """Failure 9: a directory (IsADirectoryError), a list header (AttributeError), a Keras checkpoint
    (KeyError: 'torch'), another model's."""
    model, opt, sched, guard, path, _ = trained
    (tmp_path / "dir.ckpt").mkdir()
    header = json.dumps([1, 2]).encode()
    body = checkpoint.MAGIC + struct.pack(">Q", len(header)) + header
    (tmp_path / "list.ckpt").write_bytes(body + hashlib.sha256(body).digest())
    keras_like = checkpoint.save(tmp_path / "keras.ckpt", {"keras": {}, "supervisor": {}, "rng": {}, "position": {}},
                                 meta={"kind": "keras_guard"})
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    other_path = stabilize.TorchGuard(other, torch.optim.Adam(other.parameters())).save_checkpoint(tmp_path / "o.ckpt")
    forge(path, tmp_path / "trainer.ckpt", None, kind="StabilityTrainer")
    before = everything(model, opt, sched, guard)  # the other model's initialisation drew from the RNG
    cases = {"dir.ckpt": "is a directory", "list.ckpt": "header is a list", "keras.ckpt": "written by keras_guard",
             "o.ckpt": "another model", "trainer.ckpt": "written by StabilityTrainer"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            guard.load_checkpoint(tmp_path / name)
        assert name in str(info.value)
    assert keras_like.exists() and other_path.exists()
    assert same(everything(model, opt, sched, guard), before)


def test_a_save_failure_names_the_checkpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "run.ckpt"  # its directory is a file
    with pytest.raises(checkpoint.CheckpointWriteError, match="cannot save checkpoint .*run.ckpt") as info:
        checkpoint.save(target, {"w": np.ones(2)})
    assert isinstance(info.value, OSError) and info.value.errno is not None


def test_a_load_never_deletes_a_temp_file(tmp_path):
    """Failure 7: the load deleted a dead writer's temp file (and failed in a read-only directory);
    the same clean-up would delete a live writer's temp file on a shared filesystem."""
    path = checkpoint.save(tmp_path / "run.ckpt", {"w": np.ones(3)})
    other = tmp_path / ".run.ckpt.tmp-otherhost-1-abcdef01"  # a live writer elsewhere
    dead = tmp_path / f".run.ckpt.tmp-{checkpoint._host()}-999999999-abcdef01"  # pid gone on this host
    for p in (other, dead):
        p.write_bytes(b"partial")
    os.chmod(tmp_path, 0o555)
    try:
        assert checkpoint.load(path)["w"].tolist() == [1.0, 1.0, 1.0]
    finally:
        os.chmod(tmp_path, 0o755)
    assert other.exists() and dead.exists()
    own = tmp_path / f".run.ckpt.tmp-{checkpoint._host()}-{os.getpid()}-abcdef01"  # this writer's leftover
    own.write_bytes(b"partial")
    checkpoint.save(path, {"w": np.zeros(3)})
    assert not own.exists() and other.exists() and dead.exists()  # only its own; the rest age out


def test_a_version_1_file_is_refused_by_name_and_upgraded_on_request(tmp_path):
    payload_state = {"w": np.arange(4.0)}
    tensors: list = []
    structure = checkpoint._encode(payload_state, tensors)
    _, payload = checkpoint._pack(tensors)
    header = json.dumps({"format": "stabilize-checkpoint", "version": 1, "codec": "npz", "payload_bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest(), "structure": structure,
                         "meta": {"kind": "x"}}).encode()
    path = tmp_path / "v1.ckpt"
    path.write_bytes(checkpoint.MAGIC + struct.pack(">Q", len(header)) + header + payload)
    with pytest.raises(CheckpointError, match="format version 1.*upgrade"):
        checkpoint.load(path)
    checkpoint.upgrade(path)
    assert checkpoint.load(path)["w"].tolist() == [0, 1, 2, 3] and checkpoint.read_header(path)["meta"] == {"kind": "x"}
