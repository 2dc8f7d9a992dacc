"""keras_diffusion: denoising diffusion models for Keras 3 on TensorFlow, JAX and PyTorch.

Importing the package imports its modules, which registers its classes with
Keras so that `keras.saving.load_model` can rebuild them. The one exception is
the `keras-diffusion` command: there the modules load on first use, after its
`--backend` flag has set `KERAS_BACKEND` (Keras reads it once, on import).
"""

import importlib
import importlib.metadata
import os
import sys

__version__ = "0.1.0"

# TensorFlow runs its CPU convolutions and matrix products on oneDNN only on
# CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX; on the others (AVX2
# only, as an AMD EPYC Zen 3) it falls back to its Eigen kernels, where this
# library's reference UNet trained 1.4x slower (docs/performance.md).
# So oneDNN is on unless the user says otherwise. TensorFlow reads this once,
# while its library loads: set before any import of it (`import keras` under
# TensorFlow is one), it decides; set after, it changes nothing, and the import
# below warns.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _version(distribution):
    """(major, minor) of an installed distribution, or None."""
    try:
        parts = importlib.metadata.version(distribution).split(".")
        return int(parts[0]), int(parts[1])
    except (importlib.metadata.PackageNotFoundError, IndexError, ValueError):
        return None


def _with_xla_flag(flags, name, value):
    """`flags` (the XLA_FLAGS variable) with `--name=value` added, unless
    they set `name` already: the user's choice wins."""
    if name in flags:
        return flags
    return f"{flags} --{name}={value}".strip()


# XLA's CPU settings this library chooses, unless the user chooses already.
_XLA_CPU_FLAGS = (
    # jaxlib 0.10's XLA hands CPU convolutions to YNNPACK, which runs those of
    # this library's UNets (64 channels in or out) on one core. Eigen runs them
    # on every core: the reference UNet trained 1.35x faster under JAX on 2
    # cores (docs/performance.md).
    ("xla_cpu_experimental_ynn_fusion_type", "-individual_convolution"),
    # With several CPU devices (the command's device per core, `distribute:
    # fsdp` on virtual devices), a collective waits for every device's thread;
    # XLA stops the process when one is 40 s late, which a step of a large
    # model on a busy 2-core machine can be. A late thread is slow, not lost.
    ("xla_cpu_collective_call_terminate_timeout_seconds", 3600),
)


def _xla_flags_for_cpus(flags, jaxlib, tensorflow):
    """`flags` (the XLA_FLAGS variable) with `_XLA_CPU_FLAGS` added, each
    unless the user sets it. XLA stops the process on a flag it does not
    know, and TensorFlow's XLA reads this variable too, so the flags go in
    only where both know them: jaxlib 0.10 (`jaxlib`, `tensorflow`: (major,
    minor) or None if not installed) and TensorFlow 2.21 or later."""
    if jaxlib != (0, 10) or (tensorflow is not None and tensorflow < (2, 21)):
        return flags
    for name, value in _XLA_CPU_FLAGS:
        flags = _with_xla_flag(flags, name, value)
    return flags


# Read by XLA when JAX starts its first device: set on import, before that.
# Unconditional, as the oneDNN switch above: PyTorch ignores it, and TensorFlow
# runs its CPU convolutions on oneDNN, not XLA (its training showed the same
# two speeds on the Zen 5 with the flag and without, docs/performance.md).
_flags = _xla_flags_for_cpus(
    os.environ.get("XLA_FLAGS", ""), _version("jaxlib"), _version("tensorflow"))
if _flags:
    os.environ["XLA_FLAGS"] = _flags
del _flags

_EXPORTS = {
    "DiffusionSchedule": "keras_diffusion.schedule",
    "FlowMatchSchedule": "keras_diffusion.schedule",
    "UNet": "keras_diffusion.network",
    "DiffusionModel": "keras_diffusion.model",
    "Autoencoder": "keras_diffusion.autoencoder",
    "LatentDiffusionModel": "keras_diffusion.latent",
    "StableDiffusion": "keras_diffusion.stable_diffusion.model",
    "StableDiffusionXL": "keras_diffusion.stable_diffusion.model",
    "StableDiffusion3": "keras_diffusion.stable_diffusion.sd3",
    "TextEncoder": "keras_diffusion.text",
    "WordTokenizer": "keras_diffusion.text",
    "class_captions": "keras_diffusion.captions",
    "read_metadata": "keras_diffusion.captions",
    "load_model": "keras_diffusion.loading",
    "train": "keras_diffusion.training",
    "build_model": "keras_diffusion.training",
    "load_config": "keras_diffusion.config",
    "sample": "keras_diffusion.samplers",
    "SAMPLERS": "keras_diffusion.samplers",
    "SampleGrid": "keras_diffusion.callbacks",
    "SampleQuality": "keras_diffusion.callbacks",
    "AtomicBackupAndRestore": "keras_diffusion.callbacks",
    "AtomicCSVLogger": "keras_diffusion.callbacks",
    "TerminateOnNonFiniteLoss": "keras_diffusion.callbacks",
    "ProgressLog": "keras_diffusion.callbacks",
    "NonFiniteLossError": "keras_diffusion.callbacks",
    "distribution_scope": "keras_diffusion.distribute",
    "load_dataset": "keras_diffusion.data",
    "load_image_folder": "keras_diffusion.data",
    "save_image_grid": "keras_diffusion.images",
    "DenoiseResult": "keras_diffusion.applications",
    "estimate_noise_std": "keras_diffusion.applications",
    "make_mask": "keras_diffusion.applications",
}

# Submodules reached as attributes: `kd.metrics.fid(...)`, `kd.pipeline.sample(...)`,
# `kd.precision.resolve("auto")`, `kd.presets.presets()`, `kd.hub.push(...)`.
_SUBMODULES = ("hub", "metrics", "pipeline", "precision", "presets")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_diffusion.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_diffusion' has no attribute {name!r}")


def __dir__():
    return __all__


def _started_as_cli():
    return (
        os.path.basename(sys.argv[0] if sys.argv else "") == "keras-diffusion"
        or "keras_diffusion.cli" in getattr(sys, "orig_argv", ())
    )


def _import_all():
    """Import every module, registering the classes `.keras` files name."""
    for name in (*_EXPORTS, *_SUBMODULES):
        __getattr__(name)


def _check_backend_name():
    # Keras' own message for a bad name does not say which names work.
    name = os.environ.get("KERAS_BACKEND")
    if name is not None and name not in ("tensorflow", "jax", "torch"):
        raise ValueError(
            f"KERAS_BACKEND is {name!r}; keras_diffusion runs on tensorflow, jax or torch."
        )


if not _started_as_cli():
    _check_backend_name()
    _import_all()
    # The running backend's check of what was loaded before this package
    # (TensorFlow's oneDNN switch), called at the top level so that a warning
    # names the line of the program's own `import keras_diffusion`.
    _backend = importlib.import_module("keras_diffusion.backend").current()
    if hasattr(_backend, "check_on_import"):
        _backend.check_on_import()
    del _backend
