"""Which precision to compute in, chosen so that it cannot backfire.

Half precision pays only where the hardware computes it natively: a GPU
from NVIDIA's Ampere generation on (bfloat16), a TPU, or a CPU with AMX or
AVX512-BF16 (Intel's Cooper Lake and Sapphire Rapids on; AMD's Zen 4 on).
Elsewhere every bfloat16 operation is emulated: on a 2-core AMD EPYC
(Zen 3, AVX2 only) `mixed_bfloat16` trained 5-12x slower than float32 on
TensorFlow and PyTorch (docs/performance.md).

`resolve("auto")` is `mixed_bfloat16` where bfloat16 is native and pays
(not on JAX's CPU backend) and `float32` elsewhere (for sampling, on CPUs
always `float32`). An explicit `mixed_bfloat16` or `mixed_float16` is
kept, with one warning per process where the hardware would emulate it.
"""

import contextlib
import functools
import warnings

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# The dtypes a Stable Diffusion checkpoint's weights may be kept in.
DTYPES = ("float32", "bfloat16", "float16")

# /proc/cpuinfo flags of native half-precision arithmetic.
_CPU_FLAGS = {
    "bfloat16": ("amx_bf16", "avx512_bf16"),
    "float16": ("amx_fp16", "avx512_fp16"),
}
_warned = set()


@contextlib.contextmanager
def policy_scope(policy):
    """Keras' global dtype policy set to `policy` (a policy name) inside the
    block and restored after it; None leaves the policy as it is."""
    import keras

    previous = keras.mixed_precision.dtype_policy()
    try:
        if policy is not None:
            keras.mixed_precision.set_dtype_policy(policy)
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}."
        )


@functools.cache
def _cpuinfo(field):
    """The first CPU's `field` in Linux's /proc/cpuinfo, or None where that
    file or field does not exist."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags():
    """The CPU's instruction-set flags, as Linux lists them in
    /proc/cpuinfo; empty where that file does not exist."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model():
    """The CPU's model name as `lscpu` prints it, or None off Linux."""
    return _cpuinfo("model name")


# The instruction sets that decide which precision and backend are fast.
_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
        ("amx_bf16", "AMX-BF16"))


def instruction_sets():
    """The CPU's instruction sets that matter here, e.g. "AVX2, AVX-512"."""
    flags = cpu_flags()
    return ", ".join(name for flag, name in _ISA if flag in flags) or "no AVX2"


def hardware():
    """One line naming the machine a figure was measured on: the CPU model,
    its instruction sets and core count, and the accelerator the Keras
    backend runs on, if any (which loads Keras)."""
    import os
    import platform

    from keras_diffusion import backend

    model = cpu_model() or f"{platform.processor() or platform.machine()} CPU"
    cpu = f"{model} ({instruction_sets()}), {os.cpu_count()} cores"
    device = backend.current().accelerator()
    if device is None:
        return cpu
    if device in ("tpu", "gpu"):
        return f"a {device.upper()} on {cpu}"
    return f"a CUDA GPU (compute capability {device[0]}.{device[1]}) on {cpu}"


def is_native(dtype):
    """Whether this machine computes `dtype` ("bfloat16" or "float16")
    natively: on the backend's accelerator if it has one, else on the CPU."""
    from keras_diffusion import backend  # Keras loads only when asked, for the CLI

    on_accelerator = backend.accelerator_supports(dtype)
    if on_accelerator is not None:
        return on_accelerator
    return any(flag in cpu_flags() for flag in _CPU_FLAGS[dtype])


def resolve(precision, *, sampling=False):
    """The Keras dtype policy name for `precision` (one of `PRECISIONS`).

    For training, "auto" is `mixed_bfloat16` wherever bfloat16 is native,
    except on JAX without an accelerator: XLA:CPU trains no faster in it.
    For sampling (`sampling=True`) it is so only on an accelerator. On a
    Xeon with AMX, bfloat16 sampled 2.1x as fast as float32 on TensorFlow,
    1.3x on PyTorch and 0.84x on JAX (docs/performance.md): not a gain on
    every backend, so "auto" keeps float32's samples there and an explicit
    `mixed_bfloat16` takes TensorFlow's speed."""
    from keras_diffusion import backend

    check_precision(precision)
    if precision == "auto":
        on_accelerator = backend.accelerator_supports("bfloat16")
        if on_accelerator is not None:
            native = on_accelerator
        else:  # a CPU
            native = not sampling and backend.cpu_bfloat16_pays() and is_native("bfloat16")
        return "mixed_bfloat16" if native else "float32"
    if precision != "float32":
        dtype = precision.removeprefix("mixed_")
        if not is_native(dtype) and precision not in _warned:
            _warned.add(precision)
            if backend.accelerator_supports(dtype) is None:
                where = f"no GPU, and a CPU without {' or '.join(f.upper() for f in _CPU_FLAGS[dtype])}"
            else:
                where = "a GPU from before NVIDIA's " + ("Ampere" if dtype == "bfloat16" else "Volta")
            warnings.warn(
                f"precision {precision}: this machine has no native {dtype} arithmetic "
                f"({where}), so {'sampling' if sampling else 'training'} will emulate it and "
                f"run several times slower than in float32; use precision auto or float32.",
                stacklevel=2,
            )
    return precision
