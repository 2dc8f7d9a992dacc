"""Saved models keep loading, and keep sampling the same, as the code moves.

A `.keras` file names each class by its registered name and stores each
weight under the path of attributes that leads to it inside the model, so
renaming a registered class, moving a layer or renaming an attribute can
orphan every model users have saved. `fixtures/model_v0_1.keras` was written
by keras_diffusion 0.1.0 (a tiny conditional v-prediction model, trained a
few steps so that its EMA weights differ from its raw ones), and
`fixtures/outputs_v0_1_<backend>.npz` holds what 0.1.0 computed with it on
each backend. Each backend's run of the suite loads the file and checks that
every way of sampling still gives those arrays. `fixtures/make_v0_1.py`
says how the files were made.

The exported SavedModel's outputs are checked in `test_export.py`, which
exports this same file.
"""

from pathlib import Path

import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import BACKEND
from conftest import EAGER

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = FIXTURES / "model_v0_1.keras"
# The same kernels on the same shapes give the same bits on one machine. The
# recording was made on another CPU kind than some that run this: its float32
# kernels sum in other orders (~1e-6 of the output scale per network
# evaluation, see test_model.NETWORK_RTOL), and with v-prediction no step of a
# plain sampling chain amplifies that by more than a few times. Inpainting's
# resampling is the exception: it re-noises the image from a prediction made
# near t = 0, where turning the predicted image into noise divides its error
# by sqrt(1 - alpha_bar_1) ~ 0.03; on PyTorch on an AMD EPYC (Zen 5) it
# differed from the recording by 1.6e-5 where every other output stayed
# under 2e-6. A changed sampler or the wrong weights move these outputs by
# more than 1e-3 (the EMA and raw weights alone differ by that much).
ATOL = {"inpaint": 5e-5}
DEFAULT_ATOL = 1e-5


def recorded(name=BACKEND):
    return dict(np.load(FIXTURES / f"outputs_v0_1_{name}.npz"))


def fixture_images():
    """Three 16x16 images: one bright square each, on a dark background."""
    images = np.zeros((3, 16, 16, 1), "float32")
    for i, (row, col) in enumerate(((2, 3), (8, 8), (5, 10))):
        images[i, row:row + 6, col:col + 6] = 0.4 + 0.3 * i
    return images


def sampling_outputs(model):
    """Every public way of sampling, with fixed seeds; what the recording holds."""
    images = fixture_images()
    noisy = images + 0.2 * np.random.default_rng(7).normal(size=images.shape).astype("float32")
    inputs = [np.random.default_rng(8).normal(size=(3, 16, 16, 1)).astype("float32"),
              np.array([0, 50, 99], "int32"), np.array([0, 2, 3], "int32")]
    weights = [v.value for v in model.sampling_weights]
    state = [v.value for v in model.network.non_trainable_variables]
    return {
        "network_ema": ops.convert_to_numpy(model.network.stateless_call(weights, state, inputs)[0]),
        "generate_guided": model.generate(3, steps=3, seed=1, labels=[0, 1, 2], guidance_scale=2.0),
        "generate_dpmpp": model.generate(2, steps=3, sampler="dpmpp_2m", seed=2),
        "generate_ddpm": model.generate(2, steps=3, sampler="ddpm", seed=3, labels="b"),
        "denoise": model.denoise(noisy, sigma=0.2, steps=3).images,
        "inpaint": model.inpaint(images, kd.make_mask("center", images.shape), steps=4,
                                 jump_length=2, resamples=2, seed=4),
        "img2img": model.img2img(images, strength=0.6, steps=3, seed=5, labels=1,
                                 guidance_scale=1.5),
        "interpolate": model.interpolate(1, 2, num=3, steps=3),
        "interpolate_images": model.interpolate(images[0], images[1], num=3, steps=3),
    }


@pytest.fixture(scope="module")
def legacy_model():
    return kd.load_model(MODEL)


def test_the_0_1_file_loads_with_its_config_and_training_state(legacy_model):
    model = legacy_model
    assert isinstance(model, kd.DiffusionModel) and isinstance(model.network, kd.UNet)
    assert model.prediction == "v" and model.conditional and model.num_classes == 3
    assert model.class_names == ["a", "b", "c"]
    assert model.schedule.timesteps == 100 and model.image_shape == (16, 16, 1)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 8
    assert float(ops.convert_to_numpy(model.ema_updates)) == 8.0
    # Written under TensorFlow, which saved jit_compile=False: this backend
    # decides again (XLA under JAX, not on TensorFlow's or PyTorch's CPU).
    assert model.jit_compile == (BACKEND == "jax")
    raw, ema = model.network.trainable_variables, model.sampling_weights
    assert max(float(np.abs(ops.convert_to_numpy(a) - ops.convert_to_numpy(b)).max())
               for a, b in zip(raw, ema)) > 1e-3


def test_the_0_1_file_samples_as_0_1_did(legacy_model):
    expected = recorded()
    got = sampling_outputs(legacy_model)
    assert sorted(got) == sorted(name for name in expected if not name.startswith("export_"))
    for name, value in got.items():
        assert value.shape == expected[name].shape, name
        difference = float(np.abs(value - expected[name]).max())
        limit = ATOL.get(name, DEFAULT_ATOL)
        assert difference <= limit, f"{name}: differs from 0.1.0 by {difference:.2e}"
    # Not trivially saturated: the images hold values between the clip limits.
    assert 0.05 < np.mean((got["generate_guided"] > 0.01) & (got["generate_guided"] < 0.99))


def test_the_0_1_file_keeps_training(legacy_model, tmp_path):
    """Last in the module: it trains the shared copy (a load saved)."""
    model = legacy_model
    model.run_eagerly = EAGER  # one step: tracing it would cost TensorFlow ~15 s
    history = model.fit(fixture_images(), np.array([0, 1, 2]), batch_size=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 9
    model.save(tmp_path / "again.keras")
    assert kd.load_model(tmp_path / "again.keras").get_config() == model.get_config()
