"""`distribute: fsdp`: a tiny Stable Diffusion model's weights sharded over 8
virtual CPU devices under JAX, the batch split over the same devices. One
fine-tuning step gives the one-device loss and weights, every kernel is
split 8 ways, `generate` gives the one-device image, LoRA trains and the
model saves and reloads. JAX runs in a subprocess: its devices are fixed
when it starts. TensorFlow and PyTorch say what they support instead."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import BACKEND
from conftest import child_env
from keras_diffusion.config import ConfigError
from keras_diffusion.distribute import distribution_scope
from sd_pipelines import write_pipeline

DEVICES = 8
SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, keras
    import numpy as np
    import keras_diffusion as kd
    from keras_diffusion.distribute import distribution_scope

    folder, output = sys.argv[1:]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, 16, 16, 3)).astype("float32")
    captions = ["a photo of a cat", "a red dog"] * 4
    latents = rng.standard_normal((8, 8, 8, 4)).astype("float32")

    def run(distribute):
        report = {}
        with distribution_scope(distribute) as devices:
            keras.utils.set_random_seed(0)
            model = kd.load_model(folder)
            kernels = [v for v in model.network.variables if len(v.shape) >= 2]
            report["devices"] = devices
            report["split"] = {v.path: [v.value.sharding.shard_shape(v.shape), list(v.shape)]
                               for v in kernels}
            report["image"] = model.generate(8, prompts="a photo of a cat", steps=2,
                                             noise=latents).tolist()
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            history = model.fit(images, captions, batch_size=8, epochs=1, verbose=0)
            report["loss"] = history.history["loss"]
            report["weights"] = {v.path: keras.ops.convert_to_numpy(v).ravel()[:64].tolist()
                                 for v in model.network.trainable_variables[:40]}
            if distribute is None:
                return report  # what the sharded run is compared with
            model.save(f"{output}/{distribute}.keras")
            again = kd.load_model(f"{output}/{distribute}.keras")
            report["reloaded"] = bool(np.array_equal(
                again.generate(8, prompts="a cat", steps=1, noise=latents),
                model.generate(8, prompts="a cat", steps=1, noise=latents)))
            first = next(v for v in again.network.variables if len(v.shape) >= 2)
            report["reloaded_devices"] = len(first.value.sharding.device_set)
            lora = kd.load_model(folder)
            lora.enable_lora(rank=8, seed=0)
            lora.compile(optimizer=keras.optimizers.AdamW(1e-2))
            lora.fit(images, captions, batch_size=8, epochs=1, verbose=0)
            b = [v for v in lora.network.trainable_variables if "lora_kernel_b" in v.path]
            report["lora_moved"] = bool(all(np.abs(keras.ops.convert_to_numpy(v)).max() > 0
                                            for v in b))
        return report

    print("REPORT " + json.dumps({"one": run(None), "fsdp": run("fsdp")}))
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp") / "pipeline"
    write_pipeline(folder, "sd1")
    env = child_env(xla_flags=[f"--xla_force_host_platform_device_count={DEVICES}"])
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(folder.parent)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


jax_only = pytest.mark.skipif(BACKEND != "jax", reason="Keras shards weights on JAX only "
                                                       "(the others are tested below)")


@jax_only
def test_every_kernel_is_split_over_the_devices(report):
    assert report["one"]["devices"] == 1 and report["fsdp"]["devices"] == DEVICES
    split = report["fsdp"]["split"]
    assert len(split) > 50
    for path, (shard, shape) in split.items():
        whole = int(np.prod(shape))
        assert int(np.prod(shard)) * DEVICES == whole, (path, shard, shape)
    # One device holds an eighth of the weights it would hold alone.
    for path, (shard, shape) in report["one"]["split"].items():
        assert shard == shape


@jax_only
def test_a_sharded_step_and_image_equal_one_device(report):
    one, fsdp = report["one"], report["fsdp"]
    np.testing.assert_allclose(fsdp["image"], one["image"], atol=1e-5)
    np.testing.assert_allclose(fsdp["loss"], one["loss"], atol=1e-5)
    assert fsdp["weights"].keys() == one["weights"].keys()
    for path, values in one["weights"].items():
        np.testing.assert_allclose(fsdp["weights"][path], values, atol=1e-5, err_msg=path)


@jax_only
def test_a_sharded_model_saves_reloads_and_trains_lora(report):
    fsdp = report["fsdp"]
    assert fsdp["reloaded"] and fsdp["reloaded_devices"] == DEVICES
    assert fsdp["lora_moved"]


@pytest.mark.skipif(BACKEND == "jax", reason="JAX shards (tested above)")
def test_other_backends_say_what_they_support():
    expected = {"tensorflow": "TensorFlow runs data_parallel", "torch": "Keras 3 distributes "
                                                                        "nothing on PyTorch"}
    with pytest.raises(ConfigError, match=r"distribute=fsdp \(weights sharded over the devices\) "
                                          rf"runs on JAX only.*{expected[BACKEND]}"):
        with distribution_scope("fsdp"):
            pass


@pytest.mark.skipif(BACKEND != "jax", reason="the rule is the JAX distribution's")
def test_the_sharding_rule():
    from keras_diffusion.backend.jax import shard_spec

    assert shard_spec((3, 3, 320, 640), 8) == [None, None, None, "batch"]  # a kernel's outputs
    assert shard_spec((3, 3, 320, 4), 8) == [None, None, "batch", None]  # conv_out: its inputs
    assert shard_spec((49408, 768), 8) == [None, "batch"]
    assert shard_spec((7, 5), 8) == [None, None]  # nothing divides: whole on each device
    assert shard_spec((1280,), 8) == [None]  # biases and norms stay whole


def _finetune(folder, data, output, *extra, xla_flags=()):
    command = [sys.executable, "-m", "keras_diffusion.cli", "finetune", "--model", str(folder),
               "--data-dir", str(data), "--instance-prompt", "a photo of sks dog", "--output",
               str(output), "--epochs", "1", "--sample-steps", "1", *extra]
    return subprocess.run(command, env=child_env(xla_flags=xla_flags), capture_output=True,
                          text=True, timeout=900)


def test_finetune_distribute_fsdp(tmp_path):
    from PIL import Image

    folder = tmp_path / "pipeline"
    write_pipeline(folder, "sd1")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(9):  # one more than a multiple of the devices: it is left out
        Image.fromarray((rng.uniform(0, 1, (16, 16, 3)) * 255).astype("uint8")).save(
            data / f"{index}.png")
    if BACKEND != "jax":
        done = _finetune(folder, data, tmp_path / "out", "--distribute", "fsdp")
        assert done.returncode == 2
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and "distribute=fsdp (weights sharded over the devices) runs on " \
            "JAX only" in err[0]
        return
    flags = [f"--xla_force_host_platform_device_count={DEVICES}"]
    done = _finetune(folder, data, tmp_path / "bad", "--distribute", "fsdp", "--batch-size", "4",
                     xla_flags=flags)
    assert done.returncode == 2 and "batch_size must be a multiple of the 8 devices" in \
        done.stderr
    done = _finetune(folder, data, tmp_path / "out", "--distribute", "fsdp", "--batch-size", "8",
                     xla_flags=flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
