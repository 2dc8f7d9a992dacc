"""`load_model`: one entry point for every model the library runs, and the
one place that knows which room reads what.

A `.keras` file, a preset, an `hf://` repository of one or an unzipped model
folder is a `DiffusionModel` (`keras_diffusion.model.load_keras_model`); a
checkpoint in another library's layout (a diffusers folder, a single
`.safetensors` / `.ckpt` file) is read by the checkpoint families
(`keras_diffusion.stable_diffusion.loader`), which name the family they
find or refuse it in one line. The core modules below import no family: the
dispatch lives here, above both.
"""

import os

from keras_diffusion import hub
from keras_diffusion import precision as precisions
from keras_diffusion.model import load_keras_model

# File suffixes of checkpoints in other libraries' layouts.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def is_checkpoint(path):
    """Whether `path` (local) is a checkpoint in another library's layout:
    a file with a checkpoint suffix, or a folder that is not an unzipped
    Keras model (no `config.json` at its top)."""
    if os.path.isfile(path):
        return path.lower().endswith(CHECKPOINT_SUFFIXES)
    return os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))


def load_model(source, precision=None, config=None, dtype=None):
    """Load a trained `DiffusionModel`, on any backend, from `source`:

    - a `.keras` file written by `model.save` or `keras-diffusion train`;
    - the name of a preset shipped with the package (`keras-diffusion
      presets` lists them), e.g. "mnist_conditional";
    - `hf://OWNER/NAME`, a Hugging Face Hub repository written by
      `keras-diffusion push` (needs `huggingface_hub`; cached after the
      first download);
    - a folder holding an unzipped Keras model (what a Hub repository is);
    - a Stable Diffusion 1.x / 2.x checkpoint: a diffusers pipeline folder
      (`model_index.json`), an `hf://` repository holding one, or one
      original-layout file (`.safetensors`; `.ckpt` only where it can be
      read without running code), which `config` (a diffusers folder of
      the same model, weights not needed) describes; None takes the
      shipped configuration of the file's family (SD 1.5, SD 2.1, SDXL
      base 1.0 or SDXL refiner 1.0).

    The network computes in the global dtype policy (float32 unless set),
    whatever precision it was trained in: its weights are float32 either
    way. `precision` ("auto", "float32", "mixed_bfloat16",
    "mixed_float16") sets the policy for this model instead; "auto" is
    `mixed_bfloat16` on an accelerator with native bfloat16 and float32
    elsewhere (`keras_diffusion.precision.resolve`).

    `dtype` ("float32", "bfloat16", "float16"; None is float32) keeps a
    Stable Diffusion checkpoint's weights in that dtype: half the memory,
    and on hardware with native half precision faster steps. A float16
    model's VAE stays float32 where its config says `force_upcast` (SD's
    does), as diffusers decodes; diffusers' `fp16` weight files are read
    where a folder has them. A `.keras` file keeps the dtype it was saved
    in; `dtype` is for checkpoints.

    Raises `FileNotFoundError` for a missing file, `OSError` when the Hub
    cannot be reached, and `ValueError` for a file that is not a readable
    Keras archive, holds another kind of model, or for an unknown
    `precision`.
    """
    if precision is not None:
        precisions.check_precision(precision)
    path = os.fspath(source)
    if hub.is_hub_path(path):
        path = hub.download(path)
    if is_checkpoint(path):
        # Not a Keras model: a checkpoint family's, or a clear error.
        from keras_diffusion.stable_diffusion import loader

        policy = None if precision is None else precisions.resolve(precision, sampling=True)
        if dtype not in (None, "float32") and precision not in (None, "auto", "float32"):
            raise ValueError(f"dtype={dtype!r} keeps the weights in half precision, and "
                             f"precision={precision!r} asks for float32 weights with half "
                             "computation: give one of them.")
        with precisions.policy_scope(policy):
            return loader.load(path, config=config, dtype=dtype)
    if dtype is not None:
        raise ValueError(f"dtype is for Stable Diffusion checkpoints; {os.fspath(source)} is a "
                         "Keras model, which keeps the dtype it was saved in (precision= sets "
                         "how it computes).")
    return load_keras_model(path, precision)
