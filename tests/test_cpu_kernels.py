"""Which CPU kernels the frameworks run: importing keras_diffusion puts XLA's
CPU convolutions on its multi-threaded Eigen kernels, where the installed
XLA knows how, and leaves a user's own choice alone."""

import subprocess
import sys

import keras
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import child_env

EIGEN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
YNNPACK = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
PATIENT = "--xla_cpu_collective_call_terminate_timeout_seconds=3600"
IMPATIENT = "--xla_cpu_collective_call_terminate_timeout_seconds=40"


@pytest.mark.parametrize("flags, jaxlib, tensorflow, expected", [
    ("", (0, 10), (2, 21), f"{EIGEN} {PATIENT}"),
    ("--xla_force_host_platform_device_count=2", (0, 10), None,
     f"--xla_force_host_platform_device_count=2 {EIGEN} {PATIENT}"),
    (YNNPACK, (0, 10), (2, 21), f"{YNNPACK} {PATIENT}"),  # the user's choice
    (IMPATIENT, (0, 10), (2, 21), f"{IMPATIENT} {EIGEN}"),
    ("", (0, 9), (2, 21), ""),  # an XLA this was not measured on
    ("", None, (2, 21), ""),  # no JAX
    ("", (0, 10), (2, 20), ""),  # TensorFlow 2.20's XLA does not know the flag
])
def test_xla_cpu_flags_go_in_where_xla_knows_them(flags, jaxlib, tensorflow, expected):
    assert kd._xla_flags_for_cpus(flags, jaxlib, tensorflow) == expected


# A 3x3 convolution with 64 channels, which jaxlib 0.10's XLA gives YNNPACK by
# default; the child prints whether it did, and the largest difference from
# the convolution summed out in NumPy.
_CONVOLUTION = """
import keras_diffusion
import jax, numpy as np
x = np.random.default_rng(0).normal(size=(2, 8, 8, 64)).astype("float32")
w = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype("float32")
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
compiled = jax.jit(conv).lower(x, w).compile()
padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
expected = sum(np.einsum("nhwc,co->nhwo", padded[:, i:i + 8, j:j + 8], w[i, j])
               for i in range(3) for j in range(3))
print("__ynn_fusion" in compiled.as_text(), np.abs(np.asarray(compiled(x, w)) - expected).max())
"""


@pytest.mark.skipif(BACKEND != "jax", reason="which kernel XLA compiles a convolution to; runs under JAX")
@pytest.mark.parametrize("user_flags", ["", YNNPACK])
def test_jax_convolutions_run_on_eigen_unless_the_user_chooses(user_flags):
    """Compiled as a user's program compiles it (all of XLA's passes, which
    the suite's other children skip), after `import keras_diffusion`."""
    env = child_env("jax")
    env["XLA_FLAGS"] = user_flags  # without the suite's flags
    out = subprocess.run([sys.executable, "-c", _CONVOLUTION], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    to_ynnpack, error = out.stdout.split()[-2:]
    eigen = EIGEN in kd._xla_flags_for_cpus(
        user_flags, kd._version("jaxlib"), kd._version("tensorflow"))
    assert to_ynnpack == str(not eigen)
    assert float(error) < 1e-3  # |values| ~ 25: both kernels compute the convolution


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="JAX's and TensorFlow's own "
                    "attention (PyTorch's is its fused kernel)")
@pytest.mark.parametrize("queries, keys", [(3072, 400), (1000, 1100)],
                         ids=["in blocks of queries", "whole heads or an uneven last block"])
def test_large_attention_runs_blocked_to_the_same_values_and_gradients(queries, keys):
    """Above `_BLOCKED_PAIRS` query x key pairs, JAX's and TensorFlow's
    attention run one (batch, head) pair and block of queries at a time:
    the same outputs and gradients as the one-tensor product, computed here
    in NumPy (on TensorFlow in a graph of unknown batch size too)."""
    import numpy as np

    from keras_diffusion import backend as kd_backend

    module = kd_backend.current()
    assert queries * keys >= module._BLOCKED_PAIRS
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, queries, 2, 8)).astype("float32")
    k, v = (rng.standard_normal((2, keys, 2, 8)).astype("float32") for _ in range(2))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    if BACKEND == "tensorflow":
        _check_tensorflow_attention(module.attention, q, k, v, expected)
        return
    import jax

    got = jax.jit(module.attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    def one_tensor(q, k, v):
        weights = jax.nn.softmax(jax.numpy.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8), axis=-1)
        return jax.numpy.einsum("bhqk,bkhd->bqhd", weights, v)

    grads = jax.jit(jax.grad(lambda *a: loss(module.attention, *a), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(lambda *a: loss(one_tensor, *a), argnums=(0, 1, 2))(q, k, v)
    for got_grad, want in zip(grads, reference):
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want), atol=1e-4)


def _check_tensorflow_attention(attention, q, k, v, expected):
    """TensorFlow's blocked attention in a graph, against `expected`, and its
    gradients against those of Keras' one-tensor op (a bfloat16 input comes
    back bfloat16)."""
    import numpy as np
    import tensorflow as tf

    got = tf.function(attention)(q, k, v)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    specs = [tf.TensorSpec((None,) + x.shape[1:], tf.float32) for x in (q, k, v)]
    got = tf.function(attention, input_signature=specs)(q, k, v)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert tf.function(attention)(*(tf.cast(x, "bfloat16") for x in (q, k, v))).dtype == \
        tf.bfloat16
    tensors = [tf.constant(x) for x in (q, k, v)]
    grads = []
    for fn in (attention, lambda q, k, v: keras.ops.dot_product_attention(q, k, v)):
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = tf.reduce_sum(fn(*tensors) ** 2)
        grads.append(tape.gradient(loss, tensors))
    for got_grad, want in zip(*grads):
        np.testing.assert_allclose(got_grad.numpy(), want.numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 64, 48, 64), (1, 5, 7, 32)])
