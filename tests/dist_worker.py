"""One rank of the 2-rank gloo fault runs (``tests/test_distributed.py`` launches two).

Every scenario builds a fresh DDP model (the same initial weights on both
ranks), trains ``STEPS`` guarded steps on rank-local data, and injects one
fault on rank 1 only at step ``FAULT``. Each rank writes, per scenario, the
action taken at every step, the rate, the step it raised at, and whether the
parameters and optimizer state gathered from both ranks are bit-identical
(``torch.equal``).

Usage: ``python dist_worker.py RANK WORLD PORT OUT.json [scenario ...]``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

STEPS, FAULT = 8, 3
FAULTS = ("nan_input", "inf_loss", "nan_grad")
POLICIES = ("skip", "backoff", "rollback", "raise")


def _gathered_equal(tensors) -> bool:
    """Whether every tensor is bit-identical on every rank."""
    same = True
    for t in tensors:
        t = t.detach().contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        same &= all(torch.equal(out[0], o) for o in out[1:])
    return bool(same)


def _opt_tensors(opt):
    return [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


def run_ddp(fault, policy, rank, distributed="auto"):
    import stabilize
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # the same model on both ranks
    if fault == "nan_buffer":  # BatchNorm: its running_mean goes NaN on rank 1 during the forward pass
        bn = torch.nn.BatchNorm1d(8)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), bn, torch.nn.Tanh(), torch.nn.Linear(8, 1))
        poison = {"on": False}

        def hook(module, args, output):
            if poison["on"]:
                module.running_mean.data[0] = float("nan")  # as a faulty kernel would: no autograd trace
        bn.register_forward_hook(hook)
    else:
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = DDP(net)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
    spike = {"spike_skip": "skip", "spike_clip": "clip"}.get(policy)
    guard = stabilize.TorchGuard(model, opt, scheduler=sched, on_nonfinite="skip" if spike else policy,
                                 clip_norm=None if spike else 0.5, max_bad_steps=1, snapshot_every=2, grow_after=None,
                                 distributed=distributed, spike=spike, spike_warmup=3)
    gen = torch.Generator().manual_seed(100 + rank)  # rank-local data
    out = {"actions": [], "lrs": [], "norms": [], "raised_at": None}
    for step in range(STEPS):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
        hit = step == FAULT and rank == 1
        if hit and fault == "spike":
            y = y * 1e4  # a finite loss spike on rank 1 only
        if hit and fault == "nan_input":
            x[0, 0] = float("nan")
        if fault == "nan_buffer":
            poison["on"] = hit
            before_buffers = [b.clone() for b in net.buffers()]
        loss = torch.nn.functional.mse_loss(model(x), y)
        if hit and fault == "inf_loss":
            loss = loss + torch.tensor(float("inf"))  # the gradients stay finite
        out["lrs"].append(guard.lr)
        guard.backward(loss)
        if hit and fault == "nan_grad":
            next(model.parameters()).grad[0, 0] = float("nan")  # after DDP's all-reduce: rank 1 only
        try:
            applied = guard.step()
        except stabilize.NonFiniteError:
            out["raised_at"] = step
            out["actions"].append("raised")
            break
        if fault == "nan_buffer" and step == FAULT:  # a step not applied puts every buffer back, on every rank
            out["buffers_restored"] = applied or all(torch.equal(a, b) for a, b in zip(before_buffers, net.buffers()))
        events = [e for e in guard.history.events if e.step == step]
        out["actions"].append(events[-1].action if events else ("applied" if applied else "?"))
        out["norms"].append(float(guard.history.grad_norms[-1]))
        if applied:
            sched.step()
    out["params_equal"] = _gathered_equal(list(net.parameters()))
    out["optimizer_equal"] = _gathered_equal(_opt_tensors(opt))
    out["buffers_finite"] = all(bool(torch.isfinite(b).all()) for b in net.buffers() if b.is_floating_point())
    out["policy_state"] = guard.supervisor.policy.state_dict()
    out["final_lr"] = guard.lr
    return out


def run_fsdp(rank, fault):
    """FSDP2 ``fully_shard``: the guard's norm is the global one, not the shard's."""
    import copy

    import stabilize
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = copy.deepcopy(net)
    fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = stabilize.TorchGuard(net, opt, on_nonfinite="skip", clip_norm=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    # reference: the full gradient is the mean of the ranks' full local gradients
    torch.nn.functional.mse_loss(ref(x), y).backward()
    full = [p.grad.clone() for p in ref.parameters()]
    for g in full:
        dist.all_reduce(g)
        g /= dist.get_world_size()
    true_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in full)))
    before = [p.full_tensor().clone() for p in net.parameters()]
    guard.backward(torch.nn.functional.mse_loss(net(x), y))
    shard_norm = float(torch.sqrt(sum((p.grad.to_local().double() ** 2).sum() for p in net.parameters())))
    if fault and rank == 1:
        next(net.parameters()).grad.to_local().view(-1)[0] = float("nan")  # this rank's shard only
    applied = guard.step()
    after = [p.full_tensor().detach() for p in net.parameters()]
    moved = float(torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(after, before))))
    return {"applied": applied, "norm": float(guard.history.grad_norms[-1]), "true_norm": true_norm,
            "shard_norm": shard_norm, "moved": moved, "unchanged": all(torch.equal(a, b) for a, b in zip(after, before)),
            "params_equal": _gathered_equal(after)}


def run_fsdp_checkpoint(rank, workdir, n=3):
    """FSDP2 per-rank checkpoints: n steps, save each rank's shard, load into fresh objects, n steps
    == 2n steps straight, bit for bit, on every rank's shards, optimizer state and RNG."""
    import stabilize
    import stabilize.checkpoint
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)  # the same initial weights on both ranks, before sharding
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
        fully_shard(net)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        return net, opt, stabilize.TorchGuard(net, opt, on_nonfinite="skip", clip_norm=1.0)

    def train(net, guard, batches):
        for x, y in batches:
            guard.step(torch.nn.functional.mse_loss(net(x), y))

    def local_state(net, opt):
        tensors = [p.to_local().detach().clone() for p in net.parameters()]
        tensors += [v.to_local() if hasattr(v, "to_local") else v for v in _opt_tensors(opt)]
        return tensors + [torch.get_rng_state()]

    gen = torch.Generator().manual_seed(100 + rank)  # rank-local data
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(2 * n)]
    net, opt, guard = build()
    train(net, guard, data)
    straight = local_state(net, opt)
    net, opt, guard = build()
    train(net, guard, data[:n])
    path = os.path.join(workdir, f"fsdp.rank{rank}.ckpt")  # one file per rank: its own shard
    guard.save_checkpoint(path, batch=n)
    del net, opt, guard
    net, opt, guard = build()  # fresh objects
    position = guard.load_checkpoint(path)
    train(net, guard, data[position["batch"]:])
    resumed = local_state(net, opt)
    sharded = all(type(p).__name__ == "DTensor" for p in net.parameters())
    torch.manual_seed(0)  # a model that is not sharded refuses the shard file, and is left as it was
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in plain.parameters()]
    try:
        stabilize.TorchGuard(plain, torch.optim.Adam(plain.parameters(), lr=0.01)).load_checkpoint(path)
        refused = None
    except stabilize.checkpoint.CheckpointError as exc:
        refused = str(exc)
    return {"equal": len(straight) == len(resumed) and all(torch.equal(a, b) for a, b in zip(straight, resumed)),
            "count": len(resumed), "sharded": sharded, "steps": guard.supervisor.step,
            "applied": int(guard.history.committed.sum()), "position": position, "refused": refused,
            "untouched": all(torch.equal(a, b) for a, b in zip(before, plain.parameters()))}


