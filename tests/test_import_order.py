"""TensorFlow takes its oneDNN switch (TF_ENABLE_ONEDNN_OPTS) once, while it
loads, and `import keras` under TensorFlow loads it: a program that imports
keras before keras_diffusion keeps TensorFlow's own default, which is off on
AVX2-only CPUs, and trained at half speed there. Nothing switches it
afterwards, so `import keras_diffusion` warns, once, where that happened.

Each case runs in a child Python, as the import order is per process. This
machine's TensorFlow turns oneDNN on by itself, so "loaded with oneDNN off"
is made by exporting TF_ENABLE_ONEDNN_OPTS=0 for the load and deleting it
before keras_diffusion is imported: the state an AVX2-only CPU reaches with
the variable unset."""

import subprocess
import sys

import pytest

from conftest import BACKEND
from conftest import child_env

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="TensorFlow's oneDNN switch; each child picks its backend, so this runs in one lane")

FORGET_THE_LOAD_SETTING = "del os.environ['TF_ENABLE_ONEDNN_OPTS']\n"


def _warnings_at_import(before, load_setting, backend="tensorflow"):
    """(number of oneDNN warnings, the first's line in the child's code, its
    message) in a child that runs `before`, then imports keras_diffusion
    three ways (the later two import nothing new), with
    TF_ENABLE_ONEDNN_OPTS=`load_setting` in its environment (None: unset)."""
    env = child_env(backend)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if load_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = load_setting
    code = (
        "import importlib, os, platform, warnings\n" + before +
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import keras_diffusion\n"
        "    import keras_diffusion as kd\n"
        "    importlib.import_module('keras_diffusion.backend.tensorflow')\n"
        "found = [w for w in caught if 'oneDNN' in str(w.message)]\n"
        "print(len(found), [(w.filename, w.lineno) for w in found][:1])\n"
        "if found: print(found[0].message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, where = out.stdout.splitlines()[0].split(" ", 1)
    import_line = code.splitlines().index("    import keras_diffusion") + 1
    expected_where = str([("<string>", import_line)])
    return int(count), where == expected_where, "\n".join(out.stdout.splitlines()[1:])


def test_keras_imported_first_without_onednn_warns_once_on_the_import_line():
    count, on_the_import_line, message = _warnings_at_import(
        "import keras\n" + FORGET_THE_LOAD_SETTING, "0")
    assert count == 1
    assert on_the_import_line  # the child's own `import keras_diffusion`, not a library line
    assert message == (
        "TensorFlow was loaded before keras_diffusion (by `import keras` or `import tensorflow`) "
        "and runs without its oneDNN kernels, its own default on this CPU, with which this "
        "library's UNet trained at half speed on an AVX2-only AMD EPYC. Fix: import "
        "keras_diffusion before keras and tensorflow, or export TF_ENABLE_ONEDNN_OPTS=1 before "
        "starting Python.")


@pytest.mark.parametrize(
    "before, load_setting, backend",
    [
        # keras_diffusion sets the variable before TensorFlow loads
        pytest.param("", None, "tensorflow", id="keras_diffusion-first"),
        pytest.param("import keras\n", "0", "tensorflow", id="the-user's-own-0"),
        # what a CPU with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX gets by default
        pytest.param("import keras\n" + FORGET_THE_LOAD_SETTING, "1", "tensorflow",
                     id="keras-first-with-oneDNN"),
        pytest.param("import tensorflow\n" + FORGET_THE_LOAD_SETTING, "0", "jax",
                     id="tensorflow-first-without-oneDNN-under-JAX"),
        pytest.param("platform.machine = lambda: 'aarch64'\nimport keras\n" +
                     FORGET_THE_LOAD_SETTING, "0", "tensorflow", id="not-x86"),
    ],
)
def test_no_warning_where_it_does_not_apply(before, load_setting, backend):
    assert _warnings_at_import(before, load_setting, backend)[0] == 0


@pytest.mark.parametrize("load_setting, convolution_on_onednn", [("0", False), ("1", True)])
def test_the_variable_set_after_tensorflow_loads_changes_nothing(load_setting,
                                                                 convolution_on_onednn):
    """Why a warning and not a switch: TensorFlow took the variable while it
    loaded, so setting it afterwards, before any op ran, leaves a convolution
    on TensorFlow's own kernels (oneDNN's log, ONEDNN_VERBOSE, shows no
    convolution primitive, only the matrix products Eigen hands it)."""
    env = dict(child_env("tensorflow"), TF_ENABLE_ONEDNN_OPTS=load_setting, ONEDNN_VERBOSE="1")
    code = (
        "import os\nimport tensorflow as tf\nos.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'\n"
        "x, k = tf.ones((2, 8, 8, 4)), tf.ones((3, 3, 4, 4))\n"
        "tf.function(lambda x: tf.nn.conv2d(x, k, 1, 'SAME'))(x)\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print('IsMklEnabled', port.IsMklEnabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"IsMklEnabled {convolution_on_onednn}" in out.stdout
    assert (",exec,cpu,convolution," in out.stdout) == convolution_on_onednn
