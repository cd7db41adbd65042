"""The JSON-lines event log: every event appended as it happens, set by events_path= or beside a checkpoint."""

import json

import numpy as np
import pytest
from conftest import load_backend

from stabilize import StabilityTrainer, eventlog, scenarios
from stabilize.models import MLP
from stabilize.optim import SGD
from stabilize.scenarios import losses as L


@pytest.mark.slow  # a long fit (about 3 s of CPU)
def test_every_event_of_a_rewind_run_is_one_json_line(tmp_path):
    load_backend("torch")
    path = tmp_path / "logs" / "run.events.jsonl"
    case = scenarios.build("loss-spike", "diverging")
    t = StabilityTrainer(MLP((4, 32, 32, 1), seed=0), L.naive_mse, SGD(lr=0.01, momentum=0.9), backend="torch",
                         dtype="float64", progress=False, spike="rewind", spike_warmup=10, snapshot_every=5,
                         spike_skip_batches=3, events_path=str(path))
    h = t.fit(case.x, case.y, epochs=2, batch_size=32, shuffle=False)
    lines = path.read_text().splitlines()
    assert len(lines) == len(h.events) >= 4
    records = [json.loads(line) for line in lines]  # strict JSON: no bare NaN
    assert [(r["step"], r["kind"], r["action"]) for r in records] == [(e.step, e.kind, e.action) for e in h.events]
    assert records[0]["kind"] == "spike" and records[0]["action"] == "rewound" and records[0]["steps_lost"] == 4
    assert records[1]["loss"] == "NaN" and np.isnan(eventlog.read(path)[1]["loss"])  # a left-out batch


def test_a_trainer_starts_the_log_beside_its_checkpoint_with_the_events_so_far(tmp_path):
    torch_mod = load_backend("torch")  # noqa: F841
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    X = np.random.default_rng(0).normal(size=(64, 4))
    y = X.sum(1, keepdims=True)
    X[5, 0] = np.nan  # one bad batch: one "nonfinite" event
    t = StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.01), progress=False)
    t.fit(X, y, epochs=1, batch_size=16, shuffle=False)
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    log = tmp_path / "run.ckpt.events.jsonl"
    assert eventlog.beside(ckpt) == log
    first = eventlog.read(log)
    assert [(r["step"], r["kind"]) for r in first] == [(0, "nonfinite")]
    t.fit(X, y, epochs=1, batch_size=16, shuffle=False)  # later events are appended to the same file
    assert [(r["step"], r["kind"]) for r in eventlog.read(log)] == [(0, "nonfinite"), (4, "nonfinite")]


# -- crashes and resumes (issue 17) ---------------------------------------------------------------
def _trainer(events_path=None):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    extra = {"events_path": str(events_path)} if events_path else {}
    return StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.01), progress=False, **extra)


def _data():
    X = np.random.default_rng(0).normal(size=(64, 4))
    y = X.sum(1, keepdims=True)
    X[5, 0] = np.nan  # one bad batch per epoch: one "nonfinite" event each
    return X, y


def test_one_record_per_event_across_resumes(tmp_path):
    """Failure 4: save, resume in a new trainer, fit, save appended the restored events again (3 records
    for 2 events), and the events after a resume were written only at the next save."""
    load_backend("torch")
    X, y = _data()
    ckpt, log = tmp_path / "run.ckpt", tmp_path / "run.ckpt.events.jsonl"
    t = _trainer()
    t.fit(X, y, epochs=1, batch_size=16, shuffle=False)
    t.save_checkpoint(ckpt)
    for resume in range(3):  # three resumes, each a fresh trainer
        t = _trainer()
        t.load_checkpoint(ckpt)
        t.fit(X, y, epochs=1, batch_size=16, shuffle=False)
        steps = [(r["step"], r["epoch"]) for r in eventlog.read(log)]
        assert steps == [(4 * k, k) for k in range(resume + 2)]  # appended as it happened, before any save
        t.save_checkpoint(ckpt)
        assert len(eventlog.read(log)) == len(t.history.events) == resume + 2
    t = _trainer()  # a crash after events beyond the checkpoint: the resumed run does those steps again
    t.load_checkpoint(ckpt)
    t.fit(X, y, epochs=1, batch_size=16, shuffle=False)
    t = _trainer()
    t.load_checkpoint(ckpt)
    assert len(eventlog.read(log)) == 4
    t.fit(X, y, epochs=1, batch_size=16, shuffle=False)
    assert [r["step"] for r in eventlog.read(log)] == [0, 4, 8, 12, 16]


def test_a_full_disk_for_the_log_never_stops_training(tmp_path):
    """Failure 5: guard.step() raised OSError: [Errno 28] when it logged an event."""
    import os
    import warnings

    import pytest
    import torch

    import stabilize

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    guard = stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), events_path="/dev/full")
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            y = torch.full((4, 1), float("nan")) if step % 2 else torch.zeros(4, 1)
            guard.step(torch.nn.functional.mse_loss(model(x), y))
    assert len(guard.history.events) == 3 and guard.supervisor.event_log.failures == 3
    said = [w for w in caught if "cannot write the event log" in str(w.message)]
    assert len(said) == 1 and "/dev/full" in str(said[0].message)  # warned once, counted every time


def test_read_skips_a_torn_last_line_and_names_any_other_bad_line(tmp_path):
    """Failure 6: a torn last line raised a bare JSONDecodeError; invalid UTF-8 a UnicodeDecodeError; a
    non-object line an AttributeError; none named the file or the line."""
    import pytest

    from stabilize.eventlog import EventLog, EventLogError
    from stabilize.history import Event

    path = tmp_path / "run.events.jsonl"
    log = EventLog(path)
    for step in range(3):
        log.append(Event(step, step, 0, "nonfinite", ("loss",), "skipped", 0.1, float("nan"), 1.0))
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # a kill in the middle of the third append
    with pytest.warns(RuntimeWarning, match="line 3 is torn"):
        assert [r["step"] for r in eventlog.read(path)] == [0, 1]
    with pytest.warns(RuntimeWarning, match="torn line"):  # the next append cuts the torn tail first
        EventLog(path).append(Event(9, 9, 0, "nonfinite", ("loss",), "skipped", 0.1, 1.0, 1.0))
    assert [r["step"] for r in eventlog.read(path)] == [0, 1, 9]
    lines = whole.split(b"\n")
    for bad, what in ((b"\xff\xfe", "not a JSON record"), (b"[1, 2]", "a JSON list"), (b"{oops", "not a JSON record")):
        path.write_bytes(b"\n".join([lines[0], bad, lines[1]]) + b"\n")
        with pytest.raises(EventLogError, match=f"run.events.jsonl', line 2: {what}"):
            eventlog.read(path)
