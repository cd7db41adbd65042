"""More torch reproductions (see registry.py for sources and causes): sequence
losses, attention and normalisation in half precision, contrastive losses, the
exp of a log-variance, logs at 0, ids out of range and full-graph models.

Written for this catalogue from the reports' descriptions; no code was copied.
A line marked ``# origin: <case>`` is the operation the diagnosis must name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import stabilize

from .cases_torch import _linear, _rng, _sgd, _t, case
from .harness import Setup


# -- ctc-infeasible ------------------------------------------------------------------
class _FrameClassifier(nn.Module):
    """Per-frame log-probabilities over 5 symbols (0 is the CTC blank)."""

    def __init__(self):
        super().__init__()
        self.lin = _linear(4, 5)

    def forward(self, x):
        return self.lin(x["frames"]).log_softmax(-1), x["lengths"]


def _ctc_setup(frames, lengths, targets, zero_infinity):
    model = _FrameClassifier()

    def loss(pred, y):
        log_probs, in_len = pred
        tgt_len = (y != 0).sum(1)
        return F.ctc_loss(log_probs.transpose(0, 1), y, in_len, tgt_len,  # origin: ctc-short-utterance ctc-repeats
                          zero_infinity=zero_infinity)

    x = {"frames": _t(frames), "lengths": torch.tensor(lengths)}
    return Setup(model, loss, _sgd(model, 0.1), [(x, torch.tensor(targets))], steps=3, lr=0.1)


@case
def ctc_short_utterance(fixed=False):
    frames = _rng().normal(size=(3, 8, 4))
    targets = [[1, 2, 3, 4, 0], [2, 3, 0, 0, 0], [1, 2, 3, 4, 1]]
    # the third utterance is only 3 frames long after subsampling: 5 symbols cannot fit
    return _ctc_setup(frames, [8, 8, 3], targets, zero_infinity=fixed)


@case
def ctc_repeats(fixed=False):
    t = 8 if fixed else 5  # "1 1 2 2" needs a blank between the repeats: 6 frames at least
    frames = _rng().normal(size=(2, t, 4))
    return _ctc_setup(frames, [t, t], [[1, 1, 2, 2], [3, 4, 0, 0]], zero_infinity=False)


# -- low-precision: attention masks and normalisation in float16 -----------------------
class _HalfAttention(nn.Module):
    def __init__(self, fill=None, fixed=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.q, self.k, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        with torch.no_grad():  # the padding token's query and key are far apart: its scores are very negative
            self.emb.weight[0] = 4.0
            self.q.weight.copy_(torch.eye(8))
            self.k.weight.copy_(-torch.eye(8))
            self.q.bias.zero_()
            self.k.bias.zero_()
        self.fill, self.fixed = fill, fixed
        self.half()

    def forward(self, ids):
        h = self.emb(ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 8**0.5
        keep = (ids != 0)[:, None, :].to(scores.dtype)
        if self.fill is not None:
            scores = scores + (1.0 - keep) * self.fill  # origin: fp16-additive-mask
        else:
            bias = (1.0 - keep) * torch.finfo(torch.float16).min
            if self.fixed:
                scores = scores.float() + bias.float()
            else:
                scores = scores + bias  # origin: fp16-finfo-min-mask
        w = scores.softmax(-1).to(h.dtype)
        return self.head((w @ h).mean(1)).float()


def _padded_ids():
    return torch.tensor([[3, 4, 5, 0], [1, 2, 0, 0], [6, 7, 8, 9], [0, 0, 0, 0]]), torch.tensor([0, 1, 0, 1])


@case
def fp16_additive_mask(fixed=False):
    model = _HalfAttention(fill=-1e4 if fixed else -1e10)
    return Setup(model, F.cross_entropy, _sgd(model, 0.01), [_padded_ids()], steps=3, lr=0.01)


@case
def fp16_finfo_min_mask(fixed=False):
    model = _HalfAttention(fixed=fixed)
    return Setup(model, F.cross_entropy, _sgd(model, 0.01), [_padded_ids()], steps=3, lr=0.01)


class _HalfNormNet(nn.Module):
    """Linear -> a hand-written normalisation -> Linear, in float16 (or the norm in float32 when fixed)."""

    def __init__(self, norm, fixed, scale=1.0):
        super().__init__()
        self.inp, self.out = _linear(4, 8, bias=0.0), _linear(8, 1, seed=1)
        with torch.no_grad():
            self.inp.weight.mul_(scale)
        self.norm, self.fixed = norm, fixed
        self.half()

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.norm(h, self.fixed)).float()


def _layer_norm(h, fixed):
    if fixed:  # the statistics in float32
        return F.layer_norm(h.float(), h.shape[-1:], eps=1e-5).half()
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-12)  # origin: layernorm-eps-fp16


def _normalize(h, fixed):
    if fixed:  # an epsilon float16 can hold (pytorch#32137: 1e-4 works)
        return F.normalize(h, dim=-1, eps=1e-4)
    return F.normalize(h, dim=-1)  # origin: normalize-eps-fp16


def _rms_scale(h, fixed):
    if fixed:
        h32 = h.float()
        return (h32 / torch.sqrt((h32 * h32).sum(-1, keepdim=True))).half()
    return h / torch.sqrt((h * h).sum(-1, keepdim=True))  # origin: rmsnorm-underflow


def _half_rows(zero_rows, seed=0):
    X = _rng(seed).normal(size=(8, 4))
    X[zero_rows] = 0.0  # padded positions: all-zero feature rows
    return _t(X, torch.float16), _t(_rng(seed + 1).normal(size=(8, 1)))


def _half_norm_case(norm, fixed, zero_rows, scale=1.0):
    model = _HalfNormNet(norm, fixed, scale)
    mse = lambda p, y: F.mse_loss(p, y)  # noqa: E731
    return Setup(model, mse, _sgd(model, 0.01), [_half_rows(zero_rows)], steps=3, lr=0.01)


@case
def layernorm_eps_fp16(fixed=False):
    return _half_norm_case(_layer_norm, fixed, [5, 6])


@case
def normalize_eps_fp16(fixed=False):
    return _half_norm_case(_normalize, fixed, [2])


@case
def rmsnorm_underflow(fixed=False):
    return _half_norm_case(_rms_scale, fixed, [], scale=1e-4)  # activations ~1e-4: squares underflow float16


# -- singular-op: contrastive and metric losses, graphs --------------------------------
def _embedder(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3, bias=False)


def _views(zero_row=None):
    X = _rng().normal(size=(6, 4))
    if zero_row is not None:
        X[zero_row] = 0.0  # an empty sample: its embedding is the zero vector
    return _t(X)


@case
def cosine_zero_vector(fixed=False):
    model = _embedder()

    def loss(z, labels):
        norms = z.norm(dim=-1, keepdim=True)
        denom = norms * norms.T
        if fixed:
            denom = denom.clamp_min(1e-8)
        cos = (z @ z.T) / denom  # origin: cosine-zero-vector
        return F.cross_entropy(cos / 0.5, labels)

    return Setup(model, loss, _sgd(model, 0.1), [(_views(zero_row=3), torch.tensor([1, 0, 3, 2, 5, 4]))], steps=3, lr=0.1)


@case
def triplet_identical(fixed=False):
    model = _embedder()
    x = _views()
    anchor_pos = torch.cat([x, x.clone()], 0)
    anchor_pos[6:9] += 0.5  # three pairs differ; the other three positives are copies of their anchors

    def loss(z, _):
        a, p = z[:6], z[6:]
        d_neg = (a - p.roll(1, 0)).pow(2).sum(-1)
        if fixed:
            d_pos = stabilize.safe_norm(a - p, axis=-1)
            return F.relu(d_pos - stabilize.safe_sqrt(d_neg) + 10.0).mean()
        d_pos = torch.sqrt((a - p).pow(2).sum(-1))  # origin: triplet-identical
        return F.relu(d_pos - torch.sqrt(d_neg) + 10.0).mean()

    return Setup(model, loss, _sgd(model, 0.1), [(anchor_pos, torch.zeros(12))], steps=3, lr=0.1)


class _DenseGCN(nn.Module):
    """A two-layer GCN over the whole graph: the batch is every node, the adjacency is fixed."""

    rows_independent = False  # a node's output depends on other rows: never leave single rows out

    def __init__(self, adjacency, self_loops):
        super().__init__()
        a = torch.as_tensor(adjacency, dtype=torch.float32)
        self.register_buffer("adj", a + torch.eye(len(a)) if self_loops else a)
        self.l1, self.l2 = _linear(3, 8), _linear(8, 2, seed=1)

    def forward(self, x):
        d = self.adj.sum(1).pow(-0.5)  # origin: gcn-isolated-node
        a = d[:, None] * self.adj * d[None, :]
        return self.l2(a @ torch.relu(self.l1(a @ x)))


def _graph(n=12, isolated=(7,)):
    rng = _rng(3)
    a = (rng.uniform(size=(n, n)) < 0.3).astype(np.float64)
    a = np.triu(a, 1)
    a = a + a.T
    for i in isolated:
        a[i, :] = a[:, i] = 0.0
    return a, _t(rng.normal(size=(n, 3))), torch.tensor(rng.integers(0, 2, size=n))


@case
def gcn_isolated_node(fixed=False):
    a, x, y = _graph()
    model = _DenseGCN(a, self_loops=fixed)
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(x, y)], steps=3, lr=0.1)


class _DenseGAT(nn.Module):
    rows_independent = False

    def __init__(self, adjacency, self_loops):
        super().__init__()
        a = torch.as_tensor(adjacency, dtype=torch.float32)
        self.register_buffer("adj", a + torch.eye(len(a)) if self_loops else a)
        self.w, self.src, self.dst, self.out = _linear(3, 8), _linear(8, 1, seed=1), _linear(8, 1, seed=2), _linear(8, 2, seed=3)

    def forward(self, x):
        h = self.w(x)
        e = F.leaky_relu(self.src(h) + self.dst(h).T, 0.2)
        att = e.masked_fill(self.adj == 0, float("-inf")).softmax(-1)  # origin: gat-isolated-node
        return self.out(att @ h)


@case
def gat_isolated_node(fixed=False):
    a, x, y = _graph()
    model = _DenseGAT(a, self_loops=fixed)
    return Setup(model, F.cross_entropy, _sgd(model, 0.1), [(x, y)], steps=3, lr=0.1)


# -- empty-mean: a mean over nothing -----------------------------------------------------
@case
def supcon_no_positive(fixed=False):
    model = _embedder()
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # classes 2 and 3 have one sample each: no positive pair

    def loss(z, y):
        sim = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T / 0.5
        eye = torch.eye(len(y), dtype=torch.bool)
        log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), 1, keepdim=True)
        positives = ((y[:, None] == y[None, :]) & ~eye).float()
        count = positives.sum(1).clamp_min(1.0) if fixed else positives.sum(1)
        return -((positives * log_prob).sum(1) / count).mean()  # origin: supcon-no-positive

    return Setup(model, loss, _sgd(model, 0.1), [(_views(), labels)], steps=3, lr=0.1)


@case
def seq2seq_all_padding(fixed=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    src = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    tgt = torch.tensor([[2, 3, 4, 0], [0, 0, 0, 0]])  # the second segment is padding only
    batches = [(src[:1], tgt[:1]), (src[1:], tgt[1:])]
    if fixed:
        batches = batches[:1]  # segments made only of padding are left out of the batches

    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), ignore_index=0)  # origin: seq2seq-all-padding

    return Setup(model, loss, _sgd(model, 0.1), batches, steps=4, lr=0.1)


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
