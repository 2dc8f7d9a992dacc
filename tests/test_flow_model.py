"""Flow matching in `DiffusionModel`: the loss `fit` minimises is the
velocity regression at the schedule's sigmas, written out here; a model
trains from a shipped flow config, generates with every sampler, saves and
reloads, and denoises, edits, inpaints and interpolates; and what does not fit a flow
schedule is refused in one line."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import BACKEND
from conftest import DATA_DIR
from conftest import ROOT
from conftest import TINY
from conftest import cli_main
from keras_diffusion import FlowMatchSchedule


def tiny_flow_model(weighting="none", density="uniform", seed=0):
    keras.utils.set_random_seed(seed)
    network = kd.UNet((8, 8, 1), widths=(8,), attention_levels=(), blocks_per_level=1, groups=4)
    schedule = FlowMatchSchedule(shift=3.0, density=density, weighting=weighting)
    return kd.DiffusionModel(network, schedule, ema_decay=None, seed=seed)


@pytest.mark.parametrize("weighting, density", [("none", "uniform"), ("cosmap", "logit_normal"),
                                                ("sigma_sqrt", "mode")])
def test_the_loss_is_the_weighted_velocity_regression(weighting, density):
    """The loss, recomputed from the same draws: sigmas from the schedule's
    density, x_t = (1 - sigma) x0 + sigma noise, the network called at
    sigma * 1000, the target noise - x0, the weighting per example."""
    model = tiny_flow_model(weighting, density)
    images = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 1)).astype("float32")
    loss = float(ops.convert_to_numpy(model.compute_diffusion_loss(images, training=False)))

    seeds = keras.random.SeedGenerator(0)  # the model's draws, in its order
    sigma = model.schedule.draw_levels(6, seed=seeds)
    noise = keras.random.normal((6, 8, 8, 1), seed=seeds)
    x0 = images * 2.0 - 1.0
    s = ops.convert_to_numpy(sigma).reshape(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * ops.convert_to_numpy(noise)
    output = ops.convert_to_numpy(model.network([x_t, ops.convert_to_numpy(sigma) * 1000.0]))
    per_example = ((output - (ops.convert_to_numpy(noise) - x0)) ** 2).mean(axis=(1, 2, 3))
    weights = ops.convert_to_numpy(model.schedule.weights_for(sigma, weighting))
    assert loss == pytest.approx(float((weights * per_example).mean()), rel=1e-5)
    assert np.isin(ops.convert_to_numpy(sigma), model.schedule.training_sigmas).all()


def test_the_network_sees_fractional_times():
    """A UNet takes t as float32: sigma * 1000 keeps its fraction (an int32
    input would round 456.7 to 456 and lose the step between them)."""
    network = kd.UNet((8, 8, 1), widths=(8,), attention_levels=(), blocks_per_level=1, groups=4)
    x = np.zeros((2, 8, 8, 1), "float32")
    whole = ops.convert_to_numpy(network([x, np.array([456.0, 456.0], "float32")]))
    fraction = ops.convert_to_numpy(network([x, np.array([456.7, 456.7], "float32")]))
    assert np.abs(whole - fraction).max() > 1e-6
    integers = ops.convert_to_numpy(network([x, np.array([456, 456], "int32")]))
    np.testing.assert_array_equal(whole, integers)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """`keras-diffusion train` on configs/mnist_flow.yaml at the suite's tiny size."""
    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST file is not at {DATA_DIR}")
    output = tmp_path_factory.mktemp("flow")
    code = cli_main("train", "--config", ROOT / "configs" / "mnist_flow.yaml", "--data-dir",
                    DATA_DIR, "--output", output, *[arg for key in TINY for arg in ("--set", key)],
                    "--set", "training.epochs=1", "--set", "sampling.steps=3",
                    "--set", "sampling.num_images=2", "--set", "evaluation.every_n_epochs=0")
    assert code == 0
    return output


