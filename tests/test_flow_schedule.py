"""The flow-matching schedule against diffusers' `FlowMatchEulerDiscreteScheduler`
and its SD 3 training utilities, from the same settings: training and
sampling sigmas (fixed and dynamic shifts, a terminal stretch), the
network's timesteps, the interpolation, the timestep densities and the loss
weightings; and the conversions, closed form."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.schedule import FlowMatchSchedule

SETTINGS = [
    {"shift": 1.0},
    {"shift": 3.0},
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.1},
]


def _reference(settings):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **settings)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_sigmas_and_timesteps_are_diffusers(settings):
    reference, ours = _reference(settings), FlowMatchSchedule(**settings)
    np.testing.assert_allclose(ours.training_sigmas, reference.sigmas.numpy(), atol=1e-6)
    mu = ours.mu_for(64 * 64 // 4) if ours.use_dynamic_shifting else None
    for steps in (1, 4, 28):
        reference.set_timesteps(steps, mu=mu)
        sigmas = ours.sampling_sigmas(steps, mu=mu)
        np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), atol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(ours.network_time(sigmas[:-1])),
                                   reference.timesteps.numpy(), atol=1e-3)


def test_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = FlowMatchSchedule(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for tokens in (256, 1024, 4096, 6000):
        assert schedule.mu_for(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-9)


def test_add_noise_is_scale_noise_and_the_conversions_invert_it():
    import torch

    reference, ours = _reference({"shift": 3.0}), FlowMatchSchedule(shift=3.0)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 4, 4, 3)).astype("float32")
    reference.set_timesteps(10)
    timestep = reference.timesteps[[3, 7]]
    expected = reference.scale_noise(torch.from_numpy(x0), timestep, torch.from_numpy(noise))
    sigma = reference.sigmas[[3, 7]].numpy()
    x_t = ours.add_noise(x0, noise, sigma)
    np.testing.assert_allclose(ops.convert_to_numpy(x_t), expected.numpy(), atol=1e-6)
    velocity = ours.target(x0, noise)
    np.testing.assert_allclose(ops.convert_to_numpy(ours.predict_x0(x_t, velocity, sigma)), x0,
                               atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(ours.predict_noise(x_t, velocity, sigma)),
                               noise, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(ours.velocity(x_t, x0, sigma)),
                               ops.convert_to_numpy(velocity), atol=1e-4)
    # One Euler step of diffusers' scheduler is x + (sigma_next - sigma) v.
    step = reference.step(torch.from_numpy(noise - x0), reference.timesteps[0],
                          torch.from_numpy(noise)).prev_sample.numpy()
    sigmas = reference.sigmas.numpy()
    np.testing.assert_allclose(step, noise + (sigmas[1] - sigmas[0]) * (noise - x0), atol=1e-6)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_timestep_densities_are_diffusers(density):
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(0)
    expected = compute_density_for_timestep_sampling(density, 64, logit_mean=0.3, logit_std=1.2,
                                                     mode_scale=1.29).numpy()
    torch.manual_seed(0)
    raw = (torch.randn if density == "logit_normal" else torch.rand)(64).numpy()
    u = FlowMatchSchedule().timestep_density(raw, density, logit_mean=0.3, logit_std=1.2)
    np.testing.assert_allclose(ops.convert_to_numpy(u), expected, atol=1e-6)


def test_drawn_sigmas_are_training_sigmas_and_seeded():
    schedule = FlowMatchSchedule(shift=3.0)
    for density in ("uniform", "logit_normal", "mode"):
        first = ops.convert_to_numpy(schedule.draw_sigmas(256, seed=1, density=density))
        again = ops.convert_to_numpy(schedule.draw_sigmas(256, seed=1, density=density))
        np.testing.assert_array_equal(first, again)
        assert np.isin(first, schedule.training_sigmas).all()
    # logit-normal around 0 puts the mass in the middle; shift 3 moves it up.
    middle = ops.convert_to_numpy(schedule.draw_sigmas(4096, seed=2, density="logit_normal"))
    assert 0.6 < np.median(middle) < 0.8  # shift(0.5) = 0.75


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers(weighting):
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = np.linspace(0.05, 1.0, 9).astype("float32")
    expected = compute_loss_weighting_for_sd3(weighting, torch.from_numpy(sigmas)).numpy()
    ours = FlowMatchSchedule(weighting=weighting).loss_weight(sigmas)
    np.testing.assert_allclose(ops.convert_to_numpy(ours), expected, rtol=1e-6)


def test_config_round_trip_and_bad_settings():
    schedule = FlowMatchSchedule(shift=3.0, use_dynamic_shifting=False, shift_terminal=0.2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        schedule))
    assert isinstance(restored, FlowMatchSchedule) and restored.get_config() == \
        schedule.get_config()
    np.testing.assert_array_equal(restored.sampling_sigmas(5), schedule.sampling_sigmas(5))
    with pytest.raises(ValueError, match="shift must be a positive number; got 0"):
        FlowMatchSchedule(shift=0)
    with pytest.raises(ValueError, match="time_shift_type must be one of exponential, linear"):
        FlowMatchSchedule(time_shift_type="cubic")
    with pytest.raises(ValueError, match=r"shift_terminal must be in \(0, 1\) or None"):
        FlowMatchSchedule(shift_terminal=1.5)
    with pytest.raises(ValueError, match="pass mu, e.g. schedule.mu_for"):
        FlowMatchSchedule(use_dynamic_shifting=True).sampling_sigmas(4)
    with pytest.raises(ValueError, match="density must be one of uniform, logit_normal, mode"):
        schedule.timestep_density(np.zeros(2), "beta")
    with pytest.raises(ValueError, match="weighting must be one of none, sigma_sqrt, cosmap"):
        schedule.weights_for(np.ones(2), "snr")
    with pytest.raises(ValueError, match="weighting must be one of none, sigma_sqrt, cosmap"):
        FlowMatchSchedule(weighting="snr")
    with pytest.raises(ValueError, match="prediction must be 'flow'; got 'epsilon'"):
        schedule.target(np.zeros(2), np.zeros(2), None, "epsilon")


def test_a_noisy_image_is_x_t_at_the_matching_sigma():
    """x0 + std noise, scaled by 1 - sigma with sigma = std / (1 + std), is
    exactly the flow's x_t at sigma."""
    schedule = FlowMatchSchedule()
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 4, 4, 1)).astype("float32")
    for std in (0.1, 0.5, 2.0):
        sigma = schedule.timestep_for_noise_std(std)
        assert sigma == pytest.approx(std / (1 + std))
        x_t = schedule.x_t_from_noisy(x0 + std * noise, sigma)
        expected = schedule.add_noise(x0, noise, np.full((2,), sigma, "float32"))
        np.testing.assert_allclose(ops.convert_to_numpy(x_t), ops.convert_to_numpy(expected),
                                   atol=1e-6)
    tensor = schedule.timestep_for_noise_std(ops.convert_to_tensor(1.0))
    assert float(ops.convert_to_numpy(tensor)) == pytest.approx(0.5)
