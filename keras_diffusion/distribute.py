"""Training over several devices on the engines Keras has: JAX and TensorFlow.

`distribution_scope(name)` wraps model creation, `compile`, `fit`, sampling
and saving. With `"data_parallel"` every device holds a copy of the weights
and takes an equal share of each batch; the gradients are averaged over the
whole batch. With `"fsdp"` (JAX) the batch is split the same way and the
weights are sharded over the same devices, each holding about 1/n of every
large kernel (`backend.jax.FullyShardedDataParallel`): what lets a model
larger than one device's memory train and sample at all.

- JAX: `keras.distribution.DataParallel` over every device JAX sees. With
  `KERAS_DISTRIBUTION_JOB_ADDRESSES` / `KERAS_DISTRIBUTION_NUM_PROCESSES` /
  `KERAS_DISTRIBUTION_PROCESS_ID` set (several hosts), it first calls
  `keras.distribution.initialize()`, which reads them.
- TensorFlow: `tf.distribute.MirroredStrategy` over the local GPUs (the
  logical CPU devices when there is no GPU); with `TF_CONFIG` set (several
  hosts), `tf.distribute.MultiWorkerMirroredStrategy`.
- PyTorch: Keras 3 does not distribute `fit` there; a clear error says so.

`"fsdp"` runs on JAX only (Keras' `ModelParallel`); TensorFlow and PyTorch
get one line saying what they support.
"""

import contextlib

import keras

from keras_diffusion import backend
from keras_diffusion.config import ConfigError

DISTRIBUTE_OPTIONS = ("data_parallel", "fsdp")
_SUPPORT = {
    "tensorflow": "TensorFlow runs data_parallel (tf.distribute.MirroredStrategy), which keeps "
                  "a whole copy of the weights on every device",
    "torch": "Keras 3 distributes nothing on PyTorch",
}


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
    if distribute == "fsdp":
        fully_sharded = backend.fully_sharded()
        if fully_sharded is None:
            name = keras.backend.backend()
            raise ConfigError(
                f"distribute=fsdp (weights sharded over the devices) runs on JAX only, through "
                f"keras.distribution.ModelParallel; {_SUPPORT.get(name, name)}: use --backend "
                "jax, or distribute=data_parallel, or null for one device"
            )
        with fully_sharded() as devices:
            yield devices
        return
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