def test_the_flow_config_trains_saves_and_generates(flow_run):
    model = kd.load_model(flow_run / "model.keras")
    assert isinstance(model.schedule, FlowMatchSchedule) and model.prediction == "flow"
    assert model.schedule.density == "logit_normal"
    history = (flow_run / "history.csv").read_text().splitlines()
    assert history[0].split(",")[-1] == "loss" and np.isfinite(float(history[1].split(",")[-1]))
    for sampler in kd.SAMPLERS:
        images = model.generate(2, steps=3, sampler=sampler, seed=0)
        assert images.shape == (2, 28, 28, 1) and np.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1
        np.testing.assert_array_equal(images, model.generate(2, steps=3, sampler=sampler, seed=0))
    # "ddim" is Euler on a straight path.
    np.testing.assert_allclose(model.generate(2, steps=3, sampler="ddim", seed=1),
                               model.generate(2, steps=3, sampler="euler", seed=1), atol=1e-6)


def test_a_flow_model_denoises_edits_and_interpolates(flow_run):
    model = kd.load_model(flow_run / "model.keras")
    images = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)).astype("float32")
    result = model.denoise(images, sigma=0.2, steps=2)
    assert result.images.shape == images.shape and result.sigma == 0.2
    edited = model.img2img(images, strength=0.3, steps=2, seed=0)
    assert edited.shape == images.shape and np.isfinite(edited).all()
    # A small strength keeps the image close; a full one is a fresh sample.
    assert np.abs(model.img2img(images, strength=0.05, steps=1, seed=0) - images).mean() < \
        np.abs(model.img2img(images, strength=1.0, steps=1, seed=0) - images).mean()
    path = model.interpolate(0, images[0], num=3, steps=2)
    assert path.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(path[0], model.generate(1, steps=2, seed=0)[0], atol=1e-5)


def test_a_flow_model_inpaints(flow_run):
    model = kd.load_model(flow_run / "model.keras")
    images = np.random.default_rng(1).uniform(0, 1, (2, 28, 28, 1)).astype("float32")
    mask = kd.make_mask("center", images.shape)
    filled = model.inpaint(images, mask, steps=4, jump_length=2, resamples=2, seed=0)
    known = np.broadcast_to(mask, images.shape) > 0.5
    np.testing.assert_array_equal(filled[known], images[known])
    assert np.isfinite(filled).all() and 0 <= filled.min() and filled.max() <= 1
    np.testing.assert_array_equal(
        filled, model.inpaint(images, mask, steps=4, jump_length=2, resamples=2, seed=0))


def test_flow_renoise_has_the_forward_transition_law():
    """x at sigma, jumped to sigma_next: mean r x, variance sigma_next^2 -
    (r sigma)^2, so x0 noised to sigma then jumped has the law of x0 noised
    to sigma_next; no jump keeps x."""
    schedule = FlowMatchSchedule()
    rng = np.random.default_rng(0)
    x0 = np.full((20000, 1, 1, 1), 0.7, "float32")
    x = schedule.add_noise(x0, rng.standard_normal(x0.shape).astype("float32"),
                           np.full((20000,), 0.3, "float32"))
    jumped = ops.convert_to_numpy(schedule.renoise(
        x, rng.standard_normal(x0.shape).astype("float32"), 0.3, 0.8))
    assert jumped.mean() == pytest.approx(0.2 * 0.7, abs=0.01)
    assert jumped.std() == pytest.approx(0.8, abs=0.01)
    same = schedule.renoise(x, np.ones(x0.shape, "float32"), 1.0, 1.0)
    np.testing.assert_array_equal(ops.convert_to_numpy(same), ops.convert_to_numpy(x))


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch exports by re-running the TensorFlow "
                                               "export in a subprocess (tested under TensorFlow)")
