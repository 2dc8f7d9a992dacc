"""Which family reads a checkpoint: the one entry point above the families.

A diffusers folder is told by its `model_index.json` pipeline class, one
original-layout file by its keys (`single_file.detect_family`); SD 1.x /
2.x and SDXL are read by `checkpoints`, SD 3 / 3.5 by `sd3`. The families
import the shared readers in `checkpoints`; nothing below this module
imports it, so the arrows run one way.
"""

import contextlib
import gc
import os
from pathlib import Path

from keras_diffusion.stable_diffusion import checkpoints
from keras_diffusion.stable_diffusion import sd3
from keras_diffusion.stable_diffusion import single_file


def load_pipeline_folder(path, dtype=None):
    """A model from a diffusers pipeline folder, its weights in `dtype`
    (None: float32)."""
    dtype = checkpoints.check_dtype(dtype)
    index = checkpoints.read_json(Path(path) / "model_index.json")
    checkpoints.check_pipeline_class(index, path)
    if index.get("_class_name") in checkpoints.SD3_PIPELINES:
        return sd3.load_folder(Path(path), dtype=dtype)
    return checkpoints.load_pipeline_folder(path, dtype=dtype)


def load_single_file(path, config=None, dtype=None):
    """A model from one original-layout checkpoint file: Stable Diffusion
    1.x / 2.x, SDXL base or its refiner, SD 3 Medium, SD 3.5 Medium or
    Large. `config`: a diffusers folder (no weights needed) that describes
    it; None takes the shipped configuration of the file's family. An
    SD 3 file without its text encoders takes them from the folder's
    weights (`sd3.load_single_file`). `dtype`: the weights' dtype (None:
    float32)."""
    dtype = checkpoints.check_dtype(dtype)
    state, family, config = checkpoints.read_single_file(path, config)
    if "transformer" in single_file.FAMILIES[family]["parts"]:
        return sd3.load_single_file(state, family, config, dtype=dtype)
    return checkpoints.load_single_file(state, family, config, dtype=dtype)


def load(source, config=None, dtype=None):
    """A Stable Diffusion model from a diffusers folder or one file, its
    weights in `dtype` (None: float32)."""
    path = os.fspath(source)
    if checkpoints.is_pipeline_folder(path):
        with _collector_paused():
            return load_pipeline_folder(path, dtype=dtype)
    if checkpoints.is_single_file(path):
        with _collector_paused():
            return load_single_file(path, config=config, dtype=dtype)
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a folder without model_index.json: expected a diffusers pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an "
            "unzipped Keras model (config.json)."
        )
    raise FileNotFoundError(f"checkpoint not found: {path}")


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector paused while a model is built. Its layers
    make some 10^5 objects, which set off hundreds of collections that
    free nothing (the objects are all kept), each also running the
    backend's hooks (JAX's): 0.2-0.3 s of SD 1.5's 4 s load."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
