"""A Hugging Face Trainer user adds one callback: a NaN label no longer turns the model into NaN.

A 2-layer BERT (hidden size 32, built from a config: nothing is downloaded) learns a regression on
token ids. One label is NaN. The Trainer's default ``logging_nan_inf_filter`` hides that step's NaN
loss from the logs while the update it applied has already made every weight NaN. With
``stabilize.hf.StabilityCallback`` the step is skipped, AdamW's state and the LR schedule stay
exactly as they were, and the guard's counters appear in ``trainer.state.log_history``.

Run: python examples/hf_guard.py
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

import stabilize.hf

rng = np.random.default_rng(0)
ids = torch.as_tensor(rng.integers(1, 50, size=(48, 8)))
labels = torch.as_tensor((ids[:, 0].numpy() / 25.0 - 1.0).astype(np.float32))
labels[21] = float("nan")  # one corrupted label, in update step 5


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return len(ids)

    def __getitem__(self, i):
        return {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}


config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16, num_labels=1)
torch.manual_seed(0)
model = transformers.BertForSequenceClassification(config)
callback = stabilize.hf.StabilityCallback(on_nonfinite="skip")
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(out, per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3,
                                          logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()

print(callback.guard.history.report())
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
print(f"weights finite: {bool(torch.isfinite(weights).all())}")
print(f"scheduler steps: {trainer.lr_scheduler.last_epoch} for {trainer.state.global_step} optimizer steps")
logged = [(h["step"], h["stabilize/skipped"]) for h in trainer.state.log_history if "stabilize/skipped" in h]
print(f"(step, stabilize/skipped) in log_history: {logged}")
assert torch.isfinite(weights).all()
