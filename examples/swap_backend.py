"""The same code on either framework, chosen by configuration alone.

    STABILIZE_BACKEND=tensorflow python examples/swap_backend.py
    STABILIZE_BACKEND=torch      python examples/swap_backend.py

or put ``[tool.stabilize]`` / ``backend = "tensorflow"`` in the pyproject.toml
(or a stabilize.toml) of the directory you run from. Nothing below names a
framework.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import stabilize
from stabilize import StabilityTrainer
from stabilize.models import MLP
from stabilize.optim import SGD

backend = stabilize.get_backend()
name, source = stabilize.config.resolve_backend_name()
print(f"backend: {backend.name} (chosen by {source})")

rng = np.random.default_rng(0)
X = rng.normal(size=(256, 3))
y = X @ np.array([[1.0], [-2.0], [0.5]])

trainer = StabilityTrainer(MLP((3, 16, 1), seed=0), "mse", SGD(lr=0.05), dtype="float64")
history = trainer.fit(X, y, epochs=3, batch_size=32)
print(f"first loss {history.losses[0]:.12f}, last loss {history.losses[-1]:.12f}")
print("safe_log(0) on this backend:", stabilize.safe_log(np.array([0.0])))
