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


def compile_function(fn):
    return jax.jit(fn)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with `(B, N, heads, d)` tensors. It ran
    faster than `ops.dot_product_attention` on CPU, and that op asks for
    float16 x float16 -> float32 products, which XLA's CPU backend lacks.
    Logits and softmax are computed in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = ops.einsum("bqhd,bkhd->bhqk", ops.cast(q, "float32"), ops.cast(k, "float32"))
    weights = ops.cast(ops.softmax(logits * scale, axis=-1), v.dtype)
    return ops.einsum("bhqk,bkhd->bqhd", weights, v)


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
def data_parallel():
    """`keras.distribution.DataParallel` over every device (of every host,
    when Keras' multi-host variables are set)."""
    if any(os.environ.get(name) for name in _MULTI_HOST):
        if not getattr(jax.distributed, "is_initialized", lambda: False)():
            keras.distribution.initialize()
    previous = keras.distribution.distribution()
    distribution = keras.distribution.DataParallel()
    keras.distribution.set_distribution(distribution)
    try:
        yield len(distribution.device_mesh.devices.reshape(-1))
    finally:
        keras.distribution.set_distribution(previous)
