"""Everything that differs between TensorFlow, JAX and PyTorch, one small
module per backend (the way Keras keeps `keras/src/backend/<name>/`).

Each module exposes `train_step`, `test_step` and `compile_function`, and
may prepare a model for `fit` (`before_fit`). The steps train any model
(`DiffusionModel`, `Autoencoder`) that offers four backend-agnostic methods:

- `unpack_batch(data)`: the tensors of one batch, as a tuple;
- `compute_losses(batch, training)`: a dict of scalar losses, whose
  `"loss"` is the one minimised (the others are logged);
- `after_train_step()`: what follows an optimizer step (the EMA update);
- `update_metrics(losses)`: update the metrics, return the logs;

plus a `seed_generator` for the noise drawn in the loss. A module may also
provide faster kernels for the network's layers:

- `group_normalization(layer, x)` and `conv2d(layer, x)`: the layer's
  function on the backend's fused kernel, or `NotImplemented` where the
  layer's settings fall outside what the kernel covers;
- `attention(q, k, v)`: softmax(q k^T / sqrt(d)) v for `(B, N, heads, d)`;

and what export, distribution and the choice of precision need to know:
`endpoint_options`, `TRACES_SAVED_MODELS`, `onnx_export_context`,
`data_parallel`, `accelerator` and `CPU_BFLOAT16_PAYS`; and how a checkpoint's
array becomes a variable's value without a copy (`initial_value`, and
`STRIDED_VARIABLES` where that value may be a transposed view).

The functions here pick the current backend's version or fall back to the
generic `keras.ops` one. No other module branches on the backend.
"""

import contextlib
import functools
import importlib

import keras
from keras import ops

BACKENDS = ("tensorflow", "jax", "torch")


def current():
    """The module of the running Keras backend."""
    return _module(keras.backend.backend())


@functools.cache
def _module(name):
    if name not in BACKENDS:
        raise ValueError(
            f"keras_diffusion supports the tensorflow, jax and torch backends; "
            f"KERAS_BACKEND is {name!r}."
        )
    return importlib.import_module(f"keras_diffusion.backend.{name}")


def group_normalization(layer, x):
    """`layer(x)` for a `GroupNormalization` layer on a fused kernel, or
    `NotImplemented` (the caller then runs Keras' own)."""
    kernel = getattr(current(), "group_normalization", None)
    return NotImplemented if kernel is None else kernel(layer, x)


def dense(layer, x):
    """`layer(x)` for a `Dense` layer on a faster path, or `NotImplemented`."""
    kernel = getattr(current(), "dense", None)
    return NotImplemented if kernel is None else kernel(layer, x)


def conv2d(layer, x):
    """`layer(x)` for a `Conv2D` layer on a faster path, or `NotImplemented`."""
    kernel = getattr(current(), "conv2d", None)
    return NotImplemented if kernel is None else kernel(layer, x)


def attention(q, k, v, is_causal=False):
    """softmax(q k^T / sqrt(d)) v over `(B, N, heads, d)` tensors, each query
    attending only to keys at or before it with `is_causal`: the backend's
    own version, else `keras.ops.dot_product_attention`, which uses each
    backend's fused kernel and computes the softmax in float32."""
    kernel = getattr(current(), "attention", None)
    if kernel is None:
        return ops.dot_product_attention(q, k, v, is_causal=is_causal)
    return kernel(q, k, v, is_causal=is_causal)


def before_fit(model):
    """Whatever the backend needs done before `model.fit` starts."""
    prepare = getattr(current(), "before_fit", None)
    if prepare is not None:
        prepare(model)


# ------------------------------------------------------- export, distribution
def traces_saved_models():
    """Whether `keras.export.ExportArchive` can trace the sampling endpoints
    into a SavedModel under this backend (PyTorch cannot)."""
    return getattr(current(), "TRACES_SAVED_MODELS", True)


def onnx_traces_layer_normalization():
    """Whether Keras' ONNX export traces `LayerNormalization` with a free
    batch size under this backend (`torch.onnx` cannot)."""
    return getattr(current(), "ONNX_TRACES_LAYER_NORMALIZATION", True)


def endpoint_options(signature):
    """Extra keyword arguments of `ExportArchive.add_endpoint` for an
    endpoint of this input signature."""
    options = getattr(current(), "endpoint_options", None)
    return {} if options is None else options(signature)


def onnx_export_context():
    """A context to run Keras' ONNX export in (silencing the backend's
    expected tracing warnings)."""
    context = getattr(current(), "onnx_export_context", None)
    return contextlib.nullcontext() if context is None else context()


def initial_value(array):
    """A new variable's value from a host array (a checkpoint's weight,
    freshly copied into Keras' layout), as the backend's tensor where that
    spares Keras a copy: JAX on the CPU takes a 64-byte-aligned array as is
    (Keras would copy it through a compiled identity, one per shape), and a
    PyTorch tensor can share a NumPy array's memory, strided or not
    (`strided_variables`). The array must not be written afterwards; a
    read-only one, or a strided one elsewhere, is left to Keras' copy."""
    make = getattr(current(), "initial_value", None)
    if make is None or not array.flags.writeable:
        return array
    if not (array.flags.c_contiguous or strided_variables()):
        return array
    return make(array)


def variables_made_after():
    """A context manager in which the variables created are made when it
    ends, where the backend makes them faster so (TensorFlow's, outside
    their layers' name scopes); elsewhere it changes nothing."""
    context = getattr(current(), "variables_made_after", None)
    return contextlib.nullcontext() if context is None else context()


def strided_variables():
    """Whether a variable's value may be a strided view of host memory
    (a transposed checkpoint weight, `weights.keras_view`): PyTorch's may,
    and its kernels take such views as they are; JAX's and TensorFlow's
    arrays are dense."""
    return getattr(current(), "STRIDED_VARIABLES", False)


def data_parallel():
    """A context manager that makes `fit` split each batch over the local
    devices, yielding their number; None where Keras cannot (PyTorch)."""
    return getattr(current(), "data_parallel", None)


def fully_sharded():
    """A context manager that shards the weights made in it over the
    devices, and `fit`'s batches over the same devices, yielding their
    number; None where Keras cannot (TensorFlow, PyTorch)."""
    return getattr(current(), "fully_sharded", None)


# The first CUDA generations with native arithmetic: Ampere for bfloat16,
# Volta (tensor cores) for float16.
_CUDA_CAPABILITY = {"bfloat16": (8, 0), "float16": (7, 0)}


def cpu_bfloat16_pays():
    """Whether this backend trains faster in bfloat16 on a CPU with native
    bfloat16 (oneDNN on AMX does; XLA:CPU does not)."""
    return getattr(current(), "CPU_BFLOAT16_PAYS", True)


def accelerator_supports(dtype):
    """Whether the backend's accelerator computes `dtype` ("bfloat16",
    "float16") natively; None where the backend runs on the CPU.

    The backend modules' `accelerator()` says what they run on: None (the
    CPU), "tpu", a CUDA GPU's compute capability `(major, minor)`, or "gpu"
    for one without (ROCm), taken to be recent."""
    device = current().accelerator()
    if device is None:
        return None
    if device == "tpu":
        return dtype == "bfloat16"
    return device == "gpu" or tuple(device) >= _CUDA_CAPABILITY[dtype]
