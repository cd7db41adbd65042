"""A small Lightning module with BatchNorm, Adam and a per-step scheduler, and the data the tests make
(shared by tests/test_lightning.py and the 2-rank worker tests/lightning_ddp_worker.py)."""

import numpy as np
import torch
import lightning.pytorch as pl

N_BATCHES, BATCH = 6, 8


def data(bad=None, kind="nan", drop=(), n_batches=N_BATCHES, seed=0):
    """``(x, y, flag)`` tensors for ``n_batches`` batches; batch ``bad`` carries the fault: ``"nan"`` one
    NaN cell, ``"inf-loss"`` a flag the module turns into an infinite loss (finite gradients), ``"spike"``
    targets 30 times larger. ``drop``: batches left out (the control run)."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(n_batches * BATCH, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], dtype=np.float32))[:, None] + 0.1
    flag = np.zeros((n_batches * BATCH, 1), dtype=np.float32)
    if bad is not None:
        rows = slice(bad * BATCH, (bad + 1) * BATCH)
        if kind == "nan":
            x[bad * BATCH + 2, 1] = np.nan
        elif kind == "inf-loss":
            flag[rows] = 1.0
        elif kind == "spike":
            y[rows] *= 30.0
    keep = [i for i in range(n_batches * BATCH) if i // BATCH not in drop]
    return torch.utils.data.TensorDataset(*(torch.as_tensor(a[keep]) for a in (x, y, flag)))


def loader(ds):
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


class BNModule(pl.LightningModule):
    """Linear-BatchNorm-ReLU-Linear, Adam, a LambdaLR stepped every optimizer step."""

    def __init__(self, manual=False, return_none_on_flag=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))
        self.automatic_optimization = not manual
        self.return_none_on_flag = return_none_on_flag

    def _loss(self, batch):
        x, y, flag = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if flag.any():
            if self.return_none_on_flag:
                return None
            loss = loss + float("inf")  # an infinite loss whose gradients are finite
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        cb = next((c for c in self.trainer.callbacks if hasattr(c, "applied")), None)
        if cb is None or cb.applied:
            self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(callbacks=(), **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **args)


def state(module, tr):
    """Everything a step may change: parameters, buffers, optimizer and scheduler state, cloned."""
    out = {f"p:{n}": p.detach().clone() for n, p in module.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in module.named_buffers()})
    opt = tr.optimizers[0]
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            out[f"o:{i}:{k}"] = v.detach().clone()
    out["lrs"] = [g["lr"] for g in opt.param_groups]
    sched = tr.lr_scheduler_configs[0].scheduler.state_dict()
    out["sched"] = {k: v for k, v in sched.items() if k != "lr_lambdas"}
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
