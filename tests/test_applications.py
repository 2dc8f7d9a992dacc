"""Guidance, denoising, inpainting, img2img and interpolation.

Most tests run the real `DiffusionModel` code paths over a closed-form
network: for pixels x0 ~ N(mean, s^2) (independently, in [-1, 1]) the optimal
epsilon prediction is known exactly (see `conftest.gaussian_denoiser`),
so what a sampler should return is known too, and no training is needed.
"""

import keras
import numpy as np
import pytest
from keras import ops
from conftest import MU
from conftest import S
from conftest import gaussian_denoiser

import keras_diffusion as kd
from keras_diffusion import applications
from keras_diffusion import samplers

SHAPE = (8, 8, 1)
MEANS = (-0.5, 0.0, 0.5)  # per class, model range; the null class is N(0, 0.5^2)
NULL_MEAN, NULL_S = 0.0, 0.5


class GaussianEpsilon(keras.layers.Layer):
    """E[eps | x_t, label] when pixels are N(means[label], s^2); label
    len(means) is the null class, N(null_mean, null_s^2)."""

    def __init__(self, schedule, means, s, **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule
        self.means = np.asarray(means, "float32")
        self.s = np.asarray(s, "float32")

    def call(self, x_t, t, labels=None):
        a = ops.reshape(self.schedule.alpha_bar(t), (-1, 1, 1, 1))
        index = ops.zeros_like(t) if labels is None else labels
        mean = ops.reshape(ops.take(self.means, index), (-1, 1, 1, 1))
        s = ops.reshape(ops.take(self.s, index), (-1, 1, 1, 1))
        return ops.sqrt(1 - a) * (x_t - ops.sqrt(a) * mean) / (a * s**2 + 1 - a)


def gaussian_model(conditional=False, timesteps=1000, class_names=None, shape=SHAPE):
    """A `DiffusionModel` whose network is the closed-form denoiser."""
    schedule = kd.DiffusionSchedule("cosine", timesteps=timesteps)
    x = keras.Input(shape)
    t = keras.Input((), dtype="int32")
    if conditional:
        labels = keras.Input((), dtype="int32")
        layer = GaussianEpsilon(schedule, MEANS + (NULL_MEAN,), [S] * len(MEANS) + [NULL_S])
        network = keras.Model([x, t, labels], layer(x, t, labels))
        network.num_classes = len(MEANS)
    else:
        network = keras.Model([x, t], GaussianEpsilon(schedule, [MU], [S])(x, t))
    return kd.DiffusionModel(network, schedule, ema_decay=None, class_names=class_names)


def gaussian_images(n, seed=0):
    """Clean images drawn from the unconditional model's pixel law, in [0, 1]."""
    x0 = MU + S * np.random.default_rng(seed).normal(size=(n,) + SHAPE)
    return np.clip((x0 + 1) / 2, 0, 1).astype("float32")


# ----------------------------------------------------------------- guidance
def test_guidance_zero_equals_unconditional_sampling():
    model = gaussian_model(conditional=True)
    unconditional = model.generate(3, steps=5, seed=3)
    guided_zero = model.generate(3, steps=5, seed=3, labels=[0, 1, 2], guidance_scale=0.0)
    np.testing.assert_array_equal(guided_zero, unconditional)
    conditional = model.generate(3, steps=5, seed=3, labels=[0, 1, 2], guidance_scale=1.0)
    assert np.abs(conditional - unconditional).max() > 0.1


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_conditional_samples_land_near_their_class_mean(guidance_scale):
    model = gaussian_model(conditional=True, class_names=["low", "mid", "high"])
    labels = ["low", "mid", "high"] * 4
    images = model.generate(12, steps=20, seed=0, labels=labels, guidance_scale=guidance_scale)
    # Per class, the mean of 4 x 64 pixels, back on the model's range.
    class_means = (images.reshape(4, 3, -1).mean(axis=(0, 2))) * 2 - 1
    if guidance_scale == 1:  # exactly the conditional law N(mean, S^2)
        np.testing.assert_allclose(class_means, MEANS, atol=0.04)
    else:  # guidance pushes each class away from the null mean (0)
        np.testing.assert_allclose(class_means, MEANS, atol=0.2)
        assert class_means[0] < MEANS[0] + 0.02 and class_means[2] > MEANS[2] - 0.02
        assert abs(class_means[1]) < 0.04


# ------------------------------------------------------------------ denoise
@pytest.mark.parametrize("steps", [1, 10])
def test_denoise_lowers_mse(steps):
    model = gaussian_model()
    clean = gaussian_images(32)
    sigma = 0.1  # 0.2 on the model scale: as much noise as signal spread
    noisy = clean + sigma * np.random.default_rng(1).normal(size=clean.shape).astype("float32")
    result = model.denoise(noisy, sigma=sigma, steps=steps)
    assert isinstance(result, applications.DenoiseResult)
    assert result.sigma == sigma and result.sigma_estimated is False
    assert result.images.shape == clean.shape and result.images.dtype == np.float32
    before = np.mean((noisy - clean) ** 2)
    after = np.mean((result.images - clean) ** 2)
    # Exact: the one-step posterior mean halves the MSE; DDIM's ODE path
    # gives 2 - sqrt(2) ~ 0.59 of it.
    assert after < (0.55 if steps == 1 else 0.65) * before, (before, after)


def test_estimate_noise_std_on_real_images(data_dir):
    rng = np.random.default_rng(0)
    for name in ("mnist", "cifar10"):
        images, _ = kd.load_dataset(name, data_dir=data_dir, split="test", limit=64)
        assert np.median(applications.estimate_noise_std(images)) < 0.01
        for sigma in (0.05, 0.1, 0.3):
            noisy = images + sigma * rng.normal(size=images.shape)
            estimate = np.median(applications.estimate_noise_std(noisy))
            assert estimate == pytest.approx(sigma, rel=0.05), (name, sigma)


def test_denoise_estimates_sigma_when_not_given(data_dir):
    images, _ = kd.load_dataset("mnist", data_dir=data_dir, split="test", limit=8)
    noisy = images + 0.2 * np.random.default_rng(0).normal(size=images.shape).astype("float32")
    result = gaussian_model(shape=(28, 28, 1)).denoise(noisy, steps=1)
    assert result.sigma_estimated is True
    assert result.sigma == pytest.approx(0.2, rel=0.1)
    assert result.images.shape == images.shape


# ------------------------------------------------------------------ inpaint
def test_inpaint_keeps_known_pixels_bit_exact():
    # (The CLI tests run inpainting with a real UNet.)
    model = gaussian_model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3,) + SHAPE, dtype=np.uint8)
    mask = rng.random((3,) + SHAPE) > 0.5
    out = model.inpaint(images, mask, steps=3, jump_length=1, resamples=2, seed=0)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[mask], images[mask].astype(np.float32) / 255.0)
    assert np.abs(out[~mask] - images[~mask] / 255.0).max() > 0.05
    floats = images.astype("float32") / 255.0
    center = kd.make_mask("center", floats.shape[1:])
    again = model.inpaint(floats, center, steps=3, jump_length=1, resamples=2, seed=1)
    known = np.broadcast_to(center > 0, floats.shape)
    np.testing.assert_array_equal(again[known], floats[known])
    np.testing.assert_array_equal(
        again, model.inpaint(floats, center, steps=3, jump_length=1, resamples=2, seed=1)
    )


