"""The JSON-lines event log: every event appended as it happens, set by events_path= or beside a checkpoint."""

import json

import numpy as np
from conftest import load_backend

from stabilize import StabilityTrainer, eventlog, scenarios
from stabilize.models import MLP
from stabilize.optim import SGD
from stabilize.scenarios import losses as L


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
