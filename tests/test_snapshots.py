"""Rollback snapshots: held only under a policy that restores them, on the device, on the host or on
disk, and a rollback from each leaves bit-identical state."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402
from stabilize.guard.settings import GuardSettings  # noqa: E402
from stabilize.models import MLP  # noqa: E402
from stabilize.optim import Adam  # noqa: E402


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X @ rng.normal(size=(4, 1))).astype(np.float32)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 1))


def _state(model, opt):
    out = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    for s in opt.state.values():
        out += [v.detach().clone() for v in s.values() if torch.is_tensor(v)]
    return out


def _run_with_rollback(tmp_path, where):
    """Two good batches, then three NaN-target batches in a row: a rollback to the snapshot."""
    X, y = _data()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    options = {"snapshot_path": str(tmp_path / "snap.ckpt")} if where == "disk" else {}
    t = stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite="rollback", max_bad_steps=3, snapshot_every=2,
                                   snapshot_to=where, progress=False, diagnose=False, **options)
    t.fit(X[:32], y[:32], batch_size=16, shuffle=False)
    at_snapshot = _state(model, opt)
    held = t.held_bytes()
    bad = y[:48].copy()
    bad[:] = np.nan
    h = t.fit(X[:48], bad, batch_size=16, shuffle=False)
    assert [e.action for e in h.events][-1] == "rolled-back"
    return model, opt, at_snapshot, held


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_a_rollback_from_each_place_restores_the_state_bitwise(tmp_path, where):
    model, opt, at_snapshot, held = _run_with_rollback(tmp_path, where)
    for a, b in zip(at_snapshot, _state(model, opt)):
        assert torch.equal(a, b)
    params = sum(p.numel() * 4 for p in model.parameters())
    adam = 2 * params + 4 * len(list(model.parameters()))  # exp_avg, exp_avg_sq and a float32 step each
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if where == "disk":  # nothing in memory but the buffers a skipped step puts back
        assert held == buffers and (tmp_path / "snap.ckpt").stat().st_size > params + adam
    else:  # the snapshot (parameters, buffers, Adam state, RNG state) plus the put-back buffers
        rng = torch.get_rng_state().numel()
        assert held == params + adam + 2 * buffers + rng


def test_no_snapshot_is_held_under_a_policy_that_cannot_restore_one():
    X, y = _data()
    for policy in ("skip", "backoff", "auto", "raise"):
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        t = stabilize.StabilityTrainer(model, "mse", opt, on_nonfinite=policy, progress=False)
        t.fit(X, y, batch_size=16)
        assert t.held_bytes() == sum(b.numel() * b.element_size() for b in model.buffers()), policy
        guard = stabilize.TorchGuard(model, opt, on_nonfinite=policy)
        guard.step(torch.nn.functional.mse_loss(model(torch.from_numpy(X[:8])), torch.from_numpy(y[:8])))
        assert guard._snapshots.held is False


def test_a_host_snapshot_lives_on_the_cpu_and_a_disk_one_in_a_checksummed_file(tmp_path):
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="rollback", snapshot_to="host")
    X, y = _data()
    guard.step(torch.nn.functional.mse_loss(model(torch.from_numpy(X[:8])), torch.from_numpy(y[:8])))
    snap = guard._snapshots._held
    assert all(p.device.type == "cpu" for p in snap.params)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(snap.params, model.parameters()))
    path = tmp_path / "rollback.ckpt"
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="rollback", snapshot_to="disk", snapshot_path=path)
    guard.step(torch.nn.functional.mse_loss(model(torch.from_numpy(X[:8])), torch.from_numpy(y[:8])))
    assert stabilize.checkpoint.read_header(path)["meta"]["kind"] == "rollback snapshot"
    assert guard.held_bytes() == sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("where", ["host", "disk"])
def test_neutral_spec_rollback_from_host_and_disk_matches_the_device_one(tmp_path, where):
    X, y = _data()
    bad = y.copy()
    bad[32:] = np.nan
    out = {}
    for place in ("device", where):
        options = {"snapshot_path": str(tmp_path / f"{place}.ckpt")} if place == "disk" else {}
        t = stabilize.StabilityTrainer(MLP((4, 8, 1), seed=0), "mse", Adam(lr=1e-2), backend="torch",
                                       on_nonfinite="rollback", max_bad_steps=2, snapshot_every=1, snapshot_to=place,
                                       progress=False, diagnose=False, **options)
        h = t.fit(X, bad, batch_size=8, shuffle=False)
        out[place] = (t.get_weights(), [e.action for e in h.events])
    assert out["device"][1] == out[where][1] and "rolled-back" in out[where][1]
    for a, b in zip(out["device"][0], out[where][0]):
        np.testing.assert_array_equal(a, b)


def test_snapshot_settings_are_checked():
    with pytest.raises(ValueError, match="snapshot_to must be one of"):
        GuardSettings(on_nonfinite="rollback", snapshot_to="gpu")
    with pytest.raises(ValueError, match="snapshot_to='disk' needs snapshot_path"):
        GuardSettings(on_nonfinite="rollback", snapshot_to="disk")
    with pytest.raises(ValueError, match="snapshot_path is used only with snapshot_to='disk'"):
        GuardSettings(on_nonfinite="rollback", snapshot_path="x.ckpt")
    with pytest.raises(ValueError, match="snapshot_to='host' has no effect"):
        GuardSettings(snapshot_to="host")
    with pytest.raises(TypeError, match="snapshot_path must be a path, got int"):
        GuardSettings(on_nonfinite="rollback", snapshot_to="disk", snapshot_path=3)


def test_each_rank_writes_its_own_disk_snapshot(tmp_path, monkeypatch):
    from stabilize.guard import snapshots

    monkeypatch.setattr(snapshots, "world_size", lambda: 2)
    monkeypatch.setattr(snapshots, "rank", lambda: 1)
    settings = GuardSettings(on_nonfinite="rollback", snapshot_to="disk", snapshot_path=str(tmp_path / "s.ckpt"))
    store = snapshots.SnapshotStore(settings, lambda where: {"w": np.arange(3.0)}, lambda snap: None)
    store.take()
    assert store.path == str(tmp_path / "s.ckpt.rank1") and (tmp_path / "s.ckpt.rank1").exists()
    assert not (tmp_path / "s.ckpt").exists()
