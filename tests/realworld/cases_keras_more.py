"""More Keras (TensorFlow) reproductions, the same cases as cases_torch_more.py where
the reports' frameworks allow (CTC is torch only: TensorFlow's dense CTC returns a
large finite loss for an impossible alignment instead of inf).

A line marked ``# origin: <case>`` is the operation the diagnosis must name.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import stabilize

from .cases_keras import _dense, _model, _rng, _sgd, _t, case, mse, sparse_ce
from .harness import Setup

F16 = tf.float16


def _built(model, x):
    model(x)
    return model


# -- low-precision: attention masks and normalisation in float16 -----------------------
class _HalfAttention(keras.Model):
    def __init__(self, fill=None, fixed=False):
        super().__init__(dtype="float16")
        keras.utils.set_random_seed(0)
        self.emb = keras.layers.Embedding(10, 8, dtype="float16")
        self.q, self.k = keras.layers.Dense(8, dtype="float16"), keras.layers.Dense(8, dtype="float16")
        self.head = keras.layers.Dense(2, dtype="float16")
        self.fill, self.fixed = fill, fixed

    def setup(self, ids):
        self(ids)
        w = self.emb.get_weights()[0]
        w[0] = 4.0  # the padding token's query and key are far apart: very negative scores
        self.emb.set_weights([w])
        self.q.set_weights([np.eye(8, dtype="float16"), np.zeros(8, "float16")])
        self.k.set_weights([-np.eye(8, dtype="float16"), np.zeros(8, "float16")])
        return self

    def call(self, ids):
        h = self.emb(ids)
        scores = tf.matmul(self.q(h), self.k(h), transpose_b=True) / tf.constant(8**0.5, F16)
        keep = tf.cast(ids != 0, F16)[:, None, :]
        if self.fill is not None:
            scores = scores + (1.0 - keep) * self.fill  # origin: fp16-additive-mask
        else:
            bias = (1.0 - keep) * tf.float16.min
            if self.fixed:
                scores = tf.cast(scores, tf.float32) + tf.cast(bias, tf.float32)
            else:
                scores = scores + bias  # origin: fp16-finfo-min-mask
        w = tf.cast(tf.nn.softmax(scores, -1), F16)
        return tf.cast(self.head(tf.reduce_mean(tf.matmul(w, h), 1)), tf.float32)


def _padded_ids():
    return tf.constant([[3, 4, 5, 0], [1, 2, 0, 0], [6, 7, 8, 9], [0, 0, 0, 0]], tf.int32), tf.constant([0, 1, 0, 1])


@case
def fp16_additive_mask(fixed=False):
    ids, y = _padded_ids()
    model = _HalfAttention(fill=-1e4 if fixed else -1e10).setup(ids)
    return Setup(model, sparse_ce, _sgd(0.01), [(ids, y)], steps=3, lr=0.01)


@case
def fp16_finfo_min_mask(fixed=False):
    ids, y = _padded_ids()
    model = _HalfAttention(fixed=fixed).setup(ids)
    return Setup(model, sparse_ce, _sgd(0.01), [(ids, y)], steps=3, lr=0.01)


class _HalfNormNet(keras.Model):
    def __init__(self, norm, fixed, scale=1.0):
        super().__init__(dtype="float16")
        self.inp = _dense(4, 8, bias=0.0, dtype="float16")
        self.out = _dense(8, 1, seed=1, dtype="float16")
        k, b = self.inp.get_weights()
        self.inp.set_weights([k * np.float16(scale), b])
        self.norm, self.fixed = norm, fixed

    def call(self, x):
        return tf.cast(self.out(self.norm(self.inp(x), self.fixed)), tf.float32)


def _layer_norm(h, fixed):
    if fixed:  # the statistics in float32
        h32 = tf.cast(h, tf.float32)
        mu, var = tf.nn.moments(h32, -1, keepdims=True)
        return tf.cast((h32 - mu) / tf.sqrt(var + 1e-5), F16)
    mu = tf.reduce_mean(h, -1, keepdims=True)
    var = tf.reduce_mean(tf.square(h - mu), -1, keepdims=True)
    return (h - mu) / tf.sqrt(var + 1e-12)  # origin: layernorm-eps-fp16


def _normalize(h, fixed):
    if fixed:
        return tf.math.l2_normalize(h, axis=-1, epsilon=1e-4)
    return tf.math.l2_normalize(h, axis=-1)  # origin: normalize-eps-fp16


def _rms_scale(h, fixed):
    if fixed:
        h32 = tf.cast(h, tf.float32)
        return tf.cast(h32 / tf.sqrt(tf.reduce_sum(h32 * h32, -1, keepdims=True)), F16)
    return h / tf.sqrt(tf.reduce_sum(h * h, -1, keepdims=True))  # origin: rmsnorm-underflow


def _half_norm_case(norm, fixed, zero_rows, scale=1.0):
    X = _rng().normal(size=(8, 4))
    X[zero_rows] = 0.0
    x, y = _t(X, "float16"), _t(_rng(1).normal(size=(8, 1)))
    return Setup(_built(_HalfNormNet(norm, fixed, scale), x), mse, _sgd(0.01), [(x, y)], steps=3, lr=0.01)


@case
def layernorm_eps_fp16(fixed=False):
    return _half_norm_case(_layer_norm, fixed, [5, 6])


@case
def normalize_eps_fp16(fixed=False):
    return _half_norm_case(_normalize, fixed, [2])


@case
def rmsnorm_underflow(fixed=False):
    return _half_norm_case(_rms_scale, fixed, [], scale=1e-4)


# -- singular-op ---------------------------------------------------------------------------
def _embedder():
    keras.utils.set_random_seed(0)
    return _model(keras.layers.Dense(3, use_bias=False), inputs=4)


def _views(zero_row=None):
    X = _rng().normal(size=(6, 4))
    if zero_row is not None:
        X[zero_row] = 0.0
    return _t(X)


@case
def cosine_zero_vector(fixed=False):
    def loss(z, labels):
        norms = tf.norm(z, axis=-1, keepdims=True)
        denom = norms * tf.transpose(norms)
        if fixed:
            denom = tf.maximum(denom, 1e-8)
        cos = tf.matmul(z, z, transpose_b=True) / denom  # origin: cosine-zero-vector
        return sparse_ce(cos / 0.5, labels)

    data = (_views(zero_row=3), tf.constant([1, 0, 3, 2, 5, 4]))
    return Setup(_embedder(), loss, _sgd(0.1), [data], steps=3, lr=0.1)


@case
def triplet_identical(fixed=False):
    x = np.asarray(_views())
    pairs = np.concatenate([x, x.copy()], 0)
    pairs[6:9] += 0.5

    def loss(z, _):
        a, p = z[:6], z[6:]
        d_neg = tf.reduce_sum(tf.square(a - tf.roll(p, 1, 0)), -1)
        if fixed:
            d_pos = stabilize.safe_norm(a - p, axis=-1)
            return tf.reduce_mean(tf.nn.relu(d_pos - stabilize.safe_sqrt(d_neg) + 1.0))
        d_pos = tf.sqrt(tf.reduce_sum(tf.square(a - p), -1))  # origin: triplet-identical
        return tf.reduce_mean(tf.nn.relu(d_pos - tf.sqrt(d_neg) + 10.0))

    return Setup(_embedder(), loss, _sgd(0.1), [(_t(pairs), tf.zeros(12))], steps=3, lr=0.1)


def _graph(n=12, isolated=(7,)):
    rng = _rng(3)
    a = np.triu((rng.uniform(size=(n, n)) < 0.3).astype(np.float64), 1)
    a = a + a.T
    for i in isolated:
        a[i, :] = a[:, i] = 0.0
    return a, _t(rng.normal(size=(n, 3))), tf.constant(rng.integers(0, 2, size=n), tf.int32)


class _DenseGCN(keras.Model):
    rows_independent = False  # a node's output depends on other rows: never leave single rows out

    def __init__(self, adjacency, self_loops):
        super().__init__()
        a = adjacency + np.eye(len(adjacency)) if self_loops else adjacency
        self.adj = tf.constant(a, tf.float32)
        self.l1, self.l2 = _dense(3, 8), _dense(8, 2, seed=1)

    def call(self, x):
        d = tf.pow(tf.reduce_sum(self.adj, 1), -0.5)  # origin: gcn-isolated-node
        a = d[:, None] * self.adj * d[None, :]
        return self.l2(tf.matmul(a, tf.nn.relu(self.l1(tf.matmul(a, x)))))


@case
def gcn_isolated_node(fixed=False):
    a, x, y = _graph()
    return Setup(_built(_DenseGCN(a, fixed), x), sparse_ce, _sgd(0.1), [(x, y)], steps=3, lr=0.1)


class _DenseGAT(keras.Model):
    rows_independent = False

    def __init__(self, adjacency, self_loops):
        super().__init__()
        a = adjacency + np.eye(len(adjacency)) if self_loops else adjacency
        self.adj = tf.constant(a > 0)
        self.w, self.src, self.dst, self.out = _dense(3, 8), _dense(8, 1, seed=1), _dense(8, 1, seed=2), _dense(8, 2, seed=3)

    def call(self, x):
        h = self.w(x)
        e = tf.nn.leaky_relu(self.src(h) + tf.transpose(self.dst(h)), 0.2)
        att = tf.nn.softmax(tf.where(self.adj, e, float("-inf")), -1)  # origin: gat-isolated-node
        return self.out(tf.matmul(att, h))


@case
def gat_isolated_node(fixed=False):
    a, x, y = _graph()
    return Setup(_built(_DenseGAT(a, fixed), x), sparse_ce, _sgd(0.1), [(x, y)], steps=3, lr=0.1)


# -- empty-mean --------------------------------------------------------------------------------
@case
def supcon_no_positive(fixed=False):
    labels = tf.constant([0, 0, 1, 1, 2, 3])

    def loss(z, y):
        zn = tf.math.l2_normalize(z, -1)
        sim = tf.matmul(zn, zn, transpose_b=True) / 0.5
        eye = tf.eye(6, dtype=tf.bool)
        log_prob = sim - tf.reduce_logsumexp(tf.where(eye, float("-inf"), sim), 1, keepdims=True)
        positives = tf.cast((y[:, None] == y[None, :]) & ~eye, tf.float32)
        count = tf.maximum(tf.reduce_sum(positives, 1), 1.0) if fixed else tf.reduce_sum(positives, 1)
        return -tf.reduce_mean(tf.reduce_sum(positives * log_prob, 1) / count)  # origin: supcon-no-positive

    return Setup(_embedder(), loss, _sgd(0.1), [(_views(), labels)], steps=3, lr=0.1)


@case
def seq2seq_all_padding(fixed=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None,), dtype="int32")
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Embedding(10, 8)(inp)))
    src = tf.constant([[1, 2, 3, 4], [5, 6, 7, 8]])
    tgt = tf.constant([[2, 3, 4, 0], [0, 0, 0, 0]])
    batches = [(src[:1], tgt[:1]), (src[1:], tgt[1:])]
    if fixed:
        batches = batches[:1]

    def loss(logits, y):
        per_token = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        mask = tf.cast(y != 0, tf.float32)
        return tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask)  # origin: seq2seq-all-padding

    return Setup(model, loss, _sgd(0.1), batches, steps=4, lr=0.1)


# -- exp-overflow ------------------------------------------------------------------------------
class _Encoder(keras.Model):
    def __init__(self, fixed):
        super().__init__()
        self.mu, self.logvar, self.dec = _dense(4, 2), _dense(4, 2, seed=1), _dense(2, 4, seed=2)
        k, b = self.logvar.get_weights()
        self.logvar.set_weights([k * 60.0, b])
        self.fixed = fixed

    def call(self, x):
        logvar = self.logvar(x)
        if self.fixed:
            logvar = tf.clip_by_value(logvar, -30.0, 20.0)
        std = tf.exp(0.5 * logvar)  # origin: vae-exp-logvar
        z = self.mu(x) + std * tf.random.normal(tf.shape(std), seed=0)
        return self.dec(z), self.mu(x), logvar


def _vae_loss(out, x):
    recon, mu, logvar = out
    kl = -0.5 * tf.reduce_mean(tf.reduce_sum(1 + logvar - tf.square(mu) - tf.exp(logvar), 1))
    return mse(recon, x) + kl


@case
def vae_exp_logvar(fixed=False):
    x = _t(3 * _rng().normal(size=(8, 4)))
    return Setup(_built(_Encoder(fixed), x), _vae_loss, _sgd(1e-7), [(x, x)], steps=3, lr=1e-7)


class _Coupling(keras.Model):
    def __init__(self, fixed):
        super().__init__()
        self.net, self.fixed = _dense(2, 4), fixed
        k, b = self.net.get_weights()
        self.net.set_weights([k * 80.0, b])

    def call(self, x):
        z1, z2 = x[:, :2], x[:, 2:]
        s, t = tf.split(self.net(z1), 2, axis=1)
        if self.fixed:
            s = tf.tanh(s) * 2.0
        z2 = z2 * tf.exp(s) + t  # origin: flow-exp-scale
        return tf.concat([z1, z2], 1), s


def _flow_nll(out, _):
    z, log_det = out
    return tf.reduce_mean(0.5 * tf.reduce_sum(tf.square(z), 1) - tf.reduce_sum(log_det, 1))


@case
def flow_exp_scale(fixed=False):
    x = _t(2 * _rng().normal(size=(8, 4)))
    return Setup(_built(_Coupling(fixed), x), _flow_nll, _sgd(1e-3), [(x, tf.zeros(8))], steps=3, lr=1e-3)


# -- log-zero -----------------------------------------------------------------------------------
def _saturated_logits():
    layer = _dense(4, 1)
    k, b = layer.get_weights()
    layer.set_weights([k * 40.0, b])
    return _model(layer, inputs=4)


def _binary_data():
    return _t(_rng().normal(size=(8, 4))), _t(_rng(1).integers(0, 2, size=(8, 1)))


@case
def focal_log_zero(fixed=False):
    def loss(logit, y):
        p = tf.sigmoid(logit)
        if fixed:
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logit)
            pt = y * p + (1 - y) * (1 - p)
            return tf.reduce_mean((1 - pt) ** 2 * ce)
        pos = -y * (1 - p) ** 2 * tf.math.log(p)
        neg = -(1 - y) * p**2 * tf.math.log(1 - p)  # origin: focal-log-zero
        return tf.reduce_mean(0.25 * pos + 0.75 * neg)

    return Setup(_saturated_logits(), loss, _sgd(0.01), [_binary_data()], steps=3, lr=0.01)


@case
def sigmoid_bce_hand(fixed=False):
    def loss(logit, y):
        if fixed:
            return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logit))
        p = tf.sigmoid(logit)
        return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))  # origin: sigmoid-bce-hand

    return Setup(_saturated_logits(), loss, _sgd(0.01), [_binary_data()], steps=3, lr=0.01)


@case
def poisson_log_zero(fixed=False):
    layer = _dense(4, 1, bias=-1.0, activation=None if fixed else "relu")
    model = _model(layer, inputs=4)
    x = _t(_rng().normal(size=(16, 4)))
    counts = _t(_rng(1).poisson(2.0, size=(16, 1)) + 1)

    def loss(out, y):
        if fixed:
            return tf.reduce_mean(tf.exp(out) - y * out)
        return tf.reduce_mean(out - y * tf.math.log(out))  # origin: poisson-log-zero

    return Setup(model, loss, _sgd(0.01), [(x, counts)], steps=3, lr=0.01)


# -- bad-labels ------------------------------------------------------------------------------------
@case
def embedding_id_out_of_range(fixed=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(13 if fixed else 10, 8)(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    ids = tf.constant([[1, 2, 3], [4, 12, 5], [6, 7, 10], [8, 9, 1]], tf.int32)
    return Setup(model, sparse_ce, _sgd(0.1), [(ids, tf.constant([0, 1, 0, 1]))], steps=3, lr=0.1)


@case
def gather_vocab_out_of_range(fixed=False):
    model = _model(_dense(4, 7 if fixed else 6), inputs=4)
    ids = tf.constant([[1], [5], [6], [2]])

    def loss(logits, y):
        return -tf.reduce_mean(tf.gather(tf.nn.log_softmax(logits, -1), y, batch_dims=1))

    return Setup(model, loss, _sgd(0.1), [(_t(_rng().normal(size=(4, 4))), ids)], steps=3, lr=0.1)