def run_kill(rank, victim, steps=6, at=3):
    """DDP steps until rank ``victim`` dies (os._exit, as a kill would) at step ``at``: the survivor's
    next step must raise RankLostError naming it, at once, not at the collective time-out."""
    import time

    import stabilize
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="skip")
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        if step == at and rank == victim:
            sys.stdout.flush()
            os._exit(17)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
        start = time.monotonic()
        try:
            guard.step(torch.nn.functional.mse_loss(model(x), y))
        except stabilize.RankLostError as exc:
            return {"raised_at": step, "message": str(exc), "seconds": time.monotonic() - start}
    return {"raised_at": None}


def main():
    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    names = sys.argv[5:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    results = {}
    for name in names:
        kind, *rest = name.split(":")
        if kind == "ddp":
            results[name] = run_ddp(rest[0], rest[1], rank, *(rest[2:] or ["auto"]))
        elif kind == "fsdp_ckpt":
            results[name] = run_fsdp_checkpoint(rank, os.path.dirname(os.path.abspath(path)))
        elif kind == "fsdp":
            results[name] = run_fsdp(rank, rest[0] == "nan_grad")
        elif kind == "kill":  # the group is broken afterwards: a kill scenario runs alone, last
            results[name] = run_kill(rank, int(rest[0]))
            break
        dist.barrier()
    with open(path, "w") as f:
        json.dump(results, f)
    # Every rank has passed the last barrier and written its results: leave without tearing the
    # process group and the interpreter down, where gloo's threads intermittently abort
    # ("terminate called without an active exception"), which the launcher would read as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
