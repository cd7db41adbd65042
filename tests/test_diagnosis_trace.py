"""Op-level tracing of the diagnosis: scoped to the replay, any output structure."""

import collections
import dataclasses
import inspect

import numpy as np
import pytest

import stabilize
from conftest import load_backend
from stabilize.diagnose import diagnose


def _line_of(fn, marker):
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def test_torch_nothing_is_traced_during_healthy_steps_only_during_the_replay():
    load_backend("torch")
    import torch

    seen = []

    def probe():
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
        globals_ = len(torch.nn.modules.module._global_forward_hooks) + len(torch.nn.modules.module._global_forward_pre_hooks)
        return torch._C._len_torch_function_stack(), hooks + globals_

    def gps_loss(pred, y):
        seen.append(probe())
        return torch.sqrt(((pred - y) ** 2).sum(-1)).mean()  # the singular op

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, loss_fn=gps_loss)
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    for _ in range(3):
        opt.zero_grad()
        assert guard.step(gps_loss(model(x), y), batch=(x, y))
    assert seen == [(0, 0)] * 3  # healthy: no function mode, no module hook
    with torch.no_grad():
        y_hit = model(x).detach()  # targets met exactly: distance 0, d sqrt/dx = inf
    opt.zero_grad()
    assert not guard.step(gps_loss(model(x), y_hit), batch=(x, y_hit))
    assert seen[4][0] == 1  # the replay ran under the recorder: the probe can see it
    assert probe() == (0, 0) and torch._C._len_torch_function_stack() == 0
    d = guard.history.diagnosis
    assert d.cause == "singular-op" and d.op.name == "torch.sqrt" and d.phase == "backward"
    assert d.op.line == _line_of(gps_loss, "the singular op") and d.op.function == "gps_loss"
    assert d.op.counts()["zeros"] == 4
    assert d.origin_line().startswith(f"torch.sqrt at test_diagnosis_trace.py:{d.op.line} in gps_loss (backward: 4 inputs exactly 0")
    opt.zero_grad()
    seen.clear()
    assert guard.step(gps_loss(model(x), y), batch=(x, y))
    assert seen == [(0, 0)]


def test_tensorflow_op_callback_and_gradient_registry_exist_only_during_the_replay():
    load_backend("tensorflow")
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import op_callbacks
    from tensorflow.python.framework import ops as tf_ops

    registry = tf_ops._gradient_registry
    seen = []

    def loss(pred, y):
        seen.append((bool(op_callbacks.should_invoke_op_callbacks()), tf_ops._gradient_registry is registry))
        return tf.reduce_mean(tf.sqrt(tf.reduce_sum(tf.square(pred - y), -1)))  # the singular op

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 2)), tf.float32)
    with tf.GradientTape() as tape:
        value = loss(model(x), tf.zeros((4, 2)))
    tape.gradient(value, model.trainable_variables)
    assert seen == [(False, True)]
    B = stabilize.get_backend("tensorflow")
    d = diagnose(B, model, loss, x, model(x), step=0, batch_index=0, lr=0.1, losses=np.array([np.nan]),
                 grad_norms=np.array([np.nan]))
    assert seen[1] == (True, True)  # the forward replay runs under the op callback
    assert not op_callbacks.should_invoke_op_callbacks() and tf_ops._gradient_registry is registry
    assert d.cause == "singular-op" and d.op.name == "tf.Sqrt" and d.op.line == _line_of(loss, "the singular op")


@dataclasses.dataclass
class _Out:
    logits: object
    aux: object


class _ModelOutput(collections.OrderedDict):
    """Like transformers.ModelOutput: an ordered dict with attribute access."""

    __getattr__ = collections.OrderedDict.__getitem__


@pytest.mark.parametrize("kind,path", [("tensor", "output"), ("tuple", "[1]"), ("list", "[1]"), ("dict", "['aux']"),
                                       ("dataclass", ".aux"), ("modeloutput", "['aux']")])
def test_torch_replay_handles_any_output_structure(kind, path):
    load_backend("torch")
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            aux = torch.log(h - 100.0)  # out of domain: NaN
            if kind == "tensor":
                return aux
            if kind in ("tuple", "list"):
                return (h, aux) if kind == "tuple" else [h, aux]
            if kind == "dict":
                return {"logits": h, "aux": aux}
            if kind == "dataclass":
                return _Out(h, aux)
            return _ModelOutput(logits=h, aux=aux)

    def loss(out, y):
        aux = out if kind == "tensor" else out[1] if kind in ("tuple", "list") else \
            out.aux if kind == "dataclass" else out["aux"]
        return aux.mean()

    model = Net()
    x = torch.randn(4, 3)
    B = stabilize.get_backend("torch")
    d = diagnose(B, model, loss, x, torch.zeros(4), step=0, batch_index=0, lr=0.1, losses=np.array([np.nan]),
                 grad_norms=np.array([np.nan]))
    assert d.evidence["first non-finite model output"] == path
    assert d.op.name == "torch.log" and d.op.phase == "forward" and d.op.function == "forward"
    assert d.cause == "singular-op" and d.op.counts()["negatives"] == 8 and "replay raised" not in d.evidence


def test_keras_replay_handles_dict_outputs():
    load_backend("tensorflow")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    h = keras.layers.Dense(2)(inp)
    model = keras.Model(inp, {"logits": h, "aux": keras.layers.Lambda(lambda t: tf.math.log(t - 100.0))(h)})
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
    B = stabilize.get_backend("tensorflow")
    d = diagnose(B, model, lambda out, y: tf.reduce_mean(out["aux"]), x, tf.zeros(4), step=0, batch_index=0, lr=0.1,
                 losses=np.array([np.nan]), grad_norms=np.array([np.nan]))
    assert d.evidence["first non-finite model output"] == "['aux']"
    assert d.op.name == "tf.Log" and d.cause == "singular-op" and d.op.counts()["negatives"] == 8


def test_a_replay_that_raises_is_evidence_not_a_crash():
    load_backend("torch")
    import torch

    model = torch.nn.Linear(4, 3)
    B = stabilize.get_backend("torch")
    d = diagnose(B, model, torch.nn.functional.cross_entropy, torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 7]),
                 step=0, batch_index=0, lr=0.1, losses=np.array([np.nan]), grad_norms=np.array([np.nan]))
    assert d.cause == "bad-labels" and "IndexError" in d.evidence["replay raised"]
    assert d.evidence["labels outside [0, classes)"] == 2 and d.evidence["label range"] == "[0, 7] for 3 classes"


def test_unknown_when_no_rule_fits():
    load_backend("torch")
    import torch

    model = torch.nn.Linear(2, 1)
    B = stabilize.get_backend("torch")
    # Finite batch, finite replay, no history, no overflow: nothing to blame.
    d = diagnose(B, model, torch.nn.functional.mse_loss, torch.randn(4, 2), torch.randn(4, 1), step=0, batch_index=0,
                 lr=0.01, losses=np.array([np.nan]), grad_norms=np.array([np.nan]))
    assert d.cause == "unknown" and d.op is None and "loss" in d.evidence
