"""Backend-specific training steps and compilation, one small file per backend
(the way Keras isolates `keras/src/backend/<name>/trainer.py`). Each file
exposes `train_step`, `test_step` and `compile_function`; all of them call the
one backend-agnostic objective, `DiffusionModel.compute_diffusion_loss`."""

import importlib

import keras


def backend_module():
    name = keras.backend.backend()
    if name not in ("tensorflow", "jax", "torch"):
        raise ValueError(
            f"keras_diffusion supports the tensorflow, jax and torch backends; "
            f"KERAS_BACKEND is {name!r}."
        )
    return importlib.import_module(f"keras_diffusion.trainers.{name}_trainer")
