"""on_nonfinite="repair" (issue 19, opt in): the diagnosed call site is swapped for its safe twin
for the rest of the run and the step is run again; a healthy run installs nothing."""

import numpy as np
import pytest


def _distance_setup():
    """A loss with sqrt of a squared distance that is exactly 0 for half of the rows (mmrotate#205)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 2)).astype(np.float32)
    Y = np.zeros((16, 2), np.float32)
    Y[8:] = rng.normal(size=(8, 2))

    def loss(pred, y):
        return torch.sqrt(((pred - y) ** 2).sum(-1)).mean()

    return model, loss, X, Y


def test_repair_swaps_the_call_site_and_trains_on():
    from conftest import load_backend

    load_backend("torch")
    import torch

    import stabilize

    model, loss, X, Y = _distance_setup()
    t = stabilize.StabilityTrainer(model, loss, torch.optim.SGD(model.parameters(), 0.1), on_nonfinite="repair",
                                   progress=False)
    h = t.fit(X, Y, batch_size=16, epochs=6, shuffle=False)
    assert [(e.kind, e.action) for e in h.events] == [("nonfinite", "skipped"), ("repair", "swapped")]
    [(file, line, op, twin)] = t.repairs
    assert file == __file__ and op == "torch.sqrt" and twin == "stabilize.safe_sqrt"
    assert "torch.sqrt(((pred - y) ** 2).sum(-1))" in open(file).read().splitlines()[line - 1]
    assert h.committed.tolist() == [False] + [True] * 6  # the failed step, then its rerun and 5 more, applied
    assert np.all(np.isfinite(h.losses)) and all(np.isfinite(w).all() for w in t.get_weights())
    assert np.abs(t.get_weights()[0]).sum() > 0  # trained: the weights left their zero start


def test_without_repair_the_same_run_stops_with_the_diagnosis():
    from conftest import load_backend

    load_backend("torch")
    import torch

    import stabilize

    model, loss, X, Y = _distance_setup()
    t = stabilize.StabilityTrainer(model, loss, torch.optim.SGD(model.parameters(), 0.1), progress=False)
    with pytest.raises(stabilize.NonFiniteError, match="3 batches in a row"):
        t.fit(X, Y, batch_size=16, epochs=6, shuffle=False)
    assert t.supervisor.diagnosis.cause == "singular-op" and t._swaps is None  # nothing installed


def test_repair_is_refused_where_the_step_cannot_be_run_again():
    from conftest import load_backend

    load_backend("torch")
    import torch

    import stabilize

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="needs StabilityTrainer"):
        stabilize.TorchGuard(model, torch.optim.SGD(model.parameters(), 0.1), on_nonfinite="repair")
