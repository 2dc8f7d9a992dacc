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

import keras

from keras_diffusion import backend
from keras_diffusion.config import ConfigError

DISTRIBUTE_OPTIONS = ("data_parallel",)


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
    data_parallel = backend.data_parallel()
    if data_parallel is None:
        raise ConfigError(
            f"distribute=data_parallel is not available on the {keras.backend.backend()} "
            "backend: Keras 3 distributes fit() only on JAX (keras.distribution.DataParallel) "
            "and TensorFlow (tf.distribute.MirroredStrategy); use --backend jax or --backend "
            "tensorflow, or set distribute to null to train on one device"
        )
    with data_parallel() as replicas:
        yield replicas
