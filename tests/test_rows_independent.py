"""Leaving rows out is safe (issue 19): a rollback leaves single rows out only when the
batch is a set of independent rows. A full-graph GCN (every node's output depends on
its neighbours) gets whole batches left out, with an event saying so, on torch and Keras:
never a shape error from a batch that lost rows."""

import numpy as np
import pytest

N = 12
ROLLBACK = dict(on_nonfinite="rollback", max_bad_steps=1, max_rollbacks=5, snapshot_every=1, progress=False)


def _graph():
    rng = np.random.default_rng(0)
    a = np.triu((rng.uniform(size=(N, N)) < 0.3).astype(np.float32), 1)
    a = a + a.T + np.eye(N, dtype=np.float32)  # self-loops: no isolated node
    x = rng.normal(size=(N, 3)).astype(np.float32)
    x[[4, 9], 1] = np.nan  # two nodes with a missing feature
    return a, x, rng.integers(0, 2, size=N)


def _torch_gcn(a, declare):
    import torch

    class GCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = a.sum(1) ** -0.5
            self.register_buffer("adj", torch.tensor(d[:, None] * a * d[None, :]))
            torch.manual_seed(0)
            self.l1, self.l2 = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.l2(self.adj @ torch.relu(self.l1(self.adj @ x)))

    model = GCN()
    if declare:
        model.rows_independent = False
    return model


def _keras_gcn(a):
    import keras
    import tensorflow as tf

    d = a.sum(1) ** -0.5
    adj = tf.constant(d[:, None] * a * d[None, :])

    class GCN(keras.Model):
        def __init__(self):
            super().__init__()
            keras.utils.set_random_seed(0)
            self.l1, self.l2 = keras.layers.Dense(8), keras.layers.Dense(2)

        def call(self, x):
            return self.l2(tf.matmul(adj, tf.nn.relu(self.l1(tf.matmul(adj, x)))))

    model = GCN()
    model(np.zeros((N, 3), np.float32))
    return model


def _check_whole_batch_stop(t, fit):
    with pytest.raises(ValueError, match="every row has been left out.*depend on each other") as info:
        fit()
    assert "shape" not in str(info.value).lower()
    events = t.history.events
    assert [(e.kind, e.action) for e in events] == [("nonfinite", "rolled-back"), ("left-out", "whole-batch")]
    assert t.skipped_rows == set(range(N))  # the failing batch, whole; not rows 4 and 9 alone
    assert t.supervisor.diagnosis.cause == "dirty-data"


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "found-by-the-forward"])
def test_torch_full_graph_gcn_leaves_the_whole_batch_out(declare):
    from conftest import load_backend

    load_backend("torch")
    import torch

    import stabilize

    a, x, y = _graph()
    model = _torch_gcn(a, declare)
    t = stabilize.StabilityTrainer(model, torch.nn.functional.cross_entropy,
                                   torch.optim.SGD(model.parameters(), lr=0.1), **ROLLBACK)
    _check_whole_batch_stop(t, lambda: t.fit(x, y, batch_size=N, epochs=3, shuffle=False))


def test_keras_full_graph_gcn_leaves_the_whole_batch_out():
    from conftest import load_backend

    load_backend("tensorflow")
    import keras

    import stabilize

    a, x, y = _graph()
    t = stabilize.StabilityTrainer(_keras_gcn(a), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                   keras.optimizers.SGD(0.1), **ROLLBACK)
    _check_whole_batch_stop(t, lambda: t.fit(x, y, batch_size=N, epochs=3, shuffle=False))


def test_a_model_of_dependent_rows_trains_on_without_the_failing_batch():
    """Batches of a set model (each output depends on the batch mean): the batch holding the NaN
    row is left out whole, the other batches train, and no batch is ever trimmed."""
    from conftest import load_backend

    load_backend("torch")
    import torch

    import stabilize

    class SetModel(torch.nn.Module):
        rows_independent = False

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            sizes.append(len(x))
            return self.lin(x - x.mean(0))

    sizes = []
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 3)).astype(np.float32)
    Y = X.sum(1, keepdims=True)
    X[13, 0] = np.nan  # in the second batch of 10
    model = SetModel()
    t = stabilize.StabilityTrainer(model, "mse", torch.optim.SGD(model.parameters(), lr=0.05), **ROLLBACK)
    h = t.fit(X, Y, batch_size=10, epochs=3, shuffle=False)
    assert t.skipped_rows == set(range(10, 20))
    assert [e.action for e in h.events] == ["rolled-back", "whole-batch"]
    assert set(sizes) == {10}  # every forward saw a whole batch
    assert all(np.isfinite(w).all() for w in t.get_weights())
    assert len(h.committed) == 4 + 3 + 3 and h.committed.sum() == 9  # the failing batch, then never again
