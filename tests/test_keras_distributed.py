"""keras_guard under tf.distribute.MirroredStrategy (2 logical CPU devices, in a child process).

A fault in ONE replica's shard of a batch (a NaN input, or an inf loss whose gradients are finite) must
stop the update on every replica: the mirrored weights and optimizer state stay identical across replicas
and equal to the pre-step state. A clean run equals the unguarded MirroredStrategy fit bitwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("keras_dist_worker.py")
ROOT = WORKER.parent.parent


def run(fault, policy, clip="none", checkpoint=None, batchnorm=False, replicas=2):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("WORKER_BATCHNORM", None)
    env["WORKER_REPLICAS"] = str(replicas)
    if batchnorm:
        env["WORKER_BATCHNORM"] = "1"
    out = subprocess.run([sys.executable, str(WORKER), fault, policy, clip] + ([str(checkpoint)] if checkpoint else []), capture_output=True, text=True, check=False,
                         timeout=240, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"worker failed (rc {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("fault", ["nan_input", "inf_loss", "nan_grad"])
@pytest.mark.parametrize("policy", ["skip", "backoff", "rollback"])
def test_fault_on_one_replica_is_skipped_on_every_replica(fault, policy):
    r = run(fault, policy, clip="0.5")
    assert r["error"] is None
    steps = r["steps"]
    assert len(steps) == 3
    assert all(s["agree"] for s in steps), "the replicas' weights or optimizer state differ"
    assert r["committed"] == [1.0, 0.0, 1.0]
    if policy == "rollback":  # max_bad_steps=1: every replica back to the snapshot taken at train begin
        n = len(r["initial"])
        assert same(steps[1]["values"][:n], r["initial"]) and not same(steps[0]["values"][:n], r["initial"])
        assert steps[1]["values"][n] == 0  # iterations, restored with the optimizer's state
    else:  # step 1 (the faulty batch) applied nothing anywhere: weights, moments and iterations as after step 0
        assert same(steps[1]["values"], steps[0]["values"])
    assert not same(steps[2]["values"], steps[1]["values"])
    if policy in ("backoff", "rollback"):  # a rollback lowers the rate too
        assert steps[1]["lr_factor"] < 1.0 and r["lr"][2] < r["lr"][0]
    else:
        assert steps[1]["lr_factor"] == 1.0 and r["lr"][2] == r["lr"][0]


@pytest.mark.parametrize("fault", ["inf_loss", "nan_grad"])
def test_raise_is_collective(fault):
    r = run(fault, "raise")
    assert r["error"] == "NonFiniteError"
    assert r["committed"] == [1.0, 0.0]
    assert all(s["agree"] for s in r["steps"]) and r["after_raise"]["agree"]
    assert same(r["after_raise"]["values"], r["steps"][0]["values"])  # the bad step applied nowhere


def test_clean_run_equals_unguarded_mirrored_fit_bitwise():
    guarded, plain = run("none", "skip"), run("none", "unguarded")
    assert guarded["committed"] == [1.0, 1.0, 1.0]
    assert all(s["agree"] for s in guarded["steps"])
    for g, p in zip(guarded["steps"], plain["steps"]):
        assert same(g["values"], p["values"])


def test_clip_coefficient_is_global():
    """With clipping, the step still agrees across replicas (one coefficient, from the summed gradients)."""
    r = run("none", "skip", clip="0.01")
    assert all(s["agree"] for s in r["steps"]) and r["committed"] == [1.0, 1.0, 1.0]
    assert not same(r["steps"][0]["values"], run("none", "unguarded")["steps"][0]["values"])


def test_checkpoint_under_the_strategy_loads_into_every_replica(tmp_path):
    """Saved after a skipped step (backoff), loaded into a fresh model in the strategy's scope: every
    replica of every variable (weights, moments, iterations) equals the saved run's."""
    r = run("nan_input", "backoff", "0.5", checkpoint=tmp_path / "d.ckpt")
    assert r["loaded"] == {"position": {"batch": 3}, "differed": True, "equal": True}


def test_batchnorm_statistics_are_put_back_on_each_replica():
    """A NaN in replica 1's shard poisons only that replica's BatchNorm statistics in the forward pass
    (Keras keeps them per replica); the skipped step puts each replica's own statistics back."""
    r = run("nan_input", "skip", batchnorm=True)
    steps = r["steps"]
    assert r["committed"] == [1.0, 0.0, 1.0] and all(s["agree"] for s in steps)
    assert steps[0]["buffers"] and steps[1]["buffers"] == steps[0]["buffers"]
    assert steps[2]["buffers"] != steps[1]["buffers"]
    assert all(np.isfinite(np.asarray(x)).all() for s in steps for v in s["buffers"] for x in v)


def test_a_strategy_with_one_replica():
    """MirroredStrategy over one device still runs the step through the strategy (a merge_call in a
    replica-context cond fails there too): the bad step is skipped."""
    r = run("nan_input", "skip", replicas=1)
    assert r["error"] is None and r["committed"] == [1.0, 0.0, 1.0]
    assert r["steps"][1]["values"] == r["steps"][0]["values"]


def test_a_spike_is_skipped_on_every_replica():
    """spike="skip": the loss and norm the verdict reads are reduced across replicas, so both replicas
    hold the spiking step back together, and their weights and optimizer state stay equal."""
    r = run("spike", "skip")
    assert r["error"] is None and r["spike"] == [0.0, 0.0, 1.0] and r["committed"] == [1.0, 1.0, 0.0]
    steps = r["steps"]
    assert all(s["agree"] for s in steps) and same(steps[2]["values"], steps[1]["values"])
