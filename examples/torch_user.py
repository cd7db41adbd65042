"""A PyTorch user guards their own model and optimizer with StabilityTrainer.

Two targets are NaN. A plain loop would turn every weight into NaN at the
first batch holding one. The guard refuses that update; under the rollback
policy it restores the last snapshot and leaves the implicated rows out for
the rest of the run, so the same NaN is not met again every epoch (back-off
would only keep lowering the rate: bad data is not a learning-rate problem).

Run: python examples/torch_user.py
"""

import numpy as np
import torch

from stabilize import StabilityTrainer

rng = np.random.default_rng(0)
X = rng.normal(size=(512, 8)).astype(np.float32)
y = (X[:, :1] * 2 - X[:, 1:2] + 0.1 * rng.normal(size=(512, 1))).astype(np.float32)
y[[10, 300]] = np.nan  # two corrupted labels

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

trainer = StabilityTrainer(model, "mse", optimizer, clip_norm=1.0, on_nonfinite="rollback", max_bad_steps=1,
                           snapshot_every=4)
history = trainer.fit(X, y, epochs=5, batch_size=64, seed=0)

print(history.report())
print(f"rows left out after rollbacks: {len(trainer.skipped_rows)} (including 10 and 300: "
      f"{ {10, 300} <= trainer.skipped_rows })")
assert all(torch.isfinite(p).all() for p in model.parameters()), "a NaN update was applied"
