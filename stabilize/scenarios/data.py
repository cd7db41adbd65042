"""Seeded data for the scenarios: every backend sees the very same numbers."""

from __future__ import annotations

import numpy as np

__all__ = ["two_inputs", "regression", "clusters", "hand_net_data"]


def two_inputs(n: int = 400, seed: int = 0):
    """Seed 000's ``{'input1', 'input2'}``: two inputs with very different, large ranges."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(3000.0, 4000.0, n)
    x2 = rng.normal(5.0, 3.0, n)
    y = (0.5 * x1 + 30.0 * x2 + rng.normal(0.0, 50.0, n))[:, None]
    return {"input1": x1, "input2": x2}, y


def regression(n: int = 256, seed: int = 0, nonlinear: bool = False):
    """Standardised inputs and a smooth target of unit scale."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    if nonlinear:
        y = np.sin(2 * X[:, :1]) + X[:, 1:2] * X[:, 2:3] + 0.5 * X[:, 3:4]
    else:
        y = X @ np.array([[1.0], [-2.0], [0.5], [1.5]])
    return X, y + 0.1 * rng.normal(size=(n, 1))


def clusters(n: int = 300, seed: int = 0, scale: float = 5.0):
    """Three well-separated classes in 2-D (the log-zero classifier)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    labels = rng.integers(0, 3, n)
    X = (centers[labels] + rng.normal(0.0, 0.35, (n, 2))) * scale
    return X, labels


def hand_net_data(n: int = 256, seed: int = 0):
    """Seed 004's raw, unnormalised regression data."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(-500, 500, n), rng.uniform(-30, 30, n), rng.uniform(1000, 5000, n)])
    y = 2.0 * X[:, :1] + 15.0 * X[:, 1:2] + 0.1 * X[:, 2:3] + rng.normal(0.0, 20.0, (n, 1))
    return X, y
