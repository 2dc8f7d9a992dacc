"""Data-parallel training on the engines Keras has: JAX and TensorFlow.

`distribution_scope("data_parallel")` wraps model creation, `compile`, `fit`
and saving. Every device holds a copy of the weights and takes an equal
share of each batch; the gradients are averaged over the whole batch.

- JAX: `keras.distribution.DataParallel` over every device JAX sees. With
  `KERAS_DISTRIBUTION_JOB_ADDRESSES` / `KERAS_DISTRIBUTION_NUM_PROCESSES` /
  `KERAS_DISTRIBUTION_PROCESS_ID` set (several hosts), it first calls
  `keras.distribution.initialize()`, which reads them.
- TensorFlow: `tf.distribute.MirroredStrategy` over the local GPUs (the
  logical CPU devices when there is no GPU); with `TF_CONFIG` set (several
  hosts), `tf.distribute.MultiWorkerMirroredStrategy`.
- PyTorch: Keras 3 does not distribute `fit` there; a clear error says so.
"""

import contextlib
import os

import keras

from keras_diffusion.config import ConfigError

DISTRIBUTE_OPTIONS = ("data_parallel",)
_MULTI_HOST_JAX = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES")


@contextlib.contextmanager
def distribution_scope(distribute):
    """Enter the distribution `distribute` names (None: one device) and yield
    the number of devices that share each batch.

    Raises:
        ConfigError: for an unknown name, or `"data_parallel"` on a backend
            Keras cannot distribute (PyTorch).
    """
    if distribute is None:
        yield 1
        return
    if distribute not in DISTRIBUTE_OPTIONS:
        raise ConfigError(
            f"distribute must be one of {', '.join(DISTRIBUTE_OPTIONS)} or null; got {distribute!r}"
        )
    backend = keras.backend.backend()
    if backend == "jax":
        with _jax_data_parallel() as replicas:
            yield replicas
    elif backend == "tensorflow":
        strategy = _tf_strategy()
        with strategy.scope():
            yield strategy.num_replicas_in_sync
    else:
        raise ConfigError(
            f"distribute=data_parallel is not available on the {backend} backend: Keras 3 "
            "distributes fit() only on JAX (keras.distribution.DataParallel) and TensorFlow "
            "(tf.distribute.MirroredStrategy); use --backend jax or --backend tensorflow, or set "
            "distribute to null to train on one device"
        )


@contextlib.contextmanager
def _jax_data_parallel():
    if any(os.environ.get(name) for name in _MULTI_HOST_JAX):
        import jax

        if not getattr(jax.distributed, "is_initialized", lambda: False)():
            keras.distribution.initialize()
    previous = keras.distribution.distribution()
    distribution = keras.distribution.DataParallel()
    keras.distribution.set_distribution(distribution)
    try:
        yield len(distribution.device_mesh.devices.reshape(-1))
    finally:
        keras.distribution.set_distribution(previous)


def _tf_strategy():
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])
