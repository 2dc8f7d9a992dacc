"""`distribute: data_parallel` on 2 virtual CPU devices: JAX through
keras.distribution.DataParallel, TensorFlow through MirroredStrategy. Each
backend runs in a subprocess, because the devices must be set up before the
backend starts. PyTorch gets a clear error."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import BACKEND
from conftest import child_env
from conftest import DATA_DIR
from conftest import SMOKE
from conftest import TINY
from keras_diffusion.config import ConfigError
from keras_diffusion.config import load_config
from keras_diffusion.training import _share_evenly

needs_mnist = pytest.mark.skipif(not (DATA_DIR / "mnist.npz").exists(), reason="needs the shared MNIST file")

# Trains the same config on one device and on two, and reports what the test checks.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from keras_diffusion.callbacks import AtomicCSVLogger
    from keras_diffusion.config import load_config
    from keras_diffusion.training import train

    smoke, data_dir, output, *overrides = sys.argv[1:]
    config = load_config(smoke, overrides + [f"data.data_dir={data_dir}"])
    report = {}
    for name, distribute in (("one", None), ("two", "data_parallel")):
        # Sample and score only on two devices, after the epoch: that is
        # where sampling could break.
        sampling = dict(config["sampling"], every_n_epochs=1 if distribute else 0)
        evaluation = dict(config["evaluation"], every_n_epochs=1 if distribute else 0)
        model = train(dict(config, distribute=distribute, sampling=sampling, evaluation=evaluation),
                      f"{output}/{name}", verbose=0)
        csv = AtomicCSVLogger(f"{output}/{name}/history.csv")
        csv.on_train_begin()
        velocities = [v for v in model.optimizer.variables if "velocity" in v.path]
        value = model.network.trainable_variables[0].value
        if hasattr(value, "values"):  # a tf.distribute MirroredVariable: one copy per device
            copies = [model.network.trainable_variables[0], model.ema_weights[0], model.seed_generator.state]
            in_sync = all(np.array_equal(*[np.asarray(c) for c in v.value.values]) for v in copies)
            devices = len(value.values)
        elif hasattr(value, "sharding"):  # a JAX array: replicated over the mesh
            in_sync, devices = True, len(value.sharding.device_set)
        else:
            in_sync, devices = True, 1
        report[name] = {
            "loss": csv.history["loss"],
            "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            "velocity": float(sum(np.sum(keras.ops.convert_to_numpy(v)) for v in velocities)),
            "devices": devices,
            "in_sync": bool(in_sync),
            "samples": os.path.exists(f"{output}/{name}/samples/epoch_0001.png"),
        }
    print("REPORT " + json.dumps(report))
""")


def _run_two_devices(tmp_path):
    env = child_env(xla_flags=["--xla_force_host_platform_device_count=2"])
    overrides = TINY + ["training.epochs=1", "sampling.num_images=2", "sampling.steps=2"]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SMOKE), str(DATA_DIR), str(tmp_path), *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@needs_mnist
@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="Keras distributes fit on JAX and TF")
def test_two_devices_train_like_one(tmp_path):
    report = _run_two_devices(tmp_path)
    one, two = report["one"], report["two"]
    assert one["devices"] == 1 and two["devices"] == 2 and two["in_sync"]
    assert one["iterations"] == two["iterations"] == 4
    assert two["samples"], "sampling and saving work on the distributed model"
    if BACKEND == "jax":
        # The same global batch and the same noise, only split: equal up to the
        # float32 rounding of sums taken in another order (~1e-6 per step; the
        # velocity, Adam's sum over 4 steps of squared gradients, drifts more).
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
        np.testing.assert_allclose(two["velocity"], one["velocity"], rtol=1e-3)
    else:
        # Each replica draws its own noise, so the losses differ a little.
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=0.15)
        # Adam's second moment grows with the square of the gradient: summing
        # the replicas' gradients instead of averaging them would make it 4x.
        assert 0.5 < two["velocity"] / one["velocity"] < 2, (two["velocity"], one["velocity"])


@pytest.mark.skipif(BACKEND != "torch", reason="the torch message")
def test_torch_says_what_keras_supports(tmp_path):
    from keras_diffusion.training import train

    config = load_config(SMOKE, ["distribute=data_parallel"])
    with pytest.raises(ConfigError, match=r"distribute=data_parallel is not available on the torch "
                                          r"backend: Keras 3 distributes fit\(\) only on JAX .* and "
                                          r"TensorFlow .*; use --backend jax or --backend tensorflow"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_batches_are_shared_evenly():
    x, y = np.zeros((9, 8, 8, 1)), np.arange(9)
    assert _share_evenly(x, y, 1, 3)[0] is x
    kept_x, kept_y = _share_evenly(x, y, 2, 4)
    assert len(kept_x) == len(kept_y) == 8
    with pytest.raises(ConfigError, match=r"training.batch_size must be a multiple of the number of "
                                          r"devices \(2\) with distribute \(data_parallel, fsdp\); got 7"):
        _share_evenly(x, y, 2, 7)
