"""A small fault campaign against checkpoints and the event log (issue 17), kept well under 60 s.

Each trial injects one fault and classifies the outcome:

* **refused**: a clear error (CheckpointError / a warning naming the torn line), and the live state
  bitwise as it was;
* **identical**: the load succeeded and gave exactly the state that was saved;
* **silent**: anything else (a load that changed the state, a refusal that changed it anyway, a log
  read that lost or invented a record). There must be none.

The counts are printed (``pytest -s``) and checked.
"""

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint_faults import build, everything, same, train

from stabilize import checkpoint, eventlog
from stabilize.checkpoint import CheckpointError
from stabilize.eventlog import EventLog
from stabilize.history import Event

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
COUNTS: dict = {}


def tally(name, outcome):
    c = COUNTS.setdefault(name, {"trials": 0, "refused": 0, "identical": 0, "silent": 0})
    c["trials"] += 1
    c[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = {k: sum(c[k] for c in COUNTS.values()) for k in ("trials", "refused", "identical", "silent")}
    for name, c in sorted(COUNTS.items()) + [("TOTAL", total)]:
        print(f"\ncampaign {name:>18}: trials {c['trials']:4d}  refused {c['refused']:4d}  identical "
              f"{c['identical']:4d}  silent {c['silent']}", end="")
    print()


_SAVER = """
import sys, numpy as np
from stabilize import checkpoint
path, n = sys.argv[1], 400_000
states = [{"w": np.arange(n, dtype=np.float64) * k, "step": k} for k in (1, 2)]
checkpoint.save(path, states[0])
print("ready", flush=True)
i = 1
while True:
    checkpoint.save(path, states[i % 2])
    i += 1
"""


def test_kill_during_save(tmp_path):
    """SIGKILL at random moments of a save loop: the file is always one of the two states, whole."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rng = np.random.default_rng(0)
    path = tmp_path / "run.ckpt"
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(float(rng.uniform(0.01, 0.2)))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        try:
            state = checkpoint.load(path)
        except CheckpointError:
            tally("kill-during-save", "silent")  # a kill must never leave a bad file
            continue
        k = state["step"]
        ok = k in (1, 2) and np.array_equal(state["w"], np.arange(400_000, dtype=np.float64) * k)
        tally("kill-during-save", "identical" if ok else "silent")
    assert COUNTS["kill-during-save"]["silent"] == 0


def test_whole_file_bit_flips(tmp_path):
    """One flipped bit anywhere in a TorchGuard checkpoint (signature, header, payload, digest)."""
    np.random.seed(0)
    model, opt, sched, guard = build(spike="skip")
    train(model, guard, sched, 5, nan_at=(2,))
    path = guard.save_checkpoint(tmp_path / "run.ckpt", epoch=1)
    saved = everything(model, opt, sched, guard)
    train(model, guard, sched, 2)
    data = path.read_bytes()
    rng = np.random.default_rng(1)
    for byte in rng.integers(0, len(data), size=120):
        flipped = bytearray(data)
        flipped[byte] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        before = everything(model, opt, sched, guard)
        try:
            guard.load_checkpoint(path)
        except CheckpointError:
            tally("bit-flips", "refused" if same(everything(model, opt, sched, guard), before) else "silent")
            continue
        tally("bit-flips", "identical" if same(everything(model, opt, sched, guard), saved) else "silent")
    assert COUNTS["bit-flips"]["silent"] == 0


def test_torn_event_log(tmp_path):
    """The log cut at every byte (a kill mid-append): read gives exactly the whole records before the cut."""
    path = tmp_path / "run.events.jsonl"
    log = EventLog(path)
    events = [Event(s, s, 0, "nonfinite", ("loss",), "skipped", 0.1, float("nan"), float(s)) for s in range(4)]
    for e in events:
        log.append(e)
    whole = path.read_bytes()
    ends = [i + 1 for i, b in enumerate(whole) if b == ord("\n")]
    for cut in range(len(whole) + 1):
        path.write_bytes(whole[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                steps = [r["step"] for r in eventlog.read(path)]
            except Exception:  # noqa: BLE001 - any error on a torn log is a failure
                tally("torn-event-log", "silent")
                continue
        complete = sum(1 for e in ends if e - 1 <= cut)  # a record whole but for its newline counts
        torn = cut not in [0] + ends + [e - 1 for e in ends]
        if steps == list(range(complete)) and torn == any("torn" in str(w.message) for w in caught):
            tally("torn-event-log", "refused" if torn else "identical")
        else:
            tally("torn-event-log", "silent")
    assert COUNTS["torn-event-log"]["silent"] == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_full_disk_event_log():
    """Every event written to /dev/full: training goes on, each failure counted."""
    np.random.seed(0)
    model, opt, sched, guard = build()
    guard.supervisor.event_log = EventLog("/dev/full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(6):
            train(model, guard, sched, 1, nan_at=(0,))
            ok = guard.supervisor.event_log.failures == trial + 1 and len(guard.history.events) == trial + 1
            tally("full-disk-log", "refused" if ok else "silent")
    assert COUNTS["full-disk-log"]["silent"] == 0


def test_foreign_files(tmp_path):
    """Files that are not this guard's checkpoint: each one CheckpointError naming it, nothing changed."""
    import hashlib
    import json
    import struct

    np.random.seed(0)
    model, opt, sched, guard = build()
    train(model, guard, sched, 3)
    other = torch.nn.Linear(3, 1)
    import stabilize

    foreign = {
        "other-model.ckpt": lambda p: stabilize.TorchGuard(other, torch.optim.SGD(other.parameters(), lr=1))
        .save_checkpoint(p),
        "keras.ckpt": lambda p: checkpoint.save(p, {"keras": {}, "supervisor": {}, "rng": {}, "position": {}},
                                                meta={"kind": "keras_guard"}),
        "plain.ckpt": lambda p: checkpoint.save(p, {"w": np.ones(3)}),
        "dir.ckpt": lambda p: p.mkdir(),
        "empty.ckpt": lambda p: p.write_bytes(b""),
        "pickle.ckpt": lambda p: torch.save({"w": torch.ones(2)}, p),
        "npz.ckpt": lambda p: np.savez(open(p, "wb"), w=np.ones(2)),
        "list-header.ckpt": lambda p: p.write_bytes(
            (lambda body: body + hashlib.sha256(body).digest())(
                checkpoint.MAGIC + struct.pack(">Q", 6) + json.dumps([1, 2]).encode())),
    }
    for name, make in foreign.items():
        make(tmp_path / name)
    before = everything(model, opt, sched, guard)
    for name in foreign:
        try:
            guard.load_checkpoint(tmp_path / name)
        except CheckpointError as exc:
            ok = name in str(exc) and same(everything(model, opt, sched, guard), before)
            tally("foreign-files", "refused" if ok else "silent")
            continue
        tally("foreign-files", "silent")
    assert COUNTS["foreign-files"]["silent"] == 0
