"""keras_diffusion: denoising diffusion models for Keras 3 on TensorFlow, JAX and PyTorch.

Attributes load lazily, so `import keras_diffusion` does not import Keras:
the command line can choose `KERAS_BACKEND` before Keras reads it.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionSchedule": "keras_diffusion.schedule",
    "UNet": "keras_diffusion.network",
    "DiffusionModel": "keras_diffusion.model",
    "sample": "keras_diffusion.samplers",
    "SAMPLERS": "keras_diffusion.samplers",
    "SampleGrid": "keras_diffusion.callbacks",
    "load_dataset": "keras_diffusion.data",
    "load_image_folder": "keras_diffusion.data",
    "save_image_grid": "keras_diffusion.images",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_diffusion' has no attribute {name!r}")


def __dir__():
    return __all__
