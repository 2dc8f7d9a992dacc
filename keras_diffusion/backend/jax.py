"""JAX: steps are pure functions of the state Keras passes in; the shared
objective runs inside a `StatelessScope` that maps each variable to its
value in that state, and the new values are read back out of the scope.
Also the attention the network uses under JAX."""

import contextlib
import math
import os

import jax
import keras
from keras import StatelessScope
from keras import ops


def _read(scope, variables, old_values):
    new_values = []
    for variable, old in zip(variables, old_values):
        value = scope.get_current_value(variable)
        new_values.append(old if value is None else value)
    return new_values


def _mapping(model, trainable, non_trainable, other_variables, other_values):
    """Variable -> value pairs of a `StatelessScope`: the model's weights and
    one more group of state (the optimizer's, or the metrics')."""
    return (
        list(zip(model.trainable_variables, trainable))
        + list(zip(model.non_trainable_variables, non_trainable))
        + list(zip(other_variables, other_values))
    )


def train_step(model, state, data):
    trainable, non_trainable, optimizer_state, metrics_state = state
    batch = model.unpack_batch(data)
    optimizer = model.optimizer

    def loss_fn(trainable, non_trainable):
        mapping = _mapping(model, trainable, non_trainable, optimizer.variables, optimizer_state)
        with StatelessScope(state_mapping=mapping) as scope:
            losses = model.compute_losses(batch, training=True)
            scaled_loss = optimizer.scale_loss(losses["loss"])
        return scaled_loss, (losses, _read(scope, model.non_trainable_variables, non_trainable))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (losses, non_trainable)), grads = grad_fn(trainable, non_trainable)
    trainable, optimizer_state = optimizer.stateless_apply(optimizer_state, grads, trainable)

    mapping = _mapping(model, trainable, non_trainable, model.metrics_variables, metrics_state)
    with StatelessScope(state_mapping=mapping) as scope:
        model.after_train_step()
        logs = model.update_metrics(losses)
    non_trainable = _read(scope, model.non_trainable_variables, non_trainable)
    metrics_state = _read(scope, model.metrics_variables, metrics_state)
    return logs, (trainable, non_trainable, optimizer_state, metrics_state)


def test_step(model, state, data):
    trainable, non_trainable, metrics_state = state
    batch = model.unpack_batch(data)
    mapping = _mapping(model, trainable, non_trainable, model.metrics_variables, metrics_state)
    with StatelessScope(state_mapping=mapping) as scope:
        logs = model.update_metrics(model.compute_losses(batch, training=False))
    non_trainable = _read(scope, model.non_trainable_variables, non_trainable)
    metrics_state = _read(scope, model.metrics_variables, metrics_state)
    return logs, (trainable, non_trainable, metrics_state)


def initial_value(array):
    """A host array as a JAX array: on the CPU the same memory when it is
    64-byte aligned (`weights.keras_array`'s are), elsewhere a transfer.
    `jnp.asarray`, Keras' way in, would stage it through a compiled copy."""
    return jax.device_put(array)


def compile_function(fn):
    return jax.jit(fn)


# Attention with at least this many query x key pairs runs one (batch, head)
# pair and one block of queries at a time (`_blocked_attention`): at SD
# 1.5's 64x64 latents blocks of 1,024 queries took 0.33 s an attention,
# 512 0.35, 256 0.39, 128 0.43 (2-core Xeon).
_BLOCKED_PAIRS = 1024 * 1024
_QUERY_BLOCK = 1024


