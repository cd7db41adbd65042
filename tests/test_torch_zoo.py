"""The torch model zoo under TorchGuard and StabilityTrainer: transparent when healthy, exact when not.

For every model and policy: a clean guarded run is bit-identical to the plain
loop; a fault (in the batch, the loss, one gradient, one buffer) leaves the
whole training state (parameters, buffers, optimizer, scheduler, RNG) exactly
as before the step; eval-mode predictions stay finite.
"""


import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stabilize  # noqa: E402
from zoo_torch import ZOO, assert_same, make, state_of  # noqa: E402

# Every zoo model trains guarded and unguarded, under each fault and policy: long fits (~40 s CPU).
pytestmark = pytest.mark.slow

POLICIES = ["skip", "backoff", "rollback"]


def _leaves(out):
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    return [t for v in out for t in _leaves(v)]


def _run(name, policy=None, steps=4, fault=None, fault_step=2, record_before=None, autocast=False):
    """Train ``steps`` steps; returns (model, optimizer, scheduler, guard, applied flags)."""
    build, batch, loss_fn = ZOO[name]
    model = make(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    guard = stabilize.TorchGuard(model, opt, scheduler=sched, on_nonfinite=policy) if policy else None
    torch.manual_seed(1)  # Dropout and the VAE's sampling
    applied = []
    for i in range(steps):
        x, y = batch(i)
        hooks = []
        if i == fault_step and fault is not None:
            if record_before is not None:
                record_before.append(state_of(model, opt, sched))
            x, hooks = _inject(fault, model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = loss_fn(out.float() if torch.is_tensor(out) else out, y)
        if i == fault_step and fault == "loss":
            loss = loss * float("inf")
        if guard is None:
            opt.zero_grad()
            loss.backward()
            opt.step()
            ok = True
        else:
            ok = guard.step(loss)
        for h in hooks:
            h.remove()
        if ok:
            sched.step()
        applied.append(ok)
    return model, opt, sched, guard, applied


def _inject(fault, model, x):
    hooks = []
    if fault == "batch":
        x = x.clone()
        if x.is_floating_point():
            x.view(-1)[3] = float("nan")
        else:  # token ids: the NaN enters with the embedded batch

            def embedded_nan(module, inputs, output):
                output = output.clone()
                output[0, 0, 0] = float("nan")
                return output

            hooks.append(model.embed.register_forward_hook(embedded_nan))
    elif fault == "gradient":
        p = next(p for p in model.parameters() if p.requires_grad)
        hooks.append(p.register_hook(lambda g: g * float("nan")))
    elif fault == "buffer":
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        def poison(module, inputs, output):
            module.running_mean.data.fill_(float("nan"))  # .data: autograd saved this buffer

        hooks.append(bn.register_forward_hook(poison))
    return x, hooks


def _has_buffers(name):
    return any(True for _ in make(name).buffers())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_clean_guarded_run_is_bitwise_the_plain_loop(name, policy):
    plain = _run(name)
    guarded = _run(name, policy)
    assert guarded[4] == [True] * 4
    assert_same(state_of(*plain[:3]), state_of(*guarded[:3]))


FAULTS = [(n, f) for n in sorted(ZOO) for f in ("batch", "loss", "gradient", "buffer")
          if f != "buffer" or _has_buffers(n)]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name,fault", FAULTS)
def test_a_fault_leaves_the_whole_state_as_before_the_step(name, fault, policy):
    before = []
    model, opt, sched, guard, applied = _run(name, policy, steps=3, fault=fault, record_before=before)
    assert applied == [True, True, False]
    assert_same(before[0], state_of(model, opt, sched))
    (event,) = guard.history.events
    assert event.step == 2 and event.action == {"skip": "skipped", "backoff": "backed-off",
                                                "rollback": "skipped"}[policy]
    model.eval()
    with torch.no_grad():
        x, _ = ZOO[name][1](5)
        assert all(torch.isfinite(t).all() for t in _leaves(model(x)))


def test_a_skipped_step_consumes_no_rng_the_run_equals_the_control_run_without_the_batch():
    build, batch, loss_fn = ZOO["cnn-batchnorm-dropout"]

    def run(batches):
        model = make("cnn-batchnorm-dropout")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        guard = stabilize.TorchGuard(model, opt)
        torch.manual_seed(3)
        for x, y in batches:
            guard.step(loss_fn(model(x), y))
        return state_of(model, opt)

    good = [batch(i) for i in range(4)]
    bad_x = good[1][0].clone()
    bad_x[0, 0, 0, 0] = float("nan")
    faulted = run(good[:2] + [(bad_x, good[1][1])] + good[2:])
    assert_same(run(good), faulted)


def test_the_trainer_trains_in_training_mode_and_leaves_the_mode_and_predicts_in_eval_mode():
    model = make("cnn-batchnorm-dropout")
    model.eval()
    X = np.random.default_rng(0).normal(size=(32, 1, 6, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 32)
    t = stabilize.StabilityTrainer(model, torch.nn.functional.cross_entropy,
                                   torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    t.fit(X, y, batch_size=8, shuffle=False)
    assert not model.training
    assert model.bn.num_batches_tracked.item() == 4  # BatchNorm updated: trained in training mode
    stats = model.bn.running_mean.clone()
    p1, p2 = t.predict(X[:1]), t.predict(X[:1])  # one row works in eval mode
    assert np.array_equal(p1, p2) and torch.equal(model.bn.running_mean, stats)


def test_a_one_row_last_batch_with_batchnorm_names_drop_last():
    model = make("dict-output")
    X = np.zeros((17, 4), np.float32)
    t = stabilize.StabilityTrainer(model, lambda out, y: out["value"].mean(), torch.optim.SGD(model.parameters(), 0.1),
                                   progress=False)
    with pytest.raises(ValueError, match="drop_last=True"):
        t.fit(X, np.zeros(17), batch_size=8)
    h = t.fit(X, np.zeros(17), batch_size=8, drop_last=True)
    assert len(h.losses) == 2


@pytest.mark.parametrize("fault", [None, "batch", "gradient", "buffer"])
def test_bfloat16_autocast_cnn_is_bitwise_when_clean_and_exact_under_faults(fault):
    if fault is None:
        plain = _run("cnn-batchnorm-dropout", autocast=True)
        guarded = _run("cnn-batchnorm-dropout", "skip", autocast=True)
        assert guarded[4] == [True] * 4
        assert_same(state_of(*plain[:3]), state_of(*guarded[:3]))
        return
    before = []
    model, opt, sched, guard, applied = _run("cnn-batchnorm-dropout", "skip", steps=3, fault=fault,
                                             record_before=before, autocast=True)
    assert applied == [True, True, False]
    assert_same(before[0], state_of(model, opt, sched))
