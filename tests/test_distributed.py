"""Rank-consistent decisions: 2-rank gloo runs with a fault on rank 1 only.

All scenarios run in ONE pair of spawned ranks (``dist_worker.py``), bounded
by a timeout, so the suite pays the start-up of torch.distributed once.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
FAULTS = ("nan_input", "inf_loss", "nan_grad")
POLICIES = ("skip", "backoff", "rollback", "raise")
FAULT_STEP, STEPS = 3, 8
EXPECTED = {"skip": "skipped", "backoff": "backed-off", "rollback": "rolled-back", "raise": "raised"}
DDP = [f"ddp:{f}:{p}" for f in FAULTS for p in POLICIES]
CONTROL = "ddp:inf_loss:skip:off"
FSDP = ["fsdp:none", "fsdp:nan_grad", "fsdp_ckpt"]
SPIKES = ["ddp:spike:spike_skip", "ddp:spike:spike_clip"]
BUFFER = [f"ddp:nan_buffer:{p}" for p in POLICIES]  # BatchNorm's running_mean NaN on rank 1 (issue 17)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, scenarios, world=2, timeout=240):
    """Run ``scenarios`` on ``world`` spawned gloo ranks; return each rank's results. Never hangs.

    A port taken between choosing it and binding it (another test run on the
    machine) is the one failure retried, once, on a new port.
    """
    try:
        return _launch(tmp, scenarios, world, timeout)
    except _PortTaken:
        return _launch(tmp, scenarios, world, timeout)


class _PortTaken(Exception):
    pass


def _launch(tmp, scenarios, world, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(tmp / f"rank{r}.json"),
                               *scenarios], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        if p.returncode != 0 and ("EADDRINUSE" in err or "address already in use" in err.lower()):
            raise _PortTaken(err[-500:])
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("dist"), DDP + [CONTROL] + FSDP + SPIKES + BUFFER)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fault", FAULTS + ("nan_buffer",))
def test_same_decisions_on_every_rank(ranks, fault, policy):
    r0, r1 = (r[f"ddp:{fault}:{policy}"] for r in ranks)
    # the same decision at the same step, on both ranks
    assert r0["actions"] == r1["actions"]
    expected = ["applied"] * FAULT_STEP + [EXPECTED[policy]]
    expected += [] if policy == "raise" else ["applied"] * (STEPS - FAULT_STEP - 1)
    assert r0["actions"] == expected
    assert r0["raised_at"] == r1["raised_at"] == (FAULT_STEP if policy == "raise" else None)
    # bit-identical replicas, equal rates and policy counters
    assert r0["params_equal"] is True and r1["params_equal"] is True
    assert r0["optimizer_equal"] is True and r1["optimizer_equal"] is True
    assert r0["lrs"] == r1["lrs"] and r0["final_lr"] == r1["final_lr"]
    assert r0["norms"] == r1["norms"]
    assert r0["policy_state"] == r1["policy_state"]


@pytest.mark.parametrize("fault", FAULTS)
def test_backoff_rate_is_the_same_on_both_ranks(ranks, fault):
    for r in ranks:
        res = r[f"ddp:{fault}:backoff"]
        # StepLR(step_size=2, gamma=0.9) over 7 applied steps (3 updates of the schedule), backed off once
        assert res["final_lr"] == pytest.approx(0.01 * 0.9**3 * 0.5, rel=1e-12)
        assert res["policy_state"]["backoffs"] == 1


@pytest.mark.parametrize("mode, action", [("spike_skip", "skipped"), ("spike_clip", "clipped")])
def test_a_spike_on_one_rank_is_handled_on_every_rank(ranks, mode, action):
    r0, r1 = (r[f"ddp:spike:{mode}"] for r in ranks)
    assert r0["actions"] == r1["actions"] == ["applied"] * FAULT_STEP + [action] + ["applied"] * (STEPS - FAULT_STEP - 1)
    assert r0["params_equal"] is True and r0["optimizer_equal"] is True and r0["norms"] == r1["norms"]


def test_without_the_reduction_the_replicas_drift(ranks):
    """The failure this fixes: each rank deciding alone (distributed='off') on an inf loss of rank 1."""
    r0, r1 = (r[CONTROL] for r in ranks)
    assert r0["actions"][FAULT_STEP] == "applied" and r1["actions"][FAULT_STEP] == "skipped"
    assert r0["params_equal"] is False and r0["lrs"] != r1["lrs"]


def test_sharded_fsdp2_uses_the_global_norm(ranks):
    r0, r1 = (r["fsdp:none"] for r in ranks)
    assert r0["norm"] == r1["norm"]
    assert r0["norm"] == pytest.approx(r0["true_norm"], rel=1e-6)
    assert r0["shard_norm"] < 0.95 * r0["true_norm"] and r1["shard_norm"] < 0.95 * r1["true_norm"]
    # clipped to clip_norm=1e-3 with the global norm: SGD(lr=0.1) moves the weights by exactly 1e-4
    assert r0["moved"] == pytest.approx(1e-4, rel=1e-4) and r0["params_equal"] is True


def test_sharded_fsdp2_nan_in_one_shard_skips_everywhere(ranks):
    for r in ranks:
        res = r["fsdp:nan_grad"]
        assert res["applied"] is False and res["unchanged"] is True and res["params_equal"] is True


def test_sharded_fsdp2_per_rank_checkpoints_resume_bit_identically(ranks):
    """N steps, each rank saves its own shard, fresh objects load it, N steps == 2N steps straight."""
    for r in ranks:
        res = r["fsdp_ckpt"]
        assert res["sharded"] is True and res["position"] == {"batch": 3}
        assert res["equal"] is True and res["count"] == 4 + 4 * 3 + 1  # shards, Adam's (exp_avg, exp_avg_sq, step), RNG
        assert res["steps"] == 6 and res["applied"] == 6
        assert "not sharded" in res["refused"] and res["untouched"] is True


def test_ddp_example_runs_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    def launch():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(_free_port()), str(ROOT / "examples" / "ddp_guard.py")], capture_output=True,
                              text=True, env=env, timeout=240, cwd=tmp_path)

    out = launch()
    if out.returncode != 0 and "terminate called without an active exception" in out.stderr:
        # gloo's threads intermittently abort the interpreter's teardown after the run is over (seen
        # about once in twenty runs on a loaded CPU, never during the run): launch once more
        out = launch()
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    # rank 0 alone prints: one event line and one summary line, each once
    assert lines == ["step 5: nonfinite [loss]; loss=inf grad_norm=" + lines[0].split("grad_norm=")[1],
                     "ranks: 2, parameters bit-identical across ranks: True, lr now 0.005"]
    assert lines[0].endswith("lr=0.01 -> backed-off")


@pytest.mark.parametrize("policy", POLICIES)
def test_a_nan_buffer_on_one_rank_is_put_back(ranks, policy):
    """Issue 17, failure 3: a NaN in rank 1's BatchNorm buffer during its forward pass left both ranks
    blocked until the gloo time-out. It is part of the step's reduction: both ranks decide the same (checked
    above), a step not applied puts every buffer back, and no NaN stays in a buffer."""
    for r in ranks:
        res = r[f"ddp:nan_buffer:{policy}"]
        assert res["buffers_finite"] is True
        if policy in ("skip", "backoff"):
            assert res["buffers_restored"] is True


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_others_with_an_error_naming_it(tmp_path, victim):
    """Issue 17: a rank that dies mid-run. The survivor's next guarded step raises RankLostError naming the
    lost rank (gloo reports the closed connection at once), not a hang until the collective time-out."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", port, str(tmp_path / f"rank{r}.json"),
                               f"kill:{victim}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    survivor = 1 - victim
    assert procs[victim].returncode == 17, errs[victim][-2000:]
    assert procs[survivor].returncode == 0, errs[survivor][-2000:]
    res = json.loads((tmp_path / f"rank{survivor}.json").read_text())[f"kill:{victim}"]
    assert res["raised_at"] == 3 and f"rank {victim} (" in res["message"] and "was lost" in res["message"]
    # (a hang until the worker's 60 s gloo time-out would raise gloo's time-out error, not RankLostError)