def test_inpaint_fills_with_the_data_distribution():
    # Pixels are independent, so the missing ones must follow N(MU, S^2)
    # whatever the known ones hold (here: far from MU).
    # Every timestep is run, so DDPM's few-step variance loss does not
    # blur the check.
    model = gaussian_model(timesteps=100)
    images = np.full((16,) + SHAPE, 0.1, "float32")
    mask = kd.make_mask("left-half", images.shape)
    out = model.inpaint(images, mask, steps=100, jump_length=10, resamples=2, seed=0)
    missing = out[np.broadcast_to(mask == 0, images.shape)] * 2 - 1
    assert missing.mean() == pytest.approx(MU, abs=0.02)
    assert missing.std() == pytest.approx(S, rel=0.1)


def test_repaint_without_resampling_or_known_pixels_is_ancestral_sampling():
    schedule = kd.DiffusionSchedule("linear", timesteps=100)
    denoiser = gaussian_denoiser(schedule)
    timesteps = samplers.plan_timesteps(schedule, "ddpm", 10)
    t_from, t_to = samplers.repaint_timesteps(timesteps, jump_length=3, resamples=1)
    np.testing.assert_array_equal(t_from, timesteps)
    noise = np.random.default_rng(0).normal(size=(21, 2, 4, 4, 1)).astype("float32")
    x, step_noise = ops.convert_to_tensor(noise[0]), ops.convert_to_tensor(noise[1:11])
    zeros = np.zeros_like(noise[0])
    out = samplers.repaint(
        denoiser, schedule, x, zeros, zeros, noise[11:], step_noise, t_from=t_from, t_to=t_to,
        prediction="epsilon",
    )
    ref = samplers.run_sampler(denoiser, schedule, x, step_noise, timesteps=timesteps,
                               sampler="ddpm", prediction="epsilon")
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(ref), atol=1e-5)


def test_repaint_plan_jumps_back_and_resamples():
    timesteps = np.arange(9, -1, -1) * 10  # 90, 80, ..., 0
    t_from, t_to = samplers.repaint_timesteps(timesteps, jump_length=3, resamples=3)
    reverse = t_to < t_from
    assert t_from[0] == 90 and t_to[-1] == -1
    np.testing.assert_array_equal(t_from[1:], t_to[:-1])  # one continuous path
    # Levels 0, 3 and 6 (indices into the ascending plan) each get 2 extra
    # passes over 3 steps: 10 + 3 * 2 * 3 reverse steps.
    assert reverse.sum() == 10 + 3 * 2 * 3
    assert (~reverse).sum() == 3 * 2 * 3
    assert np.all(np.abs(np.diff(np.searchsorted(-timesteps, -t_from[t_from >= 0]))) == 1)


