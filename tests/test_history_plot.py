"""History.plot: a readable PNG, and no change to matplotlib's global state."""

import numpy as np
import pytest

from stabilize.history import History


def test_plot_keeps_pyplot_state_and_gives_a_one_step_run_a_real_x_range(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    h = History(losses=np.array([np.nan]), steps=np.array([7]), grad_norms=np.array([np.nan]), lrs=np.array([0.1]),
                update_ratios=np.zeros(1), committed=np.zeros(1, bool))
    path = h.plot(str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000 and path.endswith("h.png")
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
