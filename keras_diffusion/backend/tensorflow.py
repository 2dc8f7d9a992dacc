"""TensorFlow: train and test steps under `GradientTape` (averaging the
replicas' gradients under `tf.distribute`), and graph-mode sampling."""

import contextlib
import functools
import math
import os
import platform
import warnings

import keras
import numpy as np
import tensorflow as tf


def train_step(model, data):
    batch = model.unpack_batch(data)
    replicas = _replicas()
    with tf.GradientTape() as tape:
        with _noise_per_replica(model, replicas):
            losses = model.compute_losses(batch, training=True)
        # scale_loss is the identity unless the optimizer is a LossScaleOptimizer.
        # Under tf.distribute the optimizer sums the replicas' gradients, so
        # divide by their number to average over the global batch.
        scaled_loss = model.optimizer.scale_loss(losses["loss"]) / replicas
    variables = model.trainable_variables
    gradients = tape.gradient(scaled_loss, variables)
    model.optimizer.apply(gradients, variables)
    model.after_train_step()
    return model.update_metrics(losses)


def before_fit(model):
    """Build the optimizer's variables before `fit` traces the train step.

    Keras builds them ahead only under a `tf.distribute` strategy; otherwise
    the first trace creates them, and a `tf.function` that creates variables
    is traced a second time. Building them here halves the first `fit`'s
    tracing (7 s instead of 15 s for the smallest UNet, 2-core Xeon)."""
    optimizer = model.optimizer
    if model._distribute_strategy is None and optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    warn_without_onednn()


# TensorFlow decides whether its CPU convolutions and matrix products run on
# oneDNN once, while its shared libraries load (that is when it reads
# TF_ENABLE_ONEDNN_OPTS, docs/performance.md): the variable set after that
# changes nothing, and nothing public switches it later. So a TensorFlow that
# `import keras` loaded before keras_diffusion set the variable keeps its own
# default, which is off on CPUs without AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX.
WITHOUT_ONEDNN = (
    "TensorFlow was loaded before keras_diffusion (by `import keras` or `import tensorflow`) and "
    "runs without its oneDNN kernels, its own default on this CPU, with which this library's UNet "
    "trained at half speed on an AVX2-only AMD EPYC. Fix: import keras_diffusion before keras and "
    "tensorflow, or export TF_ENABLE_ONEDNN_OPTS=1 before starting Python."
)


