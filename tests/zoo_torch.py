"""Small, deterministic torch models that cover what people train, with batches and losses.

Each entry: ``make() -> model`` (seeded), ``batch(i) -> (x, y)`` and
``loss(output, y) -> scalar``; outputs may be tensors, tuples or dicts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.encoder(self.embed(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.mu, self.logvar = nn.Linear(8, 2), nn.Linear(8, 2)
        self.dec = nn.Linear(2, 6)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.a, self.b = nn.Linear(8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.body(x)))
        return {"value": self.a(h), "logits": self.b(h)}


class Tied(nn.Module):
    """Frozen embedding-like layer plus an output layer tied to the input layer."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.inp = nn.Linear(5, 4, bias=False)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.inp.weight  # tied: (4, 5) used transposed below

    def forward(self, x):
        h = torch.tanh(self.inp(self.frozen(x)))
        return h @ self.inp.weight


def _rng(i):
    return np.random.default_rng(100 + i)


def _t(a):
    return torch.as_tensor(a, dtype=torch.float32)


def _cnn_batch(i):
    r = _rng(i)
    return _t(r.normal(size=(8, 1, 6, 6))), torch.as_tensor(r.integers(0, 3, 8))


def _lstm_batch(i):
    r = _rng(i)
    x = r.normal(size=(8, 5, 3))
    return _t(x), _t(x.sum((1, 2))[:, None] * 0.1)


def _tokens_batch(i):
    r = _rng(i)
    tokens = r.integers(1, 11, size=(6, 7))
    lengths = r.integers(2, 8, size=6)
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return torch.as_tensor(tokens), torch.as_tensor(r.integers(0, 2, 6))


def _vae_batch(i):
    r = _rng(i)
    x = _t(r.normal(size=(8, 6)))
    return x, x


def _dict_batch(i):
    r = _rng(i)
    x = r.normal(size=(8, 4))
    return _t(x), {"value": _t(x.sum(1, keepdims=True)), "logits": torch.as_tensor(r.integers(0, 3, 8))}


def _tied_batch(i):
    r = _rng(i)
    x = _t(r.normal(size=(8, 5)))
    return x, x


def _vae_loss(out, x):
    recon, mu, logvar = out
    kl = -0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())
    return nn.functional.mse_loss(recon, x) + kl


def _dict_loss(out, y):
    return nn.functional.mse_loss(out["value"], y["value"]) + nn.functional.cross_entropy(out["logits"], y["logits"])


ce = nn.functional.cross_entropy
mse = nn.functional.mse_loss

ZOO = {
    "cnn-batchnorm-dropout": (CNN, _cnn_batch, ce),
    "lstm": (LSTMNet, _lstm_batch, mse),
    "transformer-padding-mask": (Transformer, _tokens_batch, ce),
    "vae-tuple": (VAE, _vae_batch, _vae_loss),
    "dict-output": (DictNet, _dict_batch, _dict_loss),
    "frozen-and-tied": (Tied, _tied_batch, mse),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return ZOO[name][0]()


def state_of(model, optimizer, scheduler=None, scaler=None):
    """Everything a step may change, as cloned tensors / plain values, for exact comparison."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    for i, (p, st) in enumerate(optimizer.state.items()):
        for k, v in st.items():
            out[f"opt:{i}:{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    out["lrs"] = [g["lr"] for g in optimizer.param_groups]
    if scheduler is not None:
        out["scheduler"] = dict(scheduler.state_dict())
    if scaler is not None:
        out["scaler"] = scaler.state_dict()
    out["rng"] = torch.get_rng_state().clone()
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k
