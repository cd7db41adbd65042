"""More torch reproductions (see registry.py): the exp of a log-variance or a log-scale, logs
at 0 in losses written from probabilities, and ids out of range.

Written for this catalogue from the reports' descriptions; no code was copied.
A line marked ``# origin: <case>`` is the operation the diagnosis must name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cases_torch import _linear, _rng, _sgd, _t, case
from .harness import Setup


# -- exp-overflow --------------------------------------------------------------------------
class _Encoder(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        self.mu, self.logvar, self.dec, self.fixed = _linear(4, 2), _linear(4, 2, seed=1), _linear(2, 4, seed=2), fixed
        with torch.no_grad():
            self.logvar.weight.mul_(80.0)

    def forward(self, x):
        logvar = self.logvar(x)
        if self.fixed:
            logvar = logvar.clamp(-30.0, 20.0)
        std = torch.exp(0.5 * logvar)  # origin: vae-exp-logvar
        z = self.mu(x) + std * torch.randn_like(std)
        return self.dec(z), self.mu(x), logvar


def _vae_loss(out, x):
    recon, mu, logvar = out
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
    return F.mse_loss(recon, x) + kl


@case
def vae_exp_logvar(fixed=False):
    torch.manual_seed(0)
    model = _Encoder(fixed)
    x = _t(3 * _rng().normal(size=(8, 4)))
    return Setup(model, _vae_loss, _sgd(model, 1e-7), [(x, x.clone())], steps=3, lr=1e-7)


class _Coupling(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        self.net, self.fixed = _linear(2, 4), fixed
        with torch.no_grad():
            self.net.weight.mul_(80.0)

    def forward(self, x):
        z1, z2 = x[:, :2], x[:, 2:]
        s, t = self.net(z1).chunk(2, dim=1)
        if self.fixed:
            s = torch.tanh(s) * 2.0  # RealNVP: a bounded scale
        z2 = z2 * torch.exp(s) + t  # origin: flow-exp-scale
        return torch.cat([z1, z2], 1), s


def _flow_nll(out, _):
    z, log_det = out
    return (0.5 * z.pow(2).sum(1) - log_det.sum(1)).mean()


@case
def flow_exp_scale(fixed=False):
    model = _Coupling(fixed)
    x = _t(2 * _rng().normal(size=(8, 4)))
    return Setup(model, _flow_nll, _sgd(model, 1e-3), [(x, torch.zeros(8))], steps=3, lr=1e-3)


# -- log-zero: losses written from probabilities -----------------------------------------------
def _saturated_logits(seed=0):
    model = _linear(4, 1, seed=seed)
    with torch.no_grad():
        model.weight.mul_(40.0)
    return model


def _binary_data():
    x = _t(_rng().normal(size=(8, 4)))
    return x, _t(_rng(1).integers(0, 2, size=(8, 1)))


@case
def focal_log_zero(fixed=False):
    model = _saturated_logits()

    def loss(logit, y):
        if fixed:
            ce = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
            p = torch.sigmoid(logit)
            pt = y * p + (1 - y) * (1 - p)
            return ((1 - pt) ** 2 * ce).mean()
        p = torch.sigmoid(logit)
        pos = -y * (1 - p) ** 2 * torch.log(p)
        neg = -(1 - y) * p**2 * torch.log(1 - p)  # origin: focal-log-zero
        return (0.25 * pos + 0.75 * neg).mean()

    return Setup(model, loss, _sgd(model, 0.01), [_binary_data()], steps=3, lr=0.01)


@case
def sigmoid_bce_hand(fixed=False):
    model = _saturated_logits()

    def loss(logit, y):
        if fixed:
            return F.binary_cross_entropy_with_logits(logit, y)
        p = torch.sigmoid(logit)
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # origin: sigmoid-bce-hand

    return Setup(model, loss, _sgd(model, 0.01), [_binary_data()], steps=3, lr=0.01)


@case
def poisson_log_zero(fixed=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), nn.Identity() if fixed else nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
    x = _t(_rng().normal(size=(16, 4)))
    counts = _t(_rng(1).poisson(2.0, size=(16, 1)) + 1)

    def loss(out, y):
        if fixed:  # the network predicts the log of the rate (PoissonNLLLoss(log_input=True))
            return (torch.exp(out) - y * out).mean()
        return (out - y * torch.log(out)).mean()  # origin: poisson-log-zero

    return Setup(model, loss, _sgd(model, 0.01), [(x, counts)], steps=3, lr=0.01)


# -- bad-labels: ids out of range ----------------------------------------------------------
@case
def embedding_id_out_of_range(fixed=False):
    torch.manual_seed(0)
    vocab = 13 if fixed else 10  # the tokenizer produced ids 10..12 the embedding does not have
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Flatten(), nn.Linear(24, 2))
    ids = torch.tensor([[1, 2, 3], [4, 12, 5], [6, 7, 10], [8, 9, 1]])
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(ids, torch.tensor([0, 1, 0, 1]))], steps=3, lr=0.1)


@case
def gather_vocab_out_of_range(fixed=False):
    model = _linear(4, 7 if fixed else 6)
    x = _t(_rng().normal(size=(4, 4)))
    ids = torch.tensor([[1], [5], [6], [2]])  # id 6 == the output size: the vocabulary of the data is larger

    def loss(logits, y):
        return -logits.log_softmax(-1).gather(1, y).mean()

    return Setup(model, loss, _sgd(model, 0.1), [(x, ids)], steps=3, lr=0.1)