def test_a_flow_model_exports_and_serves_its_own_numbers(flow_run, tmp_path):
    """SavedModel endpoints of a flow model: generate (its sigma plan),
    denoise (sigma known at run time) and predict_noise (float times)."""
    import tensorflow as tf

    model = kd.load_model(flow_run / "model.keras")
    model.export(tmp_path / "served", steps=3, sampler="heun", denoise_steps=3)
    served = tf.saved_model.load(str(tmp_path / "served"))
    noise = np.random.default_rng(2).standard_normal((2, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(served.generate(noise).numpy(),
                               model.generate(2, steps=3, sampler="heun", noise=noise), atol=1e-4)
    noisy = np.random.default_rng(3).uniform(0, 1, (2, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(served.denoise(noisy, 0.2).numpy(),
                               model.denoise(noisy, sigma=0.2, steps=3).images, atol=1e-4)
    x_t = noise * 0.5
    t = np.array([123.4, 987.6], "float32")
    velocity = ops.convert_to_numpy(model.network.stateless_call(
        [v.value for v in model.sampling_weights],
        [v.value for v in model.network.non_trainable_variables], [x_t, t])[0])
    expected = x_t + (1 - t.reshape(-1, 1, 1, 1) / 1000) * velocity
    np.testing.assert_allclose(served.predict_noise(x_t, t).numpy(), expected, atol=1e-4)


def test_what_a_flow_model_does_not_do_is_refused(flow_run):
    model = kd.load_model(flow_run / "model.keras")
    with pytest.raises(ValueError, match="timestep_spacing is an option of DDPM schedules"):
        model.generate(1, steps=2, timestep_spacing="leading")


def test_bad_flow_arguments_are_refused():
    network = kd.UNet((8, 8, 1), widths=(8,), attention_levels=(), blocks_per_level=1, groups=4)
    with pytest.raises(ValueError, match="prediction must be 'flow'; got 'epsilon'"):
        kd.DiffusionModel(network, FlowMatchSchedule(), prediction="epsilon")
    with pytest.raises(ValueError, match="prediction='flow' .the velocity. needs a flow-matching"):
        kd.DiffusionModel(network, prediction="flow")
    with pytest.raises(ValueError, match="min_snr_gamma weighs DDPM timesteps"):
        kd.DiffusionModel(network, FlowMatchSchedule(), min_snr_gamma=5.0)
    assert kd.DiffusionModel(network).prediction == "epsilon"
    # A network with an integer t input would round sigma * 1000 away.
    x_t = keras.Input((8, 8, 1))
    t = keras.Input((), dtype="int32")
    old = keras.Model([x_t, t], x_t, name="old_unet")
    with pytest.raises(ValueError, match="old_unet's t input is int32"):
        kd.DiffusionModel(old, FlowMatchSchedule())


def test_the_flow_config_keys_are_checked():
    from keras_diffusion.config import ConfigError
    from keras_diffusion.config import schedule_from_config
    from keras_diffusion.config import validate

    config = validate({"schedule": {"type": "flow", "shift": 3.0, "weighting": "cosmap"}})
    schedule = schedule_from_config(config["schedule"])
    assert isinstance(schedule, FlowMatchSchedule) and schedule.shift == 3.0
    assert schedule.weighting == "cosmap" and config["model"]["prediction"] is None
    assert type(schedule_from_config(validate({})["schedule"])).__name__ == "DiffusionSchedule"
    with pytest.raises(ConfigError, match="schedule.type must be one of ddpm, flow; got 'flows'"):
        validate({"schedule": {"type": "flows"}})
    with pytest.raises(ConfigError, match="schedule.density must be one of uniform, logit_normal, mode"):
        validate({"schedule": {"type": "flow", "density": "logit"}})
    with pytest.raises(ConfigError, match="model: a flow-matching schedule's network predicts the velocity: prediction must be 'flow'; got 'v'"):
        validate({"schedule": {"type": "flow"}, "model": {"prediction": "v"}})