# ------------------------------------------------------- img2img, inversion
def test_img2img_strength_controls_how_much_changes():
    model = gaussian_model()
    images = np.full((8,) + SHAPE, 0.9, "float32")  # far from the data mean
    weak = model.img2img(images, strength=0.05, steps=5, seed=0)
    strong = model.img2img(images, strength=1.0, steps=10, seed=0)
    assert np.abs(weak - images).mean() < 0.05
    assert (strong * 2 - 1).mean() == pytest.approx(MU, abs=0.03)
    np.testing.assert_array_equal(weak, model.img2img(images, strength=0.05, steps=5, seed=0))


def test_interpolate_between_seeds_and_images():
    model = gaussian_model()
    frames = model.interpolate(1, 2, num=4, steps=10)
    assert frames.shape == (4,) + SHAPE
    # The closed-form denoiser is elementwise, so an image's arithmetic does not
    # depend on the batch it is in; 1e-5 covers slerp's float64 -> float32 ends.
    np.testing.assert_allclose(frames[0], model.generate(1, steps=10, seed=1)[0], atol=1e-5)
    np.testing.assert_allclose(frames[-1], model.generate(1, steps=10, seed=2)[0], atol=1e-5)
    # Image ends go through DDIM inversion and back.
    a, b = gaussian_images(2, seed=5)
    frames = model.interpolate(a, b[np.newaxis], num=3, steps=50)
    np.testing.assert_allclose(frames[0], a, atol=0.03)
    np.testing.assert_allclose(frames[-1], b, atol=0.03)


def test_slerp_keeps_the_norm_and_hits_the_ends():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 64, 64, 1))
    path = applications.slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(path[0], a[0], atol=1e-6)
    np.testing.assert_allclose(path[-1], b[0], atol=1e-6)
    norms = np.linalg.norm(path.reshape(5, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(a), rtol=0.02)


def test_make_mask_shapes():
    center = kd.make_mask("center", (8, 8, 3))
    assert center.shape == (8, 8, 1) and center.sum() == 64 - 16
    assert kd.make_mask("left-half", (2, 8, 8, 1))[:, :, :4].sum() == 0
    random = kd.make_mask("random:0.5", (16, 28, 28, 1), seed=0)
    assert random.mean() == pytest.approx(0.5, abs=0.02)
    assert not np.array_equal(random[0], random[1])


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x: m.inpaint(x, np.ones((7, 8))),
         r"mask shape \(7, 8\) does not match images shape \(2, 8, 8, 1\)"),
        (lambda m, x: m.inpaint(x, np.full((8, 8), 2.0)), r"mask must hold values in \[0, 1\]"),
        (lambda m, x: m.inpaint(x, kd.make_mask("random:1.5", x.shape)), "random:P needs a fraction"),
        (lambda m, x: m.inpaint(x, kd.make_mask("top", x.shape)), "unknown mask 'top'"),
        (lambda m, x: m.inpaint(x, np.ones((8, 8)), jump_length=0), "jump_length must be a positive"),
        (lambda m, x: m.denoise(x, sigma=0.0), r"sigma must be in \(0, 1\]"),
        (lambda m, x: m.denoise(x, sigma=-0.1), r"sigma must be in \(0, 1\]"),
        (lambda m, x: m.denoise(x, sigma=1.5), r"sigma must be in \(0, 1\].*got 1.5"),
        (lambda m, x: m.denoise(x * 255), r"look like \[0, 255\] pixel values"),
        (lambda m, x: m.img2img(x, strength=0.0), r"strength must be in \(0, 1\]; got 0.0"),
        (lambda m, x: m.img2img(x, strength=1.5), r"strength must be in \(0, 1\]"),
        (lambda m, x: m.img2img(x, labels=[0, 1]), "this model is unconditional"),
        (lambda m, x: m.inpaint(x, np.ones((8, 8)), guidance_scale=2.0), "needs a class-conditional"),
        (lambda m, x: m.interpolate(x[0], 3, num=1), "num must be an integer >= 2"),
        (lambda m, x: m.interpolate(x, 3), "a must be one image or an integer seed; got 2 images"),
        (lambda m, x: m.img2img(x[..., 0:0]), r"\(8, 8, 1\) is expected"),
    ],
)
def test_bad_inputs_raise_one_clear_error(call, match):
    images = gaussian_images(2)
    with pytest.raises(ValueError, match=match):
        call(gaussian_model(timesteps=100), images)


def test_unknown_class_name_is_rejected():
    model = gaussian_model(conditional=True, class_names=["low", "mid", "high"])
    with pytest.raises(ValueError, match="unknown class name 'zebra'; accepted: low, mid, high"):
        model.img2img(gaussian_images(1), labels="zebra")
    with pytest.raises(ValueError, match="label 7 is out of range"):
        model.inpaint(gaussian_images(1), np.ones((8, 8)), labels=[7])