def dense(layer, x):
    """A half-precision `Dense` accumulated in float32, its bias added before
    the one rounding to half, as PyTorch's `addmm` (Keras rounds the product
    and then the sum: a bfloat16 CLIP text encoder drifted 1.6x as far from
    float32). float16 products go through float32: XLA's CPU backend has no
    float16 x float16 -> float32 product."""
    import jax.numpy as jnp

    if x.dtype not in (jnp.bfloat16, jnp.float16) or layer.lora_enabled or \
            layer.quantization_mode:
        return NotImplemented
    kernel = layer.kernel.value
    if x.dtype == jnp.float16:
        y = jnp.matmul(x.astype("float32"), kernel.astype("float32"))
    else:
        y = jnp.matmul(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return _rounded_once(layer, y, x.dtype)


def _rounded_once(layer, y, dtype):
    """A layer's float32 product `y` with its bias added, then rounded to
    the half-precision `dtype` once, then its activation."""
    if layer.use_bias:
        y = y + layer.bias.value.astype("float32")
    y = y.astype(dtype)
    return layer.activation(y) if layer.activation is not None else y


def attention(q, k, v, is_causal=False):
    """softmax(q k^T / sqrt(d)) v with `(B, N, heads, d)` tensors. It ran
    faster than `ops.dot_product_attention` on CPU, and that op asks for
    float16 x float16 -> float32 products, which XLA's CPU backend lacks.
    Logits and softmax are computed in float32. XLA:CPU has no fused
    attention: large ones (Stable Diffusion's 4096 latent positions) go
    through `_blocked_attention`. `is_causal` masks the keys after each
    query (CLIP's text attention: short sequences, never blocked)."""
    if not is_causal and q.shape[1] is not None and k.shape[1] is not None and \
            q.shape[1] * k.shape[1] >= _BLOCKED_PAIRS:
        return _blocked_attention(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = ops.einsum("bqhd,bkhd->bhqk", ops.cast(q, "float32"), ops.cast(k, "float32"))
    if is_causal:
        queries, keys = ops.shape(q)[1], ops.shape(k)[1]
        later = ops.arange(keys)[None, :] > ops.arange(queries)[:, None]
        logits = ops.where(later, float("-inf"), logits)
    # Weighted in float32 and rounded once, as fused kernels (PyTorch's
    # flash attention) do: half-precision weights cost an image 2x the error.
    weights = ops.softmax(logits * scale, axis=-1)
    return ops.cast(ops.einsum("bhqk,bkhd->bqhd", weights, ops.cast(v, "float32")), v.dtype)


def _blocked_attention(q, k, v):
    """The same function, one (batch, head) pair at a time and, for long
    sequences, `_QUERY_BLOCK` queries at a time, so each score matrix is a
    cache-sized 2-D product instead of one `(B, heads, N, M)` tensor (1 GiB
    at SD 1.5's 64x64 latents). At that size it took 0.58 s against 2.1 s
    per attention on a 2-core Xeon (`benchmarks/sd_profile.py` has the step)."""
    import jax.numpy as jnp

    _, n, heads, depth = q.shape
    scale = 1.0 / math.sqrt(depth)

    def heads_first(x):  # (B, N, heads, d) -> (B * heads, N, d)
        return jnp.reshape(jnp.transpose(x, (0, 2, 1, 3)), (-1, x.shape[1], x.shape[3]))

    block = _QUERY_BLOCK if n % _QUERY_BLOCK == 0 and n > 2 * _QUERY_BLOCK else n

    def one_head(args):
        queries, keys, values = args

        def one_block(block_queries):
            weights = jax.nn.softmax(block_queries @ keys.T, axis=-1)
            return (weights @ values.astype("float32")).astype(values.dtype)

        out = jax.lax.map(one_block, jnp.reshape(queries, (n // block, block, depth)))
        return jnp.reshape(out, (n, -1))

    out = jax.lax.map(one_head, (heads_first(q).astype("float32") * scale,
                                 heads_first(k).astype("float32"), heads_first(v)))
    return jnp.transpose(jnp.reshape(out, (-1, heads, n, out.shape[-1])), (0, 2, 1, 3))


def endpoint_options(signature):
    """Name every free dimension `batch`, so that inputs such as `noise`
    (B, ...) and `step_noise` (steps, B, ...) share one batch size, and leave
    gradients out: serving needs none, and `denoise`'s loop, whose length is
    an input, has no reverse-mode derivative in JAX."""
    shapes = [
        "(" + ", ".join("batch" if d is None else str(d) for d in spec.shape) + ")"
        for spec in signature
    ]
    return {"jax2tf_kwargs": {"polymorphic_shapes": shapes, "with_gradient": False}}


_MULTI_HOST = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES")


# XLA:CPU gains nothing from bfloat16 even on AMX (15.6 against 15.0 training
# images/s, and a longer first compile; docs/performance.md), so precision
# "auto" keeps float32 on JAX without an accelerator.
CPU_BFLOAT16_PAYS = False


def accelerator():
    device = jax.devices()[0]
    if device.platform in ("cpu", "tpu"):
        return None if device.platform == "cpu" else "tpu"
    capability = getattr(device, "compute_capability", None)  # "9.0" on CUDA, absent on ROCm
    return tuple(map(int, capability.split("."))) if capability else "gpu"


@contextlib.contextmanager
def _distributed(make):
    """Keras' distribution `make()` set for the block (every host's devices
    when Keras' multi-host variables are set); yields the device count."""
    if any(os.environ.get(name) for name in _MULTI_HOST):
        if not getattr(jax.distributed, "is_initialized", lambda: False)():
            keras.distribution.initialize()
    previous = keras.distribution.distribution()
    distribution = make()
    keras.distribution.set_distribution(distribution)
    try:
        yield len(distribution.device_mesh.devices.reshape(-1))
    finally:
        keras.distribution.set_distribution(previous)


def data_parallel():
    """`keras.distribution.DataParallel` over every device."""
    return _distributed(keras.distribution.DataParallel)


class FullyShardedDataParallel(keras.distribution.ModelParallel):
    """Weights sharded over the same devices the batch is split over (as
    PyTorch's FSDP and MaxDiffusion's `fsdp` axis): one mesh axis, `batch`;
    each variable of two or more dimensions is split along its last
    dimension (a kernel's outputs) where the device count divides it, else
    along its largest dimension it divides, else kept whole on every device,
    as are biases and norms. XLA gathers a layer's weights where it needs
    them. The rule reads the variable's shape, so it holds for any model
    (a `LayoutMap` from paths cannot: which dimension divides depends on the
    configuration)."""

    def __init__(self, devices=None):
        devices = devices or keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
        super().__init__(layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch")

    def get_variable_layout(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        return keras.distribution.TensorLayout(
            shard_spec(variable.shape, self.device_mesh.shape[0]), self.device_mesh)


def shard_spec(shape, devices):
    """The axes `FullyShardedDataParallel` splits a variable of `shape` by:
    `batch` at the one dimension split, None elsewhere."""
    shape = tuple(int(d) for d in shape)
    spec = [None] * len(shape)
    if len(shape) < 2 or devices < 2:
        return spec
    order = [len(shape) - 1] + sorted(range(len(shape) - 1), key=lambda axis: -shape[axis])
    for axis in order:
        if shape[axis] % devices == 0:
            spec[axis] = "batch"
            break
    return spec


def fully_sharded():
    """`FullyShardedDataParallel` over every device."""
    return _distributed(FullyShardedDataParallel)


# A bfloat16 3x3 or 1x1 convolution over at most this many positions (SD
# 1.5's 64x64 latents) runs as one product per tap (`conv2d`).
_TAP_PRODUCT_POSITIONS = 64 * 64


def conv2d(layer, x):
    """A bfloat16 3x3 convolution (stride 1, "same") on CPU as nine
    products, one per tap, and a 1x1 one as one product, summed in float32
    with the bias before the one rounding (PyTorch's order). XLA's CPU
    convolution converts bfloat16 to float32 and back around its product:
    alone, at 16x16 with 1,280 channels, it took 70 ms against 41 in
    float32 and 43 for the nine products (2-core AMD EPYC Zen 5). A guided
    SD 1.5 UNet step in bfloat16 took 7.2 s with XLA's convolutions, 4.5
    with the products up to 64x64 maps, 5.4 in float32, measured in turn in
    one process. The VAE's larger maps (256x256 and up, where the
    convolution is quicker) keep it."""
    import jax.numpy as jnp

    size = tuple(layer.kernel_size)
    if (x.dtype != jnp.bfloat16 or jax.default_backend() != "cpu" or layer.lora_enabled
            or size not in ((3, 3), (1, 1)) or tuple(layer.strides) != (1, 1)
            or (layer.padding != "same" and size != (1, 1))
            or max(layer.dilation_rate) != 1 or layer.groups != 1
            or layer.data_format != "channels_last" or getattr(layer, "quantization_mode", None)
            or None in x.shape[1:3] or x.shape[1] * x.shape[2] > _TAP_PRODUCT_POSITIONS):
        return NotImplemented
    kernel = layer.kernel.value.astype(x.dtype)
    height, width = x.shape[1:3]
    edge = size[0] // 2
    padded = jnp.pad(x, ((0, 0), (edge, edge), (edge, edge), (0, 0)))
    y = None
    for row in range(size[0]):
        for column in range(size[1]):
            tap = jnp.matmul(padded[:, row:row + height, column:column + width], kernel[row, column],
                             preferred_element_type=jnp.float32)
            y = tap if y is None else y + tap
    return _rounded_once(layer, y, x.dtype)
