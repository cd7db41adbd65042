"""The Keras (TensorFlow) reproductions of the catalogue (see registry.py).

Same cases, same numbers as cases_torch.py where the frameworks allow; a line
marked ``# origin: <case>`` is the operation the diagnosis must name.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import stabilize

from .harness import Setup

CASES = {}


def case(fn):
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a, dtype="float32"):
    return tf.constant(np.asarray(a), dtype=dtype)


def _dense(i, o, *, zero=False, weight=None, bias=None, dtype="float32", seed=0, activation=None):
    keras.utils.set_random_seed(seed)
    layer = keras.layers.Dense(o, dtype=dtype, activation=activation)
    layer.build((None, i))
    k, b = layer.get_weights()
    if zero:
        k, b = np.zeros_like(k), np.zeros_like(b)
    if weight is not None:
        k = np.asarray(weight, k.dtype).T  # torch (out, in) -> keras (in, out)
    if bias is not None:
        b = np.full_like(b, bias)
    layer.set_weights([k, b])
    return layer


def _model(*layers, inputs=None, dtype="float32", input_dtype=None):
    inp = keras.Input((inputs,), dtype=input_dtype or dtype)
    h = inp
    for layer in layers:
        h = layer(h)
    return keras.Model(inp, h)


def _sgd(lr, **kw):
    return keras.optimizers.SGD(learning_rate=lr, **kw)


def mse(pred, y):
    return tf.reduce_mean(tf.square(pred - y))


def sparse_ce(logits, y):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


# -- singular-op --------------------------------------------------------------------
@case
def sqrt_distance(fixed=False):
    model = _model(_dense(2, 2, zero=True), inputs=2)
    y = np.zeros((8, 2))
    y[4:] = _rng(1).normal(size=(4, 2))

    def loss(pred, y):
        if fixed:
            return tf.reduce_mean(stabilize.safe_norm(pred - y, axis=-1))
        return tf.reduce_mean(tf.sqrt(tf.reduce_sum(tf.square(pred - y), -1)))  # origin: sqrt-distance

    return Setup(model, loss, _sgd(0.1), [(_t(_rng().normal(size=(8, 2))), _t(y))], steps=5, lr=0.1)


@case
def norm_smoothness(fixed=False):
    model = _model(_dense(3, 1, zero=True), inputs=3)

    def loss(pred, y):
        step = pred[1:] - pred[:-1]
        smooth = stabilize.safe_norm(step) if fixed else tf.norm(step)  # origin: norm-smoothness
        return mse(pred, y) + 0.1 * smooth

    return Setup(model, loss, _sgd(0.1), [(_t(_rng().normal(size=(6, 3))), _t(_rng(1).normal(size=(6, 1))))], steps=5, lr=0.1)


@case
def acos_angle(fixed=False):
    model = _model(_dense(2, 2, weight=np.eye(2), bias=0.0), inputs=2)
    x = _t([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -1.0]])

    def loss(pred, y):
        cos = tf.reduce_sum(pred * y, -1) / (tf.norm(pred, axis=-1) * tf.norm(y, axis=-1))
        cos = tf.clip_by_value(cos, -1.0, 1.0)
        angle = stabilize.safe_acos(cos) if fixed else tf.acos(cos)  # origin: acos-angle
        return tf.reduce_mean(angle)

    return Setup(model, loss, _sgd(0.1), [(x, x)], steps=5, lr=0.1)


@case
def pow_negative_base(fixed=False):
    layer = _dense(3, 1, bias=-3.0)
    k, b = layer.get_weights()
    layer.set_weights([k * 0.1, b])
    model = _model(layer, inputs=3)

    def loss(pred, y):
        root = stabilize.safe_pow(pred + 1, 1 / 3) if fixed else tf.pow(pred + 1, 1 / 3)  # origin: pow-negative-base
        return tf.reduce_mean(tf.square(root - y))

    data = (_t(_rng().normal(size=(8, 3))), _t(_rng(1).uniform(0.5, 1.5, size=(8, 1))))
    return Setup(model, loss, _sgd(0.05), [data], steps=5, lr=0.05)


class _BatchStandardize(keras.layers.Layer):
    def __init__(self, fixed, **kw):
        super().__init__(**kw)
        self.fixed = fixed

    def call(self, h):
        mean = tf.reduce_mean(h, 0)
        if self.fixed:
            return (h - mean) / (stabilize.safe_std(h, axis=0, ddof=1) + 1e-5)
        return (h - mean) / keras.ops.std(h, axis=0)  # origin: std-one-sample


@case
def std_one_sample(fixed=False):
    model = _model(_dense(4, 3), _BatchStandardize(fixed), _dense(3, 1, seed=1), inputs=4)
    X, Y = _rng().normal(size=(9, 4)), _rng(1).normal(size=(9, 1))
    batches = [(_t(X[:8]), _t(Y[:8])), (_t(X[8:]), _t(Y[8:]))]
    return Setup(model, mse, _sgd(0.05), batches, steps=4, lr=0.05)


# -- masked-softmax ------------------------------------------------------------------
class _Attention(keras.layers.Layer):
    """Single-head attention over token ids with padding id 0 (optionally causal)."""

    def __init__(self, fixed, causal, **kw):
        super().__init__(**kw)
        self.fixed, self.causal = fixed, causal
        self.emb = keras.layers.Embedding(10, 8)
        self.q, self.k, self.head = keras.layers.Dense(8), keras.layers.Dense(8), keras.layers.Dense(2)

    def call(self, ids):
        h = self.emb(ids)
        scores = tf.matmul(self.q(h), self.k(h), transpose_b=True) / 8**0.5
        allowed = (ids != 0)[:, None, :]
        if self.causal:
            n = tf.shape(ids)[1]
            allowed = allowed & tf.cast(tf.linalg.band_part(tf.ones((n, n)), -1, 0), tf.bool)[None]
        if self.fixed:
            w = stabilize.masked_softmax(scores, allowed)
        else:
            w = tf.nn.softmax(tf.where(allowed, scores, float("-inf")), axis=-1)  # origin: mha-padding causal-left-padding
        return self.head(tf.reduce_mean(tf.matmul(w, h), 1))


def _attention_setup(fixed, causal, ids, y):
    keras.utils.set_random_seed(0)
    inp = keras.Input((ids.shape[1],), dtype="int32")
    model = keras.Model(inp, _Attention(fixed, causal)(inp))
    return Setup(model, sparse_ce, _sgd(0.1), [(tf.constant(ids, tf.int32), tf.constant(y, tf.int32))], steps=4, lr=0.1)


@case
def mha_padding(fixed=False):
    ids = np.array([[3, 4, 5, 0, 0], [1, 2, 0, 0, 0], [6, 7, 8, 9, 1], [0, 0, 0, 0, 0]])
    if fixed:
        ids = ids[:3]  # the empty sequence dropped: every sequence keeps one key
    return _attention_setup(fixed, False, ids, np.array([0, 1, 0, 1])[: len(ids)])


@case
def causal_left_padding(fixed=False):
    return _attention_setup(fixed, True, np.array([[0, 0, 3, 4], [5, 6, 7, 8], [0, 2, 2, 9]]), np.array([1, 0, 1]))


# -- low-precision -------------------------------------------------------------------
@case
def fp16_sum_overflow(fixed=False):
    model = _model(_dense(4, 1, dtype="float16"), inputs=4, dtype="float16")
    x = _t(_rng().normal(size=(64, 4)), "float16")
    y = _t(40 + _rng(1).normal(size=(64, 1)), "float16")

    def loss(pred, y):
        if fixed:
            return stabilize.safe_mse(pred, y)
        return tf.reduce_sum(tf.square(pred - y))  # origin: fp16-sum-overflow

    return Setup(model, loss, _sgd(1e-4), [(x, y)], steps=4, lr=1e-4)


@case
def fp16_adam_eps(fixed=False):
    model = _model(_dense(4, 1, dtype="float16"), inputs=4, dtype="float16")
    x = _t(0.01 * _rng().normal(size=(16, 4)), "float16")
    y = model(x) + tf.constant(1e-3, tf.float16)
    opt = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-4 if fixed else 1e-8)
    loss = lambda p, t: tf.reduce_mean(tf.square(tf.cast(p, tf.float32) - tf.cast(t, tf.float32)))
    return Setup(model, loss, opt, [(x, y)], steps=4, lr=1e-3)


# -- weight-decay --------------------------------------------------------------------
def _mlp(activation="tanh", hidden=8):
    return _model(_dense(4, hidden, activation=activation), _dense(hidden, 1, seed=1), inputs=4)


def _regression(n=32, seed=0):
    X = _rng(seed).normal(size=(n, 4))
    return _t(X), _t(X @ np.array([[0.5], [-1.0], [0.3], [0.8]]))


@case
def sgd_weight_decay(fixed=False):
    return Setup(_mlp(), mse, _sgd(0.5, weight_decay=1e-4 if fixed else 1000.0), [_regression()], steps=40, lr=0.5)


@case
def adamw_weight_decay(fixed=False):
    lr, wd = (1e-2, 0.01) if fixed else (1.0, 10.0)
    return Setup(_mlp(), mse, keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd), [_regression()], steps=80, lr=lr)


# -- rnn-exploding -------------------------------------------------------------------
def _rnn_lm(scale):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None,), dtype="int32")
    rnn = keras.layers.SimpleRNN(32, activation="relu", return_sequences=True)
    h = rnn(keras.layers.Embedding(20, 16)(inp))
    model = keras.Model(inp, keras.layers.Dense(20)(h))
    k, r, b = rnn.get_weights()
    rnn.set_weights([k, r * scale, b])
    return model


def _tokens(n, t, seed=0):
    ids = _rng(seed).integers(0, 20, size=(n, t + 1))
    return tf.constant(ids[:, :-1], tf.int32), tf.constant(ids[:, 1:], tf.int32)


@case
def rnn_lm_lr20(fixed=False):
    return Setup(_rnn_lm(1.5), sparse_ce, _sgd(20.0), [_tokens(8, 20)], steps=8, lr=20.0, clip_norm=0.25 if fixed else None)


@case
def rnn_long_sequence(fixed=False):
    return Setup(_rnn_lm(3.0), sparse_ce, _sgd(0.05), [_tokens(4, 40, seed=1)], steps=10, lr=0.05,
                 clip_norm=0.5 if fixed else None)


# -- bad-labels ----------------------------------------------------------------------
@case
def labels_one_based(fixed=False):
    y = np.array([1, 2, 3] * 3)
    data = (_t(_rng().normal(size=(9, 4))), tf.constant(y - 1 if fixed else y, tf.int32))
    return Setup(_model(_dense(4, 3), inputs=4), sparse_ce, _sgd(0.1), [data], steps=3, lr=0.1)


@case
def segmentation_void_255(fixed=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1)(inp))
    mask = _rng(1).integers(0, 2, size=(2, 4, 4)) * 255
    x = _t(_rng().normal(size=(2, 3, 4, 4)).transpose(0, 2, 3, 1))
    return Setup(model, sparse_ce, _sgd(0.1), [(x, tf.constant(mask // 255 if fixed else mask, tf.int32))], steps=3, lr=0.1)


# -- existing causes, from public reports -------------------------------------------
@case
def log_of_softmax(fixed=False):
    layer = _dense(4, 3)
    k, b = layer.get_weights()
    layer.set_weights([k * 200.0, b])
    model = _model(layer, inputs=4)
    y = _rng(1).integers(0, 3, size=8)

    def loss(logits, y):
        if fixed:
            return stabilize.safe_cross_entropy(logits, y)
        p = tf.nn.softmax(logits, -1)
        return -tf.reduce_mean(tf.reduce_sum(tf.one_hot(y, 3) * tf.math.log(p), 1))  # origin: log-of-softmax

    return Setup(model, loss, _sgd(0.01), [(_t(_rng().normal(size=(8, 4))), tf.constant(y, tf.int32))], steps=3, lr=0.01)


@case
def where_masked_relative_error(fixed=False):
    model = _model(_dense(3, 1), inputs=3)
    y = _t(np.array([[0.0], [1.0], [2.0], [0.0], [-1.0], [3.0], [0.5], [1.5]]))

    def loss(pred, y):
        if fixed:
            safe = tf.where(y != 0, y, tf.ones_like(y))
            return tf.reduce_mean(tf.abs(tf.where(y != 0, (pred - y) / safe, tf.zeros_like(y))))
        rel = tf.where(y != 0, (pred - y) / y, tf.zeros_like(y))  # origin: where-masked-relative-error
        return tf.reduce_mean(tf.abs(rel))

    return Setup(model, loss, _sgd(0.1), [(_t(_rng().normal(size=(8, 3))), y)], steps=3, lr=0.1)


@case
def nan_in_csv(fixed=False):
    X, y = (np.asarray(a) for a in _regression())
    X = X.copy()
    X[[3, 17], 1] = np.nan
    if fixed:
        keep = ~np.isnan(X).any(1)
        X, y = X[keep], y[keep]
    return Setup(_mlp(), mse, _sgd(0.05), [(_t(X), _t(y))], steps=3, lr=0.05)


@case
def minmax_constant_column(fixed=False):
    X = _rng().normal(size=(32, 4))
    X[:, 2] = 7.0
    lo, hi = X.min(0), X.max(0)
    span = np.where(hi > lo, hi - lo, 1.0) if fixed else hi - lo
    with np.errstate(invalid="ignore"):
        Xs = (X - lo) / span
    return Setup(_mlp(), mse, _sgd(0.05), [(_t(Xs), _regression()[1])], steps=3, lr=0.05)


@case
def unscaled_features(fixed=False):
    X = 5000 + 1000 * _rng().normal(size=(32, 4))
    if fixed:
        X = (X - X.mean(0)) / X.std(0)
    return Setup(_mlp("relu", 16), mse, _sgd(0.05), [(_t(X), _regression()[1])], steps=30, lr=0.05)


@case
def high_learning_rate(fixed=False):
    lr = 0.01 if fixed else 3.0
    return Setup(_mlp("relu", 16), mse, _sgd(lr), [_regression()], steps=40, lr=lr)


from . import cases_keras_more  # noqa: E402,F401 - registers the cases of issue 19
