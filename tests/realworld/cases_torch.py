"""The torch reproductions of the catalogue (see registry.py for sources and causes).

Each builder returns the failing setup, or with ``fixed=True`` the variant with
the accepted fix. A line marked ``# origin: <case>`` is the operation the
diagnosis must name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import stabilize

from .harness import Setup

CASES = {}


def case(fn):
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a), dtype=dtype)


def _linear(i, o, *, zero=False, weight=None, bias=None, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(i, o)
    with torch.no_grad():
        if zero:
            m.weight.zero_()
            m.bias.zero_()
        if weight is not None:
            m.weight.copy_(_t(weight))
        if bias is not None:
            m.bias.fill_(bias)
    return m


def _sgd(model, lr, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, **kw)


# -- singular-op --------------------------------------------------------------------
@case
def sqrt_distance(fixed=False):
    model = _linear(2, 2, zero=True)
    x = _t(_rng().normal(size=(8, 2)))
    y = torch.zeros(8, 2)
    y[4:] = _t(_rng(1).normal(size=(4, 2)))

    def loss(pred, y):
        if fixed:
            return stabilize.safe_norm(pred - y, axis=-1).mean()
        return torch.sqrt(((pred - y) ** 2).sum(-1)).mean()  # origin: sqrt-distance

    return Setup(model, loss, _sgd(model, 0.1), [(x, y)], steps=5, lr=0.1)


@case
def norm_smoothness(fixed=False):
    model = _linear(3, 1, zero=True)
    x = _t(_rng().normal(size=(6, 3)))
    y = _t(_rng(1).normal(size=(6, 1)))

    def loss(pred, y):
        step = pred[1:] - pred[:-1]
        smooth = stabilize.safe_norm(step) if fixed else step.pow(2).sum().pow(0.5)  # origin: norm-smoothness
        return F.mse_loss(pred, y) + 0.1 * smooth

    return Setup(model, loss, _sgd(model, 0.1), [(x, y)], steps=5, lr=0.1)


@case
def acos_angle(fixed=False):
    model = _linear(2, 2, weight=np.eye(2), bias=0.0)
    x = _t([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -1.0]])

    def loss(pred, y):
        cos = (pred * y).sum(-1) / (pred.norm(dim=-1) * y.norm(dim=-1))
        cos = cos.clamp(-1.0, 1.0)
        angle = stabilize.safe_acos(cos) if fixed else torch.acos(cos)  # origin: acos-angle
        return angle.mean()

    return Setup(model, loss, _sgd(model, 0.1), [(x, x.clone())], steps=5, lr=0.1)


@case
def pow_negative_base(fixed=False):
    model = _linear(3, 1, bias=-3.0)
    with torch.no_grad():
        model.weight.mul_(0.1)
    x = _t(_rng().normal(size=(8, 3)))
    y = _t(_rng(1).uniform(0.5, 1.5, size=(8, 1)))

    def loss(pred, y):
        root = stabilize.safe_pow(pred + 1, 1 / 3) if fixed else (pred + 1).pow(1 / 3)  # origin: pow-negative-base
        return ((root - y) ** 2).mean()

    return Setup(model, loss, _sgd(model, 0.05), [(x, y)], steps=5, lr=0.05)


class _BatchStandardize(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        self.inp, self.out, self.fixed = _linear(4, 3), _linear(3, 1, seed=1), fixed

    def forward(self, x):
        h = self.inp(x)
        if self.fixed:
            h = (h - h.mean(0)) / (stabilize.safe_std(h, axis=0, ddof=1) + 1e-5)
        else:
            h = (h - h.mean(0)) / h.std(0)  # origin: std-one-sample
        return self.out(h)


@case
def std_one_sample(fixed=False):
    model = _BatchStandardize(fixed)
    X, Y = _rng().normal(size=(9, 4)), _rng(1).normal(size=(9, 1))
    batches = [(_t(X[:8]), _t(Y[:8])), (_t(X[8:]), _t(Y[8:]))]  # the last batch holds one sample
    return Setup(model, F.mse_loss, _sgd(model, 0.05), batches, steps=4, lr=0.05)


# -- masked-softmax ------------------------------------------------------------------
class _PaddedAttention(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.attn, self.head = nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)
        self.fixed = fixed

    def forward(self, ids):
        h = self.emb(ids)
        pad = ids == 0
        if self.fixed:
            pad = pad.clone()
            pad[:, 0] = False  # every sequence keeps one key
        out, _ = self.attn(h, h, h, key_padding_mask=pad)  # origin: mha-padding
        return self.head(out.mean(1))


@case
def mha_padding(fixed=False):
    model = _PaddedAttention(fixed)
    ids = torch.tensor([[3, 4, 5, 0, 0], [1, 2, 0, 0, 0], [6, 7, 8, 9, 1], [0, 0, 0, 0, 0]])
    y = torch.tensor([0, 1, 0, 1])
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(ids, y)], steps=4, lr=0.1)


class _CausalAttention(nn.Module):
    def __init__(self, fixed):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.q, self.k, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.fixed = fixed

    def forward(self, ids):
        h = self.emb(ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 8**0.5
        n = ids.shape[1]
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & (ids != 0)[:, None, :]
        if self.fixed:
            w = stabilize.masked_softmax(scores, allowed)
        else:
            w = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # origin: causal-left-padding
        return self.head((w @ h).mean(1))


@case
def causal_left_padding(fixed=False):
    model = _CausalAttention(fixed)
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 2, 2, 9]])  # left-padded: query 0 sees only padding
    y = torch.tensor([1, 0, 1])
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(ids, y)], steps=4, lr=0.1)


# -- low-precision -------------------------------------------------------------------
@case
def fp16_sum_overflow(fixed=False):
    model = _linear(4, 1).half()
    x = _t(_rng().normal(size=(64, 4)), torch.float16)
    y = _t(40 + _rng(1).normal(size=(64, 1)), torch.float16)

    def loss(pred, y):
        if fixed:
            return stabilize.safe_mse(pred, y)
        return ((pred - y) ** 2).sum()  # origin: fp16-sum-overflow

    return Setup(model, loss, _sgd(model, 1e-4), [(x, y)], steps=4, lr=1e-4)


@case
def fp16_adam_eps(fixed=False):
    model = _linear(4, 1).half()
    x = _t(0.01 * _rng().normal(size=(16, 4)), torch.float16)
    with torch.no_grad():
        y = model(x) + 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4 if fixed else 1e-8)
    return Setup(model, lambda p, t: ((p.float() - t.float()) ** 2).mean(), opt, [(x, y)], steps=4, lr=1e-3)


# -- weight-decay --------------------------------------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _regression(n=32, seed=0):
    X = _rng(seed).normal(size=(n, 4))
    return _t(X), _t(X @ np.array([[0.5], [-1.0], [0.3], [0.8]]))


@case
def sgd_weight_decay(fixed=False):
    model = _mlp()
    opt = _sgd(model, 0.5, weight_decay=1e-4 if fixed else 1000.0)
    return Setup(model, F.mse_loss, opt, [_regression()], steps=40, lr=0.5)


@case
def adamw_weight_decay(fixed=False):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0 if not fixed else 1e-2, weight_decay=10.0 if not fixed else 0.01)
    return Setup(model, F.mse_loss, opt, [_regression()], steps=80, lr=1.0 if not fixed else 1e-2)


# -- rnn-exploding -------------------------------------------------------------------
class _RNNLM(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.out = nn.Embedding(20, 16), nn.RNN(16, 32, nonlinearity="relu", batch_first=True), nn.Linear(32, 20)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(scale)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.out(h).reshape(-1, 20)


def _tokens(n, t, seed=0):
    ids = _rng(seed).integers(0, 20, size=(n, t + 1))
    return torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]).reshape(-1)


@case
def rnn_lm_lr20(fixed=False):
    model = _RNNLM(scale=1.5)
    return Setup(model, F.cross_entropy, _sgd(model, 20.0), [_tokens(8, 20)], steps=8, lr=20.0,
                 clip_norm=0.25 if fixed else None)


@case
def rnn_long_sequence(fixed=False):
    model = _RNNLM(scale=3.0)
    return Setup(model, F.cross_entropy, _sgd(model, 0.05), [_tokens(4, 40, seed=1)], steps=10, lr=0.05,
                 clip_norm=0.5 if fixed else None)


# -- bad-labels ----------------------------------------------------------------------
@case
def labels_one_based(fixed=False):
    model = _linear(4, 3)
    x = _t(_rng().normal(size=(9, 4)))
    y = torch.tensor([1, 2, 3] * 3)  # classes numbered 1..3
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(x, y - 1 if fixed else y)], steps=3, lr=0.1)


@case
def segmentation_void_255(fixed=False):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 1)
    x = _t(_rng().normal(size=(2, 3, 4, 4)))
    mask = torch.tensor(_rng(1).integers(0, 2, size=(2, 4, 4)) * 255)  # a binary mask saved as 0/255 greyscale
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(x, mask // 255 if fixed else mask)], steps=3, lr=0.1)


# -- existing causes, from public reports -------------------------------------------
@case
def log_of_softmax(fixed=False):
    model = _linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(200.0)
    x = _t(_rng().normal(size=(8, 4)))
    y = torch.tensor(_rng(1).integers(0, 3, size=8))

    def loss(logits, y):
        if fixed:
            return stabilize.safe_cross_entropy(logits, y)
        p = torch.softmax(logits, -1)
        return -(F.one_hot(y, 3) * torch.log(p)).sum(1).mean()  # origin: log-of-softmax

    return Setup(model, loss, _sgd(model, 0.01), [(x, y)], steps=3, lr=0.01)


@case
def where_masked_relative_error(fixed=False):
    model = _linear(3, 1)
    x = _t(_rng().normal(size=(8, 3)))
    y = _t(np.array([[0.0], [1.0], [2.0], [0.0], [-1.0], [3.0], [0.5], [1.5]]))

    def loss(pred, y):
        if fixed:
            safe = torch.where(y != 0, y, torch.ones_like(y))
            return torch.where(y != 0, (pred - y) / safe, torch.zeros_like(y)).abs().mean()
        rel = torch.where(y != 0, (pred - y) / y, torch.zeros_like(y))  # origin: where-masked-relative-error
        return rel.abs().mean()

    return Setup(model, loss, _sgd(model, 0.1), [(x, y)], steps=3, lr=0.1)


@case
def nan_in_csv(fixed=False):
    X, y = _regression()
    X = X.clone()
    X[[3, 17], 1] = float("nan")
    if fixed:
        keep = ~torch.isnan(X).any(1)
        X, y = X[keep], y[keep]
    model = _mlp()
    return Setup(model, F.mse_loss, _sgd(model, 0.05), [(X, y)], steps=3, lr=0.05)


@case
def minmax_constant_column(fixed=False):
    X = _rng().normal(size=(32, 4))
    X[:, 2] = 7.0  # a constant column
    lo, hi = X.min(0), X.max(0)
    span = np.where(hi > lo, hi - lo, 1.0) if fixed else hi - lo
    with np.errstate(invalid="ignore"):
        Xs = (X - lo) / span
    model = _mlp()
    return Setup(model, F.mse_loss, _sgd(model, 0.05), [(_t(Xs), _regression()[1])], steps=3, lr=0.05)


@case
def unscaled_features(fixed=False):
    X = 5000 + 1000 * _rng().normal(size=(32, 4))
    y = _regression()[1]
    if fixed:
        X = (X - X.mean(0)) / X.std(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    return Setup(model, F.mse_loss, _sgd(model, 0.05), [(_t(X), y)], steps=30, lr=0.05)


@case
def high_learning_rate(fixed=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    lr = 0.01 if fixed else 3.0
    return Setup(model, F.mse_loss, _sgd(model, lr), [_regression()], steps=40, lr=lr)


from . import cases_torch_more  # noqa: E402,F401 - registers the cases of issue 19
