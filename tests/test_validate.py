"""Bad arguments get one clear error: clip_grads' bounds and inputs, clip_grads_, the safe ops' inputs,
and the validation helpers the trainer and guards use."""

import math

import numpy as np
import pytest

import stabilize
from stabilize.validate import check_count, check_nonempty, check_optimizer, check_positive_finite
from helpers import to_native


def _np(backend, t):
    return stabilize.get_backend(backend).to_numpy(t).astype(np.float64)


@pytest.mark.parametrize("value,error,message", [
    ("1.0", TypeError, "max_norm must be a positive number .* got the str '1.0'; pass a number, e.g. max_norm=1.0"),
    (True, TypeError, "got the bool True"),
    (float("nan"), ValueError, "got nan"),
    (0, ValueError, "got 0"),
])
def test_clip_grads_rejects_strings_bools_and_non_positive_bounds(value, error, message):
    with pytest.raises(error, match=message):
        stabilize.clip_grads([np.ones(2)], max_norm=value, backend="numpy")


def test_clip_grads_max_norm_inf_measures_without_clipping(backend):
    g = np.array([3.0, 4.0])
    (c,), norm = stabilize.clip_grads([to_native(backend, g, "float64")], max_norm=math.inf)
    assert float(_np(backend, norm)) == 5.0
    np.testing.assert_array_equal(_np(backend, c), g)


def test_clip_grads_takes_a_generator_of_gradients_and_returns_a_list(backend):
    arrays = [np.array([3.0, 0.0]), np.array([4.0])]
    clipped, norm = stabilize.clip_grads((to_native(backend, a, "float64") for a in arrays), max_norm=1.0)
    assert isinstance(clipped, list) and float(_np(backend, norm)) == 5.0
    np.testing.assert_allclose(_np(backend, clipped[0]), [3.0 / (5 + 1e-6), 0.0], rtol=1e-15)
    np.testing.assert_allclose(_np(backend, clipped[1]), [4.0 / (5 + 1e-6)], rtol=1e-15)


def test_clip_grads_refuses_parameters_and_names_the_in_place_form():
    import torch

    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"these are parameters .*stabilize.clip_grads_\(model.parameters\(\)"):
        stabilize.clip_grads(model.parameters(), max_norm=1.0)


def test_clip_grads_in_place_matches_torch_clip_grad_norm_():
    import torch

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64) * 10
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    before = [p.grad.clone() for p in a.parameters()]
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm=1.0)
    total = stabilize.clip_grads_(a.parameters(), max_norm=1.0)
    assert float(total) == pytest.approx(float(ref), rel=1e-15)
    assert float(total) > 1.0  # clipping happened
    for p, q, g0 in zip(a.parameters(), b.parameters(), before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-15, atol=0)
        assert not torch.equal(p.grad, g0)


def test_clip_grads_in_place_skips_missing_grads_and_rejects_tf():
    import torch

    w, v = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([3.0, 4.0])
    assert float(stabilize.clip_grads_([w, v], max_norm=math.inf)) == 5.0 and v.grad is None
    assert w.grad.tolist() == [3.0, 4.0]
    with pytest.raises(TypeError, match="item 0 is a list"):
        stabilize.clip_grads_([[1.0]], max_norm=1.0)


def test_readme_torch_clip_example_changes_p_grad():
    """What the README shows: the in-place form changes p.grad, the functional one is assigned back."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    (model(torch.randn(8, 4) * 100) ** 2).mean().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = stabilize.clip_grads_(model.parameters(), max_norm=1.0)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert float(norm) > 1.0 and float(after) == pytest.approx(1.0, rel=1e-5)
    for p, g in zip(model.parameters(), before):
        p.grad = g
    grads, norm = stabilize.clip_grads([p.grad for p in model.parameters()], max_norm=1.0)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert float(after) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("bad", ["hello", None, {"a": 1.0}])
def test_safe_ops_name_the_argument_instead_of_a_framework_message(backend, bad):
    with pytest.raises(TypeError, match=r"safe_log: x must be a tensor, an array or a number, got the"):
        stabilize.safe_log(bad, backend=backend)


def test_safe_ops_unconvertible_input_says_what_to_pass():
    with pytest.raises(TypeError, match=r"safe_mse: pred could not be made into a torch tensor .*pass a tensor") as info:
        stabilize.safe_mse([object()], [1.0], backend="torch")
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("value,error,message", [
    ("1.0", TypeError, "clip_norm must be a positive finite number, got the str '1.0'; pass a number, e.g. clip_norm=1.0"),
    (math.inf, ValueError, "got inf"),
    (-1.0, ValueError, "got -1.0"),
])
def test_check_positive_finite(value, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_positive_finite("clip_norm", value)
    assert check_positive_finite("clip_norm", np.float32(0.5)) == 0.5


def test_check_count_nonempty_and_optimizer():
    assert check_count("epochs", 3) == 3
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0; no step would run"):
        check_count("epochs", 0, 1, "no step would run")
    with pytest.raises(ValueError, match="snapshot_every must be an integer >= 1, got 0; pass a larger value"):
        check_count("snapshot_every", 0)
    with pytest.raises(TypeError, match="got the float 2.0"):
        check_count("epochs", 2.0)
    with pytest.raises(ValueError, match="x has 0 rows, so no training step can run"):
        check_nonempty("x", 0)
    with pytest.raises(TypeError, match=r"got the string 'adam'; create it first, e.g. keras.optimizers.Adam\(1e-3\)"):
        check_optimizer("optimizer", "adam", "a keras optimizer")