def test_group_normalization_is_the_closed_form(shape):
    """The backend's group normalization (TensorFlow's reductions laid out
    per channel, PyTorch's `group_norm`, Keras' own on JAX) is the float64
    closed form within 1e-5, at any spatial size (traced with unknown
    sizes on TensorFlow), and on TensorFlow its gradients are those of
    Keras' generic layer."""
    import numpy as np

    from keras_diffusion.network import _GroupNormalization

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype("float32")
    layer = _GroupNormalization(8, epsilon=1e-5, name="norm")
    layer.build(shape)
    layer.gamma.assign(rng.standard_normal(shape[-1]))
    layer.beta.assign(rng.standard_normal(shape[-1]))
    grouped = x.astype("float64").reshape(shape[0], -1, 8, shape[-1] // 8)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    variance = grouped.var(axis=(1, 3), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(variance + 1e-5)).reshape(shape)
    expected = expected * layer.gamma.numpy() + layer.beta.numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)
    if BACKEND != "tensorflow":
        return
    import tensorflow as tf

    traced = tf.function(layer.__call__, autograph=False).get_concrete_function(
        tf.TensorSpec((None, None, None, shape[-1]), "float32"))
    np.testing.assert_allclose(traced(x).numpy(), expected, atol=1e-5)
    weights = rng.standard_normal(shape).astype("float32")

    def gradients(call):
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(call(inputs) * weights)
        return tape.gradient(loss, [inputs, layer.gamma.value, layer.beta.value])

    ours = gradients(layer)
    generic = gradients(lambda inputs: keras.layers.GroupNormalization.call(layer, inputs))
    for got, want in zip(ours, generic):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-4)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's own bfloat16 convolution on CPU")
def test_a_bfloat16_convolution_on_jax_is_nine_products_rounded_once(monkeypatch):
    """A bfloat16 3x3 convolution ("same", stride 1) on a small map runs as
    one product per tap (a 1x1 as one product), summed in float32 with the
    bias and rounded once: it equals the float32 convolution of the same
    bfloat16 values, rounded to bfloat16; float32, a stride, another size
    of kernel or a larger map than the limit take Keras' own convolution."""
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from keras_diffusion.backend import jax as jax_backend
    from keras_diffusion.network import _Conv2D

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 16)).astype(ml_dtypes.bfloat16)
    layer = _Conv2D(8, 3, padding="same", dtype="bfloat16")
    layer.build(x.shape)
    layer.bias.assign(rng.standard_normal(8))
    y = jax_backend.conv2d(layer, jnp.asarray(x))
    assert y is not NotImplemented and y.dtype == jnp.bfloat16 and y.shape == (2, 6, 5, 8)
    kernel = np.asarray(layer.kernel.value, "float32")
    padded = np.pad(np.asarray(x, "float32"), ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = sum(padded[:, i:i + 6, j:j + 5] @ kernel[i, j] for i in range(3) for j in range(3))
    expected = (expected + np.asarray(layer.bias.value, "float32")).astype(ml_dtypes.bfloat16)
    got = np.asarray(y, "float32")
    # One rounding of float32 sums taken in another order: at most one
    # bfloat16 step (2^-8 of the value) apart, most exactly equal.
    def rounded_once(got, expected):
        got, expected = np.asarray(got, "float32"), expected.astype("float32")
        return (np.all(np.abs(got - expected) <= np.abs(got) * 2.0 ** -8 + 1e-6)
                and np.mean(got == expected) > 0.9)

    assert rounded_once(got, expected)
    # The layer runs it too, through keras_diffusion.backend.conv2d.
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x)), "float32"), got)

    assert jax_backend.conv2d(layer, jnp.asarray(x, jnp.float32)) is NotImplemented
    strided = _Conv2D(8, 3, strides=2, padding="same", dtype="bfloat16")
    strided.build(x.shape)
    assert jax_backend.conv2d(strided, jnp.asarray(x)) is NotImplemented
    wide = _Conv2D(8, 5, padding="same", dtype="bfloat16")
    wide.build(x.shape)
    assert jax_backend.conv2d(wide, jnp.asarray(x)) is NotImplemented
    pointwise = _Conv2D(8, 1, dtype="bfloat16")
    pointwise.build(x.shape)
    pointwise.bias.assign(rng.standard_normal(8))
    expected = (np.asarray(x, "float32") @ np.asarray(pointwise.kernel.value, "float32")[0, 0]
                + np.asarray(pointwise.bias.value, "float32")).astype(ml_dtypes.bfloat16)
    assert rounded_once(jax_backend.conv2d(pointwise, jnp.asarray(x)), expected)
    monkeypatch.setattr(jax_backend, "_TAP_PRODUCT_POSITIONS", 6 * 5 - 1)
    assert jax_backend.conv2d(layer, jnp.asarray(x)) is NotImplemented
