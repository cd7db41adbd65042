"""``stabilize.hf.StabilityCallback`` in a real ``transformers.Trainer``: a 2-layer BERT (hidden 32) built
from a config here, data made here, no download. A bad step leaves parameters, AdamW state, LR scheduler
and rate exactly as they were; a clean run equals the Trainer without the callback; resume; log_history."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import stabilize.hf  # noqa: E402

pytestmark = pytest.mark.needs("transformers", "accelerate")
BATCH, SEQ = 4, 8


class Data(torch.utils.data.Dataset):
    """Token ids and a regression label per sequence; ``bad`` rows carry the fault: ``"nan"`` a NaN label,
    ``"inf-loss"`` the label 77, which :class:`InfLossBert` turns into an infinite loss with finite
    gradients, ``"spike"`` the labels 30 times larger."""

    def __init__(self, n_batches=8, bad=None, kind="nan"):
        r = np.random.default_rng(0)
        n = n_batches * BATCH
        self.ids = torch.as_tensor(r.integers(1, 50, size=(n, SEQ)))
        self.labels = torch.as_tensor(r.normal(size=n).astype(np.float32))
        for i in range(n) if bad is None else range(bad * BATCH, (bad + 1) * BATCH):
            if bad is not None:
                if kind == "nan" and i == bad * BATCH + 1:
                    self.labels[i] = float("nan")
                elif kind == "inf-loss" and i == bad * BATCH + 1:
                    self.labels[i] = 77.0
                elif kind == "spike":
                    self.labels[i] *= 30.0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


class InfLossBert(transformers.BertForSequenceClassification):
    """A loss term that is infinite on its own (a constant): the loss is inf, the gradients finite."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        if out.loss is not None and (labels == 77.0).any():
            out.loss = out.loss + float("inf")
        return out


def _model():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=1)
    torch.manual_seed(0)
    return InfLossBert(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-3,
                lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                train_sampling_strategy="sequential")
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Probe(transformers.TrainerCallback):
    """The state before and after each optimizer step: parameters, AdamW state, scheduler, rate."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _state(self, model, optimizer, lr_scheduler):
        out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
        for i, st in enumerate(optimizer.optimizer.state.values()):
            out.update({f"o:{i}:{k}": v.detach().clone() for k, v in st.items()})
        out["sched"] = json.dumps(lr_scheduler.state_dict(), default=str)
        out["lr"] = [g["lr"] for g in optimizer.param_groups]
        return out

    def on_step_begin(self, args, state, control, model, optimizer, lr_scheduler, **kw):
        self.before[state.global_step] = self._state(model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model, optimizer, lr_scheduler, **kw):
        self.after[state.global_step - 1] = self._state(model, optimizer, lr_scheduler)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


def _train(tmp_path, ds, callback=True, settings=None, resume=None, **kw):
    cb = stabilize.hf.StabilityCallback(**(settings or {"on_nonfinite": "skip"})) if callback else None
    probe = Probe()
    tr = transformers.Trainer(model=_model(), args=_args(tmp_path, **kw), train_dataset=ds,
                              callbacks=[c for c in (cb, probe) if c is not None])
    tr.train(resume_from_checkpoint=resume)
    return tr, cb, probe


@pytest.mark.parametrize("kind", ["nan", "inf-loss", "spike"])
def test_a_bad_step_leaves_params_adam_and_scheduler_as_they_were(tmp_path, kind):
    settings, bad = {"on_nonfinite": "skip"}, 3
    if kind == "spike":
        settings, bad = dict(settings, spike="skip", spike_warmup=4), 6
    tr, cb, probe = _train(tmp_path, Data(bad=bad, kind=kind), settings=settings, max_grad_norm=0.0)
    _same(probe.before[bad], probe.after[bad])  # the skipped step: nothing moved
    assert not torch.equal(probe.before[bad - 1]["p:classifier.weight"], probe.after[bad - 1]["p:classifier.weight"])
    (event,) = cb.guard.history.events
    assert (event.step, event.action, event.kind) == (bad, "skipped", "spike" if kind == "spike" else "nonfinite")
    if kind == "inf-loss":
        assert event.nonfinite == ("loss",) and np.isfinite(event.grad_norm)
    # the schedule advanced on applied steps only: one step fewer than the Trainer's global step
    assert tr.lr_scheduler.state_dict()["last_epoch"] == tr.state.global_step - 1
    entry = next(h for h in tr.state.log_history if h.get("step") == bad + 1)
    assert entry["stabilize/skipped"] == 1.0 and entry["stabilize/applied"] == 0.0


def test_max_grad_norm_still_catches_a_nan(tmp_path):
    tr, cb, probe = _train(tmp_path, Data(bad=2), max_grad_norm=1.0)
    _same(probe.before[2], probe.after[2])
    assert [e.step for e in cb.guard.history.events] == [2]


@pytest.mark.parametrize("bf16", [False, True])
def test_a_clean_run_is_bit_identical_to_the_trainer_without_the_callback(tmp_path, bf16):
    _, cb, got = _train(tmp_path / "a", Data(), bf16=bf16)
    _, _, ref = _train(tmp_path / "b", Data(), callback=False, bf16=bf16)
    _same(ref.after[7], got.after[7])
    assert cb.guard.supervisor.applied == 8 and cb.guard.history.events == []


def test_gradient_accumulation_skips_the_whole_window(tmp_path):
    tr, cb, probe = _train(tmp_path, Data(bad=5), gradient_accumulation_steps=2)
    assert tr.state.global_step == 4 and cb.guard.supervisor.step == 4
    _same(probe.before[2], probe.after[2])  # micro-batches 4 and 5 form update step 2
    assert [e.step for e in cb.guard.history.events] == [2]


def test_resume_from_a_checkpoint_after_a_skip_is_bit_identical(tmp_path):
    settings = {"on_nonfinite": "backoff", "backoff_factor": 0.5}  # the back-off rides in the checkpoint
    _, ref_cb, ref = _train(tmp_path / "ref", Data(bad=1), settings=settings)
    _train(tmp_path / "run", Data(bad=1), settings=settings, save_strategy="steps", save_steps=4)
    _, cb, got = _train(tmp_path / "run", Data(bad=1), settings=settings, save_strategy="steps", save_steps=4,
                        resume=str(tmp_path / "run" / "checkpoint-4"))
    _same(ref.after[7], got.after[7])
    same = lambda sup: json.dumps(sup.state_dict(), sort_keys=True)  # noqa: E731 - NaN != NaN in a dict compare
    assert same(cb.guard.supervisor) == same(ref_cb.guard.supervisor)
    assert cb.guard.supervisor.policy.backoffs == 1 and cb.guard.supervisor.step == 8


def test_settings_are_checked_with_torchguards_messages():
    with pytest.raises(ValueError, match="on_nonfinite"):
        stabilize.hf.StabilityCallback(on_nonfinite="skipp")
