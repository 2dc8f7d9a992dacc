import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion import DiffusionSchedule


def np_(x):
    return ops.convert_to_numpy(x)


# alphas_cumprod at t = 0, 499, 999 from diffusers 0.42.1
# DDPMScheduler(num_train_timesteps=1000, beta_schedule=...).alphas_cumprod.
DIFFUSERS_ALPHAS_CUMPROD = {
    "linear": [0.9998999834060669, 0.07858723402023315, 4.035830352222547e-05],
    "scaled_linear": [0.9998999834060669, 0.3331878185272217, 0.0007334119873121381],
    "cosine": [0.9999586939811707, 0.4938434660434723, 2.4287349909002387e-09],
    "sigmoid": [0.9998508095741272, 0.3019309937953949, 3.9681821363046765e-05],
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_ALPHAS_CUMPROD))
def test_alphas_cumprod_matches_diffusers(name):
    schedule = DiffusionSchedule(name, timesteps=1000)
    values = np.asarray(schedule.alphas_cumprod)
    assert values.shape == (1000,) and values.dtype == np.float32
    np.testing.assert_allclose(values[[0, 499, 999]], DIFFUSERS_ALPHAS_CUMPROD[name], rtol=0, atol=1e-6)
    assert np.all(np.diff(values) < 0)


def test_linear_betas_closed_form():
    schedule = DiffusionSchedule("linear", timesteps=10, beta_start=0.1, beta_end=0.2)
    betas = np.linspace(0.1, 0.2, 10)
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)


def test_cosine_closed_form_and_cap():
    T = 1000
    schedule = DiffusionSchedule("cosine", timesteps=T)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 900)
    # Before the 0.999 cap binds, alpha-bar_t = f((t+1)/T) / f(0) exactly.
    np.testing.assert_allclose(schedule.alphas_cumprod[t], f((t + 1) / T) / f(0), rtol=1e-4)
    assert schedule.betas.max() == pytest.approx(0.999)


def test_add_noise_snr_and_conversions_round_trip():
    schedule = DiffusionSchedule("linear", timesteps=1000)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 2)).astype("float32")
    eps = rng.normal(size=x0.shape).astype("float32")
    t = np.array([0, 500, 999], dtype="int32")
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = np_(schedule.add_noise(x0, eps, t))
    np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_(schedule.snr(t)), (a / (1 - a)).ravel(), rtol=1e-5)
    for prediction in ("epsilon", "v", "x0"):
        target = schedule.target(x0, eps, t, prediction)
        np.testing.assert_allclose(np_(schedule.predict_x0(x_t, target, t, prediction)), x0, atol=2e-3)
        np.testing.assert_allclose(np_(schedule.predict_epsilon(x_t, target, t, prediction)), eps, atol=2e-3)
    v = np_(schedule.target(x0, eps, t, "v"))
    np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-5, atol=1e-6)


def test_min_snr_weights():
    schedule = DiffusionSchedule("linear", timesteps=1000)
    t = np.array([0, 300, 999], dtype="int32")
    snr = np_(schedule.snr(t))
    gamma = 5.0
    np.testing.assert_allclose(np_(schedule.loss_weight(t, "epsilon", gamma)), np.minimum(snr, gamma) / snr, rtol=1e-5)
    np.testing.assert_allclose(np_(schedule.loss_weight(t, "v", gamma)), np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(np_(schedule.loss_weight(t, "x0", gamma)), np.minimum(snr, gamma), rtol=1e-5)
    np.testing.assert_array_equal(np_(schedule.loss_weight(t, "epsilon")), 1.0)


@pytest.mark.parametrize(
    "spacing,expected",
    # diffusers 0.42.1 DDPMScheduler(1000, timestep_spacing=...).set_timesteps(7)
    [
        ("leading", [852, 710, 568, 426, 284, 142, 0]),
        ("trailing", [999, 856, 713, 570, 428, 285, 142]),
        ("linspace", [999, 832, 666, 500, 333, 166, 0]),
    ],
)
def test_sampling_timesteps_match_diffusers(spacing, expected):
    schedule = DiffusionSchedule(timesteps=1000)
    np.testing.assert_array_equal(schedule.sampling_timesteps(7, spacing), expected)


def test_full_step_timesteps_cover_every_step():
    schedule = DiffusionSchedule(timesteps=50)
    for spacing in ("leading", "trailing", "linspace"):
        np.testing.assert_array_equal(schedule.sampling_timesteps(50, spacing), np.arange(49, -1, -1))


def test_alpha_bar_of_negative_timestep_is_one():
    schedule = DiffusionSchedule(timesteps=10)
    np.testing.assert_allclose(np_(schedule.alpha_bar(np.array([-1, 0], "int32"))), [1.0, schedule.alphas_cumprod[0]])


def test_timestep_for_noise_std():
    schedule = DiffusionSchedule("linear", timesteps=1000)
    t = schedule.timestep_for_noise_std(0.4)
    a = schedule.alphas_cumprod[t]
    assert np.sqrt((1 - a) / a) == pytest.approx(0.4, rel=0.02)


def test_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        schedule = DiffusionSchedule()
        x = ops.ones((2, 4, 4, 1), dtype="bfloat16")
        out = schedule.add_noise(x, x, np.array([1, 2], "int32"))
        assert "float32" in str(out.dtype)
        assert schedule.dtype_policy.name == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_serialization_round_trip():
    schedule = DiffusionSchedule("scaled_linear", timesteps=500, beta_start=0.00085, beta_end=0.012)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(clone, DiffusionSchedule)
    assert clone.get_config() == schedule.get_config()
    np.testing.assert_array_equal(clone.alphas_cumprod, schedule.alphas_cumprod)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_schedule": "quadratic"}, "beta_schedule must be one of linear, scaled_linear, cosine, sigmoid; got 'quadratic'"),
        ({"timesteps": 1}, "timesteps must be an integer >= 2; got 1"),
        ({"timesteps": 10.5}, "timesteps must be an integer"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "0 < beta_start < beta_end < 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionSchedule(**kwargs)


def test_bad_prediction_and_steps():
    schedule = DiffusionSchedule(timesteps=100)
    with pytest.raises(ValueError, match="prediction must be one of epsilon, v, x0; got 'noise'"):
        schedule.target(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)), np.zeros(1, "int32"), "noise")
    with pytest.raises(ValueError, match=r"steps must be an integer from 1 to the schedule's timesteps \(100\); got 101"):
        schedule.sampling_timesteps(101)
    with pytest.raises(ValueError, match="timestep_spacing must be one of leading, trailing, linspace"):
        schedule.sampling_timesteps(10, "even")


def test_timestep_for_noise_std_takes_a_tensor():
    """An exported `denoise` matches its sigma input to a timestep in-graph."""
    schedule = DiffusionSchedule("cosine", timesteps=1000)
    for std in (0.05, 0.4, 2.0, 50.0):
        t = schedule.timestep_for_noise_std(ops.convert_to_tensor(std, "float32"))
        assert int(ops.convert_to_numpy(t)) == schedule.timestep_for_noise_std(std)
