"""``stabilize.lightning.StabilityCallback`` in a real Lightning Trainer (CPU, a BatchNorm MLP, Adam,
a per-step scheduler): a bad batch leaves the run bit-identical to one that never saw it; a clean run is
bit-identical to the same Trainer without the callback; resume; the CSV logger; two DDP ranks."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

import stabilize.lightning  # noqa: E402
from lightning_models import BNModule, assert_same, data, loader, state, trainer  # noqa: E402

pytestmark = pytest.mark.needs("lightning")
HERE = Path(__file__).resolve().parent


def _fit(ds, callback=True, module=None, max_epochs=1, settings=None, **kw):
    module = module or BNModule()
    cbs = [stabilize.lightning.StabilityCallback(**(settings or {"on_nonfinite": "skip"}))] if callback else []
    tr = trainer(cbs, max_epochs=max_epochs, **kw)
    tr.fit(module, loader(ds))
    return state(module, tr), tr, (cbs[0] if cbs else None)


@pytest.mark.parametrize("kind", ["nan", "inf-loss", "spike"])
def test_a_bad_batch_leaves_the_run_equal_to_one_without_it(kind):
    settings, n, bad = {"on_nonfinite": "skip"}, 6, 4
    if kind == "spike":  # the detector needs a few clean steps first
        settings, n, bad = dict(settings, spike="skip", spike_warmup=5), 12, 10
    got, _, cb = _fit(data(bad=bad, kind=kind, n_batches=n), settings=settings)
    ref, _, _ = _fit(data(drop=(bad,), n_batches=n), settings=settings)
    assert_same(ref, got)  # parameters, BatchNorm buffers, Adam state and step, scheduler, rates
    (event,) = cb.guard.history.events
    assert (event.epoch, event.batch_index, event.step, event.action) == (0, bad, bad, "skipped")
    assert event.kind == ("spike" if kind == "spike" else "nonfinite")
    if kind == "inf-loss":
        assert event.nonfinite == ("loss",)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_clean_run_is_bit_identical_to_the_trainer_without_the_callback(precision):
    got, _, cb = _fit(data(), precision=precision, max_epochs=2)
    ref, _, _ = _fit(data(), callback=False, precision=precision, max_epochs=2)
    assert_same(ref, got)
    assert cb.guard.supervisor.applied == 12 and cb.guard.history.events == []


def test_accumulation_marks_once_per_window_and_skips_the_whole_window():
    got, _, cb = _fit(data(bad=3), accumulate_grad_batches=2)
    ref, _, _ = _fit(data(drop=(2, 3)), accumulate_grad_batches=2)
    assert_same(ref, got)
    assert [(e.batch_index, e.step) for e in cb.guard.history.events] == [(3, 1)]
    assert cb.guard.supervisor.step == 3  # one guarded step per window of two micro-batches


def test_manual_optimization():
    got, _, cb = _fit(data(bad=2), module=BNModule(manual=True))
    ref, _, _ = _fit(data(drop=(2,)), module=BNModule(manual=True))
    assert_same(ref, got)
    assert [e.action for e in cb.guard.history.events] == ["skipped"]


def test_a_training_step_returning_none_leaves_the_batchnorm_statistics_alone():
    got, _, _ = _fit(data(bad=2, kind="inf-loss"), module=BNModule(return_none_on_flag=True))
    ref, _, _ = _fit(data(drop=(2,)))
    assert_same(ref, got)  # Lightning's own skip, completed: forward pass and scheduler step undone


def test_gradient_clip_val_is_taken_over_and_not_given_twice():
    got, _, cb = _fit(data(), gradient_clip_val=0.05)
    own, _, _ = _fit(data(), settings={"on_nonfinite": "skip", "clip_norm": 0.05})
    assert cb.guard.settings.clip_norm == 0.05
    assert_same(own, got)  # the Trainer's bound, clipped by the guard
    # Lightning's own clip_grad_nor_ takes the same formula: equal bits over the first steps. (Later the
    # bias before BatchNorm, whose gradient is pure rounding noise, drifts under Adam: the float64 norm.)
    got, _, _ = _fit(data(), gradient_clip_val=0.05, limit_train_batches=2)
    ref, _, _ = _fit(data(), callback=False, gradient_clip_val=0.05, limit_train_batches=2)
    assert_same(ref, got)
    with pytest.raises(ValueError, match="the clip is given twice"):
        _fit(data(), settings={"clip_norm": 1.0}, gradient_clip_val=0.5)


def test_settings_are_checked_with_torchguards_messages():
    with pytest.raises(ValueError, match="on_nonfinite"):
        stabilize.lightning.StabilityCallback(on_nonfinite="skipp")
    with pytest.raises(ValueError, match="spike='rewind'"):
        stabilize.lightning.StabilityCallback(spike="rewind")


def test_resume_from_a_lightning_checkpoint_after_a_skip_is_bit_identical(tmp_path):
    settings = {"on_nonfinite": "backoff", "backoff_factor": 0.5}  # the back-off rides in the checkpoint
    ref, _, ref_cb = _fit(data(bad=2), settings=settings, max_epochs=2)
    _, tr, _ = _fit(data(bad=2), settings=settings, max_epochs=1)
    tr.save_checkpoint(tmp_path / "one.ckpt")
    module = BNModule()
    cb = stabilize.lightning.StabilityCallback(**settings)
    tr2 = trainer([cb], max_epochs=2)
    tr2.fit(module, loader(data(bad=2)), ckpt_path=str(tmp_path / "one.ckpt"))
    assert_same(ref, state(module, tr2))
    same = lambda sup: json.dumps(sup.state_dict(), sort_keys=True)  # noqa: E731 - NaN != NaN in a dict compare
    assert same(cb.guard.supervisor) == same(ref_cb.guard.supervisor)
    assert cb.guard.supervisor.policy.backoffs == 2  # batch 2 failed in both epochs


def test_events_reach_the_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    _fit(data(bad=3), logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    (path,) = tmp_path.glob("run/*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    steps = [r for r in rows if r.get("stabilize/skipped")]
    assert [float(r["stabilize/skipped"]) for r in steps] == [0, 0, 0, 1, 1, 1]
    assert [float(r["stabilize/applied"]) for r in steps] == [1, 1, 1, 0, 1, 1]
    assert float(steps[3]["stabilize/events"]) == 1 and steps[3]["stabilize/loss"] == "nan"


@pytest.mark.slow
def test_ddp_two_ranks_fault_on_one_rank_same_decision(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(HERE / "lightning_ddp_worker.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    faulty = r0["faulty_batches"] + r1["faulty_batches"]
    assert len(faulty) == 1 and r0["faulty_batches"] != r1["faulty_batches"]  # one rank saw the fault
    assert r0["events"] == r1["events"] == [[0, faulty[0], "skipped"]]
    assert r0["applied"] == r1["applied"] == 3 and torch.isfinite(torch.cat([p.flatten() for p in r0["params"].values()])).all()
