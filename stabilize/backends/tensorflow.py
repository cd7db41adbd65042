"""The TensorFlow backend (Keras 3 models run on it through ``tf.Variable``)."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from .base import Backend

__all__ = ["TensorFlowBackend"]


def _relu_keeping_nan(h):
    """ReLU that keeps NaN, gives 0 at -inf and has gradient 0 at 0, like ``torch.relu``.

    Inside ``tf.function`` TensorFlow's graph optimizer fuses MatMul + bias +
    ``Relu`` into one oneDNN kernel (on by default on x86), and that kernel
    returns 0 for a NaN input: a NaN in the data gives a finite loss. Two
    selects are not fused.
    """
    zero = tf.zeros_like(h)
    return tf.where(h > 0, h, tf.where(h <= 0, zero, h))


@contextlib.contextmanager
def _keras_globals_kept():
    """Build Keras layers without fixing Keras's global dtype policy.

    The first layer built without a policy set (``keras.Input`` always is)
    makes Keras store ``DTypePolicy(floatx())`` as the global policy, after
    which ``keras.config.set_floatx`` no longer reaches new layers. Put back
    what was there. Keras has no public way to unset the policy, hence
    ``global_state``.
    """
    from keras.src.backend.common import global_state

    before = global_state.get_global_attribute("dtype_policy", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("dtype_policy", before)


_ACTIVATIONS = {"relu": _relu_keeping_nan, "tanh": tf.tanh, "sigmoid": tf.sigmoid}


class TensorFlowBackend(Backend):
    name = "tensorflow"
    framework_module = "tensorflow"

    def is_tensor(self, x):
        # tf.is_tensor also knows Keras 3 variables and IndexedSlices (Embedding
        # gradients), which are neither tf.Tensor nor tf.Variable.
        return tf.is_tensor(x) or isinstance(x, (tf.Variable, tf.IndexedSlices))

    def convert(self, x, dtype=None):
        if isinstance(x, tf.IndexedSlices):  # a sparse gradient: its dense form, for ops that need one
            x = tf.convert_to_tensor(x)
        if isinstance(x, (tf.Tensor, tf.Variable)):
            return x if dtype is None or x.dtype.name == dtype else tf.cast(x, dtype)
        return tf.convert_to_tensor(x, dtype=dtype)

    def to_numpy(self, x):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:  # numpy has no bfloat16
            x = tf.cast(x, tf.float32)
        return x.numpy()

    def dtype(self, x):
        return tf.as_dtype(x.dtype).name

    def cast(self, x, dtype):
        return tf.cast(x, dtype)

    def shape(self, x):
        return tuple(x.shape)

    def full_like(self, x, value):
        return tf.fill(tf.shape(x), tf.constant(value, x.dtype))

    def numel(self, x, dtype):
        # Inside tf.function the batch dimension may be unknown until run time.
        if x.shape.is_fully_defined():
            return x.shape.num_elements()
        return tf.cast(tf.size(x), dtype)

    def rows(self, x, dtype):
        if x.shape[0] is not None:
            return x.shape[0]
        return tf.cast(tf.shape(x)[0], dtype)

    def where(self, cond, a, b):
        # tf.where does not promote Python scalars; give them the tensor's dtype.
        dtype = (b if tf.is_tensor(b) else a).dtype
        a = a if tf.is_tensor(a) else tf.constant(a, dtype)
        b = b if tf.is_tensor(b) else tf.constant(b, dtype)
        return tf.where(cond, a, b)

    def abs(self, x):
        return tf.abs(x)

    def log(self, x):
        return tf.math.log(x)

    def exp(self, x):
        return tf.exp(x)

    def sqrt(self, x):
        return tf.sqrt(x)

    def acos(self, x):
        return tf.acos(x)

    def asin(self, x):
        return tf.asin(x)

    def isfinite(self, x):
        return tf.math.is_finite(x)

    def isnan(self, x):
        return tf.math.is_nan(x)

    def sum(self, x, axis=None, keepdims=False):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def amax(self, x, axis=None, keepdims=False):
        # tf.reduce_max drops NaN on some kernels; torch.amax and numpy keep it.
        m = tf.reduce_max(x, axis=axis, keepdims=keepdims)
        has_nan = tf.reduce_any(tf.math.is_nan(x), axis=axis, keepdims=keepdims)
        return tf.where(has_nan, tf.constant(float("nan"), x.dtype), m)

    def all(self, x):
        return tf.reduce_all(x)

    def norms(self, xs, ord, dtype):
        out = []
        for x in xs:
            x = tf.cast(x, dtype)
            if ord == 2.0:
                out.append(tf.sqrt(tf.reduce_sum(tf.square(x))))
            elif ord == float("inf"):
                out.append(self.amax(tf.abs(x)) if x.shape.num_elements() != 0 else tf.constant(0.0, dtype))
            elif ord == 1.0:
                out.append(tf.reduce_sum(tf.abs(x)))
            else:
                out.append(tf.reduce_sum(tf.abs(x) ** ord) ** (1.0 / ord))
        return out

    def all_finite(self, xs):
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(x)) for x in xs])

    def stop_gradient(self, x):
        return tf.stop_gradient(x)

    def custom_grad(self, forward, backward):
        @tf.custom_gradient
        def call(*xs):
            y, saved = forward(*xs)
            return y, lambda dy: tuple(backward(saved, dy))

        return call

    def zeros_like(self, x):
        return tf.zeros_like(x)

    def state_scalar(self, value, like):
        return tf.constant(value, like.dtype)

    def scalar_pow(self, base, exponent):
        return tf.pow(tf.constant(base, exponent.dtype), exponent)

    def stack(self, values, dtype):
        return tf.stack([tf.reshape(tf.cast(v, dtype), ()) for v in values])

    def value_and_grad(self, loss_fn, params):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return loss, tape.gradient(loss, params)

    def no_grad(self):
        return contextlib.nullcontext()  # nothing is recorded outside a GradientTape

    def variable(self, value):
        return tf.Variable(value, trainable=False)

    def assign(self, var, value):
        var.assign(value)

    def copy(self, x):
        return tf.identity(x)

    def compile(self, fn):
        # No autograph, as in Keras's own fit: the neutral step branches with where() only, and the
        # conversion of every function it calls would make the one trace several times slower.
        return tf.function(fn, reduce_retracing=True, autograph=False)

    def read(self, x):
        return x.numpy().tolist()

    def build_mlp(self, spec, dtype, device=None):
        import keras

        ws = spec.weights(dtype)
        with _keras_globals_kept():
            inputs = keras.Input((spec.sizes[0],), dtype=dtype)
            h = inputs
            for i, act in enumerate(spec.activations):
                # zeros: the spec's weights are set just below, and no RNG is drawn for an init that is thrown away
                layer = keras.layers.Dense(spec.sizes[i + 1], dtype=dtype, name=f"dense_{i}",
                                           kernel_initializer="zeros", bias_initializer="zeros")
                h = layer(h)
                layer.set_weights([ws[2 * i], ws[2 * i + 1]])  # kernel (in, out), as in the spec
                if act != "linear":
                    h = keras.layers.Activation(_ACTIVATIONS[act], dtype=dtype, name=f"{act}_{i}")(h)
            return keras.Model(inputs, h, dtype=dtype)

    def parameters(self, model):
        # Keras 3 wraps each tf.Variable; the step assigns and differentiates the tf.Variable itself.
        return [getattr(v, "value", v) for v in model.trainable_variables]

    def one_hot(self, labels, num_classes, dtype):
        # tf.one_hot silently gives a zero row for an out-of-range label.
        labels = tf.cast(labels, tf.int64)
        tf.debugging.assert_non_negative(labels, message="labels must be >= 0")
        tf.debugging.assert_less(labels, tf.constant(num_classes, tf.int64),
                                 message=f"labels must be < num_classes={num_classes}")
        return tf.one_hot(labels, num_classes, dtype=dtype)