def runs_without_onednn():
    """Whether TensorFlow runs without its oneDNN kernels on an x86 CPU
    though the user did not ask for that (`TF_ENABLE_ONEDNN_OPTS=0`)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # oneDNN's switch is an x86 matter
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").lower() in ("0", "false"):
        return False  # the user's choice
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow that does not say: nothing to go by
        return False
    return not _pywrap_util_port.IsMklEnabled()


def check_on_import():
    """Called once, by `import keras_diffusion`: warn where TensorFlow was
    loaded first without oneDNN, on the line of the user's import (the
    caller's caller; the import machinery's frames do not count)."""
    _warn_once(stacklevel=4)


def warn_without_onednn():
    """The warning when `fit` starts, unless the import gave it already:
    once a process."""
    _warn_once(stacklevel=3)


@functools.cache
def _warn_once(stacklevel):
    if _WARNED or not runs_without_onednn():
        return
    _WARNED.append(True)
    warnings.warn(WITHOUT_ONEDNN, stacklevel=stacklevel)


_WARNED = []


def test_step(model, data):
    batch = model.unpack_batch(data)
    with _noise_per_replica(model, _replicas()):
        losses = model.compute_losses(batch, training=False)
    return model.update_metrics(losses)


def _replicas():
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


@contextlib.contextmanager
def _noise_per_replica(model, replicas):
    """Under MirroredStrategy every replica starts from the same seed state,
    so each would draw the same timesteps and noise for its share of the
    batch. Offset the key of each replica's copy of the state by the replica
    id while the loss is computed, then take the offset off again: replicas
    draw their own noise, and the copies stay equal (an assignment in replica
    context changes only that replica's copy)."""
    if replicas == 1:
        yield
        return
    state = model.seed_generator.state
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    offset = tf.stack([tf.cast(replica, state.dtype), tf.constant(0, state.dtype)])
    state.assign(state.value + offset)
    yield
    state.assign(state.value - offset)


# Attention with at least this many query x key pairs runs one (batch,
# head) pair and `_QUERY_BLOCK` queries at a time (`attention`).
_BLOCKED_PAIRS = 1024 * 1024
_QUERY_BLOCK = 512


def attention(q, k, v, is_causal=False):
    """softmax(q k^T / sqrt(d)) v over `(B, N, heads, d)` tensors, as
    Keras' op computes it: the products in the inputs' dtype (bfloat16 on
    oneDNN's native kernels), logits and softmax in float32, the weights
    rounded back to the inputs' dtype. But Keras' op makes the whole
    `(B, heads, N, M)` score tensor and its softmax at once: at SD 3.5's
    1024x1024 (4,429 tokens, 24 heads, a guided batch of 2) 3.8 GB each,
    which took the process past 24 GB. Above `_BLOCKED_PAIRS` pairs each
    (batch, head) pair is one iteration of a loop whose body takes the
    queries `_QUERY_BLOCK` at a time, so each score matrix is a 2-D
    product of a few MB (0.44 GB of scores at once when the block spanned
    every head): at SD 1.5's 64x64 latents (4,096 positions, 8 heads, a
    batch of 2) an attention took 0.24 s against 0.43 for all heads per
    block, as long as PyTorch's fused kernel (2-core Xeon). Below, and for
    causal or unknown lengths (CLIP's short text), Keras' op."""
    queries, keys = q.shape[1], k.shape[1]
    if is_causal or queries is None or keys is None or queries * keys < _BLOCKED_PAIRS:
        return keras.ops.dot_product_attention(q, k, v, is_causal=is_causal)
    scale, dtype = 1.0 / math.sqrt(q.shape[-1]), v.dtype
    batch, heads, depth = tf.shape(q)[0], q.shape[2], v.shape[-1]

    def heads_first(x):  # (B, N, heads, d) -> (B * heads, N, d)
        x = tf.transpose(tf.cast(x, dtype), (0, 2, 1, 3))
        return tf.reshape(x, (-1, x.shape[2], x.shape[3]))

    def one_head(args):
        q, k, v = args
        blocks = []
        for start in range(0, queries, _QUERY_BLOCK):
            logits = tf.matmul(q[start:start + _QUERY_BLOCK], k, transpose_b=True)
            weights = tf.nn.softmax(tf.cast(logits, "float32") * scale, axis=-1)
            blocks.append(tf.matmul(tf.cast(weights, dtype), v))
        return tf.concat(blocks, axis=0)

    out = tf.map_fn(one_head, tuple(heads_first(x) for x in (q, k, v)), parallel_iterations=2,
                    fn_output_signature=tf.TensorSpec((queries, depth), dtype))
    return tf.transpose(tf.reshape(out, (batch, heads, queries, depth)), (0, 2, 1, 3))


def compile_function(fn):
    # Plain graph mode: on CPU, TF without XLA ran this UNet faster than with it.
    # No autograph: the loops are keras.ops.fori_loop, already graph ops.
    return tf.function(fn, reduce_retracing=True, autograph=False)


def group_normalization(layer, x):
    """Keras' `GroupNormalization` over the last axis in float32, its
    reductions laid out for TensorFlow's CPU kernels: each channel's sum over
    the positions (vectorised over the channels), then each group's over its
    channels; two passes, mean then variance about it. Keras' reduction over
    the grouped (positions, channels of the group) axes took 3.7x as long on
    a 512x512x128 map (SD's VAE decode has thirteen such: 550 against 150
    ms each) and rounded further from float64 (3.5e-3 against 7e-5)."""
    channels = x.shape[-1]
    if (layer.axis not in (-1, len(x.shape) - 1) or not (layer.scale and layer.center)
            or channels is None):
        return NotImplemented
    groups, size = layer.groups, channels // layer.groups
    shape = tf.shape(x)
    flat = tf.reshape(tf.cast(x, tf.float32), (shape[0], -1, channels))
    count = tf.cast(tf.shape(flat)[1] * size, tf.float32)

    def group_means(sums):  # (N, C) -> (N, 1, C): each channel its group's sum / count
        totals = tf.reduce_sum(tf.reshape(sums, (-1, groups, 1, size)), axis=3, keepdims=True)
        return tf.reshape(tf.broadcast_to(totals, (shape[0], groups, 1, size)),
                          (-1, 1, channels)) / count

    mean = group_means(tf.reduce_sum(flat, axis=1))
    variance = group_means(tf.reduce_sum(tf.math.squared_difference(flat, mean), axis=1))
    scale = tf.math.rsqrt(variance + layer.epsilon) * tf.cast(layer.gamma.value, tf.float32)
    shift = tf.cast(layer.beta.value, tf.float32) - mean * scale
    return tf.cast(tf.reshape(flat * scale + shift, shape), layer.compute_dtype)


@contextlib.contextmanager
def variables_made_after():
    """The variables created in the block are made when it ends, outside
    their layers' name scopes. The op that makes a variable's handle takes
    the variable's scoped name as an attribute, and TensorFlow builds and
    caches a kernel for each new set of attributes: under the layers'
    scopes every name is new, at 0.5-0.6 ms a kernel (0.7 s of SD 1.5's
    1,134 variables, 2-core Xeon); outside them the names repeat (`kernel`,
    `bias`) and so do the kernels. Keras defers a variable created in a
    `StatelessScope` and makes it as the scope closes, in the order they
    were created; if the block raises, its variables are dropped unmade."""
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables", [],
                                                set_to_default=True)
    start = len(pending)
    with keras.StatelessScope():
        try:
            yield
        except BaseException:
            del pending[start:]
            raise


def initial_value(array):
    """A host array as a tensor on the same memory, through DLPack
    (bfloat16, which DLPack does not carry from NumPy, as its bits). From
    NumPy, TensorFlow copies it twice before the variable's own copy: 3 of
    a 9 s load of SD 1.5."""
    if array.dtype.name == "bfloat16":
        bits = tf.experimental.dlpack.from_dlpack(array.view(np.uint16).__dlpack__())
        return tf.bitcast(bits, tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def accelerator():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    return tuple(capability) if capability else "gpu"  # ROCm reports none


@contextlib.contextmanager
def data_parallel():
    """`tf.distribute.MirroredStrategy` over the local GPUs (else the CPUs),
    or `MultiWorkerMirroredStrategy` when `TF_CONFIG` names several hosts."""
    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    with strategy.scope():
        yield strategy.num_replicas_in_sync
