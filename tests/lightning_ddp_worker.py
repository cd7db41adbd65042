"""Two Lightning DDP ranks (gloo, CPU) with StabilityCallback; rank 1 alone sees an infinite loss (finite
gradients) at its batch 1. Each rank saves its parameters and events to ``<out>/rank<r>.pt``.

Run by tests/test_lightning.py (Lightning's launcher starts the second rank by re-running this script).
"""

import sys

import lightning.pytorch as pl
import torch

import stabilize.lightning
from lightning_models import BATCH, BNModule, data, loader, trainer


class Seen(pl.Callback):
    """The batches whose loss this rank made infinite."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch[2].any():
            self.batches.append(batch_idx)


def main(out):
    ds = data(n_batches=8)  # 4 batches per rank; DistributedSampler(shuffle=False) interleaves the samples
    ds.tensors[2][2 * BATCH + 1] = 1.0  # one sample, on one rank: that batch's loss becomes inf there
    cb = stabilize.lightning.StabilityCallback(on_nonfinite="skip")
    seen = Seen()
    tr = trainer([cb, seen], strategy="ddp", devices=2)
    module = BNModule()
    tr.fit(module, loader(ds))
    events = [[e.epoch, e.batch_index, e.action] for e in cb.guard.history.events]
    # parameters only: DDP broadcasts the buffers from rank 0 at each forward, so after the last one each
    # rank holds its own batch statistics, with or without a guard
    torch.save({"params": {k: v.detach().clone() for k, v in module.named_parameters()}, "events": events,
                "applied": cb.guard.supervisor.applied,
                "faulty_batches": seen.batches}, f"{out}/rank{tr.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
