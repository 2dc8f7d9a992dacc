"""`precision: auto` picks bfloat16 only where the hardware computes it, and
an explicit half precision that would be emulated warns once."""

import warnings

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import SMOKE
from conftest import child_env
from conftest import one_level_model
from keras_diffusion import backend
from keras_diffusion import precision

XEON_AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_ZEN3 = frozenset({"avx2", "fma", "sse4_2"})


@pytest.fixture
def machine(monkeypatch):
    """Pretend to run on a machine: its CPU flags, its accelerator (None:
    none; True/False: one with or without native half precision), and
    whether the backend trains faster in bfloat16 on such a CPU."""
    monkeypatch.setattr(precision, "_warned", set())

    def pretend(flags, accelerator=None, cpu_bfloat16_pays=True):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(backend, "accelerator_supports", lambda dtype: accelerator)
        monkeypatch.setattr(backend, "cpu_bfloat16_pays", lambda: cpu_bfloat16_pays)

    return pretend


@pytest.mark.parametrize("flags, accelerator, pays, training, sampling", [
    (XEON_AMX, None, True, "mixed_bfloat16", "float32"),
    (frozenset({"avx512_bf16"}), None, True, "mixed_bfloat16", "float32"),
    (XEON_AMX, None, False, "float32", "float32"),  # JAX: XLA:CPU gains nothing
    (EPYC_ZEN3, None, True, "float32", "float32"),
    (EPYC_ZEN3, True, False, "mixed_bfloat16", "mixed_bfloat16"),  # an Ampere or newer GPU
    (XEON_AMX, False, True, "float32", "float32"),  # an older GPU decides, not the CPU
])
def test_auto_is_bfloat16_only_where_native(machine, flags, accelerator, pays, training, sampling):
    machine(flags, accelerator, pays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve("auto") == training
        assert precision.resolve("auto", sampling=True) == sampling
        assert precision.resolve("float32") == "float32"


def test_emulated_bfloat16_warns_once(machine):
    machine(EPYC_ZEN3)
    with pytest.warns(UserWarning, match=r"precision mixed_bfloat16: this machine has no native "
                                         r"bfloat16 arithmetic \(no GPU, and a CPU without "
                                         r"AMX_BF16 or AVX512_BF16\), so training will emulate it "
                                         r"and run several times slower than in float32; use "
                                         r"precision auto or float32"):
        assert precision.resolve("mixed_bfloat16") == "mixed_bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve("mixed_bfloat16", sampling=True) == "mixed_bfloat16"
    with pytest.warns(UserWarning, match="no native float16 arithmetic .* sampling will emulate it"):
        precision.resolve("mixed_float16", sampling=True)


def test_native_bfloat16_does_not_warn(machine):
    machine(XEON_AMX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve("mixed_bfloat16") == "mixed_bfloat16"


def test_unknown_precision():
    with pytest.raises(ValueError, match=r"precision must be one of auto, float32, mixed_float16, "
                                         r"mixed_bfloat16; got 'bf16'"):
        precision.resolve("bf16")


def test_cpu_flags_are_read_from_linux():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        with open("/proc/cpuinfo") as file:
            assert ("sse2" in flags) == ("sse2" in file.read())
    except OSError:
        assert flags == frozenset()


def test_this_backend_reports_its_accelerator():
    """None (the CPU) exactly where Keras sees no accelerator."""
    if BACKEND == "torch":  # keras.distribution lists no devices under PyTorch
        import torch

        on_cpu = not torch.cuda.is_available()
    else:
        on_cpu = all(d.lower().startswith("cpu") for d in keras.distribution.list_devices())
    supports = backend.accelerator_supports("bfloat16")
    assert supports is None if on_cpu else isinstance(supports, bool)


def test_load_model_computes_in_the_precision_asked(machine, tmp_path):
    machine(EPYC_ZEN3)
    model = one_level_model()
    model.save(tmp_path / "model.keras")
    inputs = [np.full((1, 8, 8, 1), 0.5, "float32"), np.array([10], "int32")]
    expected = keras.ops.convert_to_numpy(model.network(inputs))

    default = kd.load_model(tmp_path / "model.keras")
    auto = kd.load_model(tmp_path / "model.keras", precision="auto")
    with pytest.warns(UserWarning, match="sampling will emulate it"):
        half = kd.load_model(tmp_path / "model.keras", precision="mixed_bfloat16")
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored
    for loaded, compute in ((default, "float32"), (auto, "float32"), (half, "bfloat16")):
        assert loaded.network.get_layer("conv_in").compute_dtype == compute
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(auto.network(inputs)), expected)
    output = keras.ops.convert_to_numpy(half.network(inputs))
    assert output.dtype == np.float32  # the output head stays float32
    # bfloat16 keeps 8 bits of mantissa: close to float32's output, not equal.
    difference = np.abs(output - expected).max()
    assert 0 < difference < 0.1 * np.abs(expected).max()
    with pytest.raises(ValueError, match="precision must be one of auto, float32"):
        kd.load_model(tmp_path / "model.keras", precision="half")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flags, policy", [(XEON_AMX, "mixed_bfloat16"), (EPYC_ZEN3, "float32")])
def test_train_builds_the_model_in_the_resolved_precision(machine, monkeypatch, tmp_path, flags, policy):
    from keras_diffusion import training

    machine(flags)
    seen = []

    def build_model(*args, **kwargs):
        seen.append(keras.mixed_precision.dtype_policy().name)
        raise _Stop()

    monkeypatch.setattr(training, "load_training_data", lambda config: (None, None, (8, 8, 1), None))
    monkeypatch.setattr(training, "build_model", build_model)
    config = kd.load_config(SMOKE)
    assert config["training"]["precision"] == "auto"  # the default
    with pytest.raises(_Stop):
        training.train(config, tmp_path / "run")
    assert seen == [policy]
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored



def _tensorflow_child(code, onednn_setting):
    """The last line `code` prints in a child Python under TensorFlow, with
    TF_ENABLE_ONEDNN_OPTS set to `onednn_setting` (None: unset)."""
    import subprocess
    import sys

    env = child_env("tensorflow")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn_setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()[-1]


@pytest.mark.parametrize("setting, on", [(None, True), ("0", False)])
def test_tensorflow_uses_onednn_unless_the_user_turns_it_off(setting, on):
    """TensorFlow's own default keeps oneDNN off on AVX2-only CPUs, where
    its Eigen kernels trained the reference UNet 1.4x slower; importing
    keras_diffusion turns it on, and an explicit setting stays the user's."""
    code = ("import os, keras_diffusion\n"
            "from tensorflow.python.util import _pywrap_util_port as port\n"
            "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], port.IsMklEnabled())")
    assert _tensorflow_child(code, setting).split() == [setting or "1", str(on)]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's oneDNN switch; runs under TensorFlow")
@pytest.mark.parametrize("user_setting, warned", [(None, True), ("0", False)])
def test_a_tensorflow_loaded_first_without_onednn_warns_once(user_setting, warned):
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads: one loaded
    before keras_diffusion, with oneDNN off, keeps it off (here forced with
    0 for the first import, as an AVX2-only CPU's default would leave it).
    The import warns, once a process: `fit` then stays silent, unless the
    user asked for it off."""
    restore = "" if user_setting else "del os.environ['TF_ENABLE_ONEDNN_OPTS']\n"
    code = ("import os, warnings\nimport tensorflow\n" + restore +
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import keras_diffusion\n"
            "    from keras_diffusion.backend import tensorflow as tf_backend\n"
            "    tf_backend.warn_without_onednn(); tf_backend.warn_without_onednn()\n"
            "print(sum('oneDNN' in str(w.message) for w in caught))")
    assert _tensorflow_child(code, "0") == ("1" if warned else "0")
