"""A Lightning user adds one callback: a corrupted batch is skipped, and nothing it touched survives.

Batch 5 of every epoch holds one NaN input. Without the callback, Lightning applies that update: every
weight and the BatchNorm running statistics become NaN at the first epoch. With
``stabilize.lightning.StabilityCallback`` the step is skipped, the BatchNorm statistics its forward pass
wrote are put back, the per-step scheduler does not advance, and the events reach Lightning's CSV logger.

Run: python examples/lightning_guard.py
"""

import csv
import tempfile
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

import stabilize.lightning

rng = np.random.default_rng(0)
X = rng.normal(size=(256, 8)).astype(np.float32)
y = (X[:, :1] * 2 - X[:, 1:2]).astype(np.float32)
X[5 * 32 + 3, 2] = np.nan  # one corrupted cell, in batch 5
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(X), torch.tensor(y)), batch_size=32)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.97**k)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


torch.manual_seed(0)
model = Regressor()
callback = stabilize.lightning.StabilityCallback(on_nonfinite="skip", spike="skip")
with tempfile.TemporaryDirectory() as out:
    trainer = L.Trainer(max_epochs=3, callbacks=[callback], logger=CSVLogger(out, name="run"), log_every_n_steps=1,
                        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(model, data)
    rows = list(csv.DictReader(next(Path(out).glob("run/*/metrics.csv")).open()))

print(callback.guard.history.report())
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
bn = model.net[1]
print(f"weights finite: {bool(torch.isfinite(weights).all())}; BatchNorm running mean finite: "
      f"{bool(torch.isfinite(bn.running_mean).all())}")
print(f"scheduler steps: {trainer.lr_scheduler_configs[0].scheduler.last_epoch} for {trainer.global_step} batches")
skipped = [r["stabilize/skipped"] for r in rows if r.get("stabilize/skipped")]
print(f"stabilize/skipped in the CSV log, last value: {skipped[-1]}")
assert torch.isfinite(weights).all() and torch.isfinite(bn.running_mean).all()
