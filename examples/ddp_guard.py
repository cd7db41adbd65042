"""TorchGuard under DistributedDataParallel: every rank takes the same decision.

Run on CPU with two processes:

    torchrun --nproc_per_node 2 examples/ddp_guard.py

Rank 1 alone sees an infinite loss at step 5 (its gradients stay finite, so
DDP's own all-reduce does not spread it). Without stabilize, rank 1 would skip
while rank 0 applies, and the replicas would differ for the rest of the run.
With it, the step's flags are all-reduced inside the guard's single read:
both ranks back off at step 5, and the parameters stay bit-identical.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import stabilize


def main(steps: int = 12, fault_step: int = 5) -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = stabilize.TorchGuard(model, opt, clip_norm=1.0, on_nonfinite="backoff")
    data = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    for step in range(steps):
        x = torch.randn(32, 8, generator=data)
        y = x.sum(1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step == fault_step and rank == 1:
            loss = loss + float("inf")  # a rank-local inf loss with finite gradients
        guard.step(loss)
    # every rank recorded the same events; only rank 0 prints
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if rank == 0:
        for event in guard.history.events:
            print(event)
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        print(f"ranks: {dist.get_world_size()}, parameters bit-identical across ranks: {same}, lr now {guard.lr:.3g}")
    del guard, opt, model  # DDP's reducer holds the process group: release it first
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
