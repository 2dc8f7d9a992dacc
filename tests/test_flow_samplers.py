"""The samplers on a flow-matching schedule, against diffusers' flow
schedulers run step by step on the same velocity function and the same
noise, and against the closed-form flow of Gaussian data.

For data x0 ~ N(mu, s^2) and x_t = (1 - sigma) x0 + sigma noise the
posterior mean is E[x0 | x_t] = mu + (1 - sigma) s^2 / v (x_t - (1 - sigma) mu)
with v = (1 - sigma)^2 s^2 + sigma^2, so the exact velocity is
(x_t - E[x0 | x_t]) / sigma, and the flow carries noise z to mu + s z
(the marginal's standard deviation sqrt(v) scales x_t - (1 - sigma) mu)."""

from unittest import mock

import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from keras_diffusion import FlowMatchSchedule
from keras_diffusion import samplers

MU, S, N = 0.3, 0.5, 1000


def velocity_numpy(x, t):
    """A smooth, nonlinear velocity field of x and the network time t."""
    t = np.asarray(t, np.float32).reshape(-1, 1, 1, 1) / N
    return np.tanh(0.7 * x + 1.3 * t - 0.4) * (0.5 + t)


def velocity(x, t):
    t = ops.reshape(ops.cast(t, "float32"), (-1, 1, 1, 1)) / N
    return ops.tanh(0.7 * x + 1.3 * t - 0.4) * (0.5 + t)


def gaussian_velocity(x, t):
    # Finite as sigma -> 0 (x_t and its x0 estimate meet), but 0 / 0 at 0.
    sigma = ops.maximum(ops.reshape(ops.cast(t, "float32"), (-1, 1, 1, 1)) / N, 1e-4)
    variance = (1.0 - sigma) ** 2 * S**2 + sigma**2
    x0 = MU + (1.0 - sigma) * S**2 / variance * (x - (1.0 - sigma) * MU)
    return (x - x0) / sigma


def diffusers_run(scheduler, noise, steps, mu=None):
    """diffusers' sampling loop, as its pipelines write it."""
    import torch

    scheduler.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    x = torch.from_numpy(noise)
    for t in scheduler.timesteps:
        v = torch.from_numpy(velocity_numpy(x.numpy(), [float(t)] * len(x)).astype("float32"))
        x = scheduler.step(v, t, x).prev_sample
    return x.numpy()


SCHEDULERS = {
    "euler-shift3": ("euler", dict(shift=3.0), "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "ddim-shift3": ("ddim", dict(shift=3.0), "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "euler-dynamic": ("euler", dict(use_dynamic_shifting=True),
                      "FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True)),
    "heun-shift3": ("heun", dict(shift=3.0), "FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    "dpmpp_2m-shift3": ("dpmpp_2m", dict(shift=3.0), "DPMSolverMultistepScheduler",
                        dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                             flow_shift=3.0)),
    "dpmpp_2m-dynamic": ("dpmpp_2m", dict(use_dynamic_shifting=True),
                         "DPMSolverMultistepScheduler",
                         dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                              use_dynamic_shifting=True)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_each_flow_sampler_equals_its_diffusers_scheduler(name, steps):
    import diffusers

    sampler, ours, reference, theirs = SCHEDULERS[name]
    schedule = FlowMatchSchedule(timesteps=N, **ours)
    noise = np.random.default_rng(steps).standard_normal((2, 3, 3, 2)).astype("float32")
    mu = schedule.mu_for(1024) if schedule.use_dynamic_shifting else None
    expected = diffusers_run(getattr(diffusers, reference)(num_train_timesteps=N, **theirs),
                             noise, steps, mu)
    plan = samplers.plan_timesteps(schedule, sampler, steps, mu=mu)
    out = samplers.run_sampler(velocity, schedule, ops.convert_to_tensor(noise), timesteps=plan,
                               sampler=sampler, prediction="flow", clip_x0=False)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)


def test_the_sde_solver_equals_diffusers_with_the_same_noise():
    import diffusers
    import torch

    schedule = FlowMatchSchedule(shift=3.0)
    steps = 8
    noise = np.random.default_rng(0).standard_normal((2, 2, 2, 1)).astype("float32")
    step_noise = np.random.default_rng(1).standard_normal((steps,) + noise.shape).astype("float32")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
        algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.from_numpy(velocity_numpy(x.numpy(), [float(t)] * 2).astype("float32"))
        x = scheduler.step(v, t, x, variance_noise=torch.from_numpy(step_noise[i])).prev_sample
    plan = samplers.plan_timesteps(schedule, "dpmpp_2m_sde", steps)
    out = samplers.run_sampler(velocity, schedule, ops.convert_to_tensor(noise),
                               ops.convert_to_tensor(step_noise), timesteps=plan,
                               sampler="dpmpp_2m_sde", prediction="flow", clip_x0=False)
    np.testing.assert_allclose(ops.convert_to_numpy(out), x.numpy(), atol=1e-5)


def test_the_stochastic_euler_step_is_diffusers_stochastic_sampling():
    """`"euler"` on a schedule with `stochastic_sampling`: x0 from the
    velocity, then fresh noise at the next sigma, as diffusers' step."""
    import diffusers
    import torch

    schedule = FlowMatchSchedule(shift=3.0, stochastic_sampling=True)
    steps = 5
    noise = np.random.default_rng(0).standard_normal((2, 2, 2, 1)).astype("float32")
    step_noise = np.random.default_rng(1).standard_normal((steps,) + noise.shape).astype("float32")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise)
    for i, t in enumerate(scheduler.timesteps):
        v = velocity_numpy(x.numpy(), [float(t)] * 2).astype("float32")
        # diffusers' step, its draw (randn_tensor) replaced by ours.
        with mock.patch("diffusers.schedulers.scheduling_flow_match_euler_discrete.randn_tensor",
                        lambda *args, **kwargs: torch.from_numpy(step_noise[i])):
            x = scheduler.step(torch.from_numpy(v), t, x).prev_sample
    assert samplers.SAMPLERS["euler"].needs_noise(0.0, schedule)
    assert not samplers.SAMPLERS["euler"].needs_noise(0.0, FlowMatchSchedule(shift=3.0))
    plan = samplers.plan_timesteps(schedule, "euler", steps)
    out = samplers.run_sampler(velocity, schedule, ops.convert_to_tensor(noise),
                               ops.convert_to_tensor(step_noise), timesteps=plan,
                               sampler="euler", prediction="flow", clip_x0=False)
    np.testing.assert_allclose(ops.convert_to_numpy(out), x.numpy(), atol=1e-5)


def flow_error(schedule, sampler, steps):
    """The largest distance of the sampler's map from the exact flow's, from
    where its plan starts: z at sigma_0 (1; 1 - 1/N shifted for DPM-Solver++,
    as diffusers plans it) goes to mu + s (z - (1 - sigma_0) mu) / sqrt(V)."""
    noise = np.linspace(-2.0, 2.0, 9, dtype="float32").reshape(9, 1, 1, 1)
    start = samplers.plan_timesteps(schedule, sampler, steps)[0]
    exact = MU + S * (noise - (1 - start) * MU) / np.sqrt((1 - start) ** 2 * S**2 + start**2)
    out = ops.convert_to_numpy(kd.sample(gaussian_velocity, schedule, noise, sampler=sampler,
                                         steps=steps, prediction="flow", clip_x0=False))
    return np.abs(out - exact).max()


# Measured on shift 3: Euler 0.071 at 40 steps and 0.018 at 160; Heun 0.0029
# at 20; DPM-Solver++ 0.0095 at 40, most of it from calling the network at
# floor(sigma N), as diffusers' DPM scheduler does (0.0013 left at 640 steps).
@pytest.mark.parametrize("sampler, steps, tolerance", [
    ("euler", 160, 0.025), ("ddim", 160, 0.025), ("heun", 20, 0.005), ("dpmpp_2m", 40, 0.015),
])
def test_each_deterministic_sampler_carries_noise_to_the_data(sampler, steps, tolerance):
    assert flow_error(FlowMatchSchedule(shift=3.0), sampler, steps) < tolerance


def test_more_steps_bring_each_sampler_closer_at_its_order():
    """Euler halves its error when the steps double, Heun quarters it
    (measured ratios 2.0 and 3.6-3.9 on shift 1)."""
    schedule = FlowMatchSchedule(shift=1.0)
    for sampler, order in (("euler", 1), ("heun", 2)):
        errors = [flow_error(schedule, sampler, steps) for steps in (10, 20, 40)]
        assert errors[0] / errors[1] > 0.8 * 2**order, (sampler, errors)
        assert errors[1] / errors[2] > 0.8 * 2**order, (sampler, errors)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpmpp_2m_sde", 0.0)])
def test_stochastic_samplers_reach_the_data_moments(sampler, eta):
    """Ancestral steps draw from the flow's Gaussian posteriors around the
    x0 estimate; as the steps shrink the samples take the data's moments.
    Measured std on shift 1 (s = 0.5): DDPM 0.448 / 0.487 / 0.497 at 30 /
    100 / 300 steps, DDIM eta 0.5 0.466 / 0.497 / 0.505, the SDE solver
    0.517 / 0.507 / 0.504."""
    schedule = FlowMatchSchedule(shift=1.0)
    noise = np.random.default_rng(0).standard_normal((4096, 1, 1, 1)).astype("float32")
    out = ops.convert_to_numpy(kd.sample(gaussian_velocity, schedule, noise, sampler=sampler,
                                         steps=300, eta=eta, prediction="flow", clip_x0=False,
                                         seed=3))
    assert out.mean() == pytest.approx(MU, abs=4 * S / np.sqrt(out.size))
    assert out.std() == pytest.approx(S, rel=0.03)


def test_stochastic_euler_shrinks_the_spread_as_diffusers_does():
    """diffusers' `stochastic_sampling` re-noises the posterior mean, not a
    posterior draw, so its samples are narrower than the data (0.32 for
    s = 0.5 at 30 steps); ours does the same, said in the docs."""
    schedule = FlowMatchSchedule(shift=3.0, stochastic_sampling=True)
    noise = np.random.default_rng(0).standard_normal((4096, 1, 1, 1)).astype("float32")
    out = ops.convert_to_numpy(kd.sample(gaussian_velocity, schedule, noise, sampler="euler",
                                         steps=30, prediction="flow", clip_x0=False, seed=3))
    assert out.mean() == pytest.approx(MU, abs=0.03)
    assert 0.25 < out.std() < 0.4


def test_ddpm_options_are_refused_on_a_flow_schedule():
    schedule = FlowMatchSchedule()
    for option, value in (("spacing", "leading"), ("use_karras_sigmas", True)):
        with pytest.raises(ValueError, match="option of DDPM schedules; a flow-matching schedule"):
            samplers.plan_timesteps(schedule, "ddim", 10, **{option: value})
    with pytest.raises(ValueError, match="pass mu"):
        samplers.plan_timesteps(FlowMatchSchedule(use_dynamic_shifting=True), "dpmpp_2m", 10)


def test_inversion_and_euler_undo_each_other():
    """`flow_invert` runs the flow up from the data; Euler brings it back
    (each to first order in the step: 0.019 apart at 200 steps)."""
    schedule = FlowMatchSchedule(shift=1.0)
    x0 = np.linspace(-1.0, 1.0, 6, dtype="float32").reshape(6, 1, 1, 1)
    plan = samplers.plan_timesteps(schedule, "euler", 200)
    noise = samplers.invert(gaussian_velocity, schedule, x0, timesteps=plan, prediction="flow")
    # The exact flow maps x0 to the noise (x0 - mu) / s; back again to x0.
    np.testing.assert_allclose(ops.convert_to_numpy(noise), (x0 - MU) / S, atol=0.02)
    back = samplers.run_sampler(gaussian_velocity, schedule, noise, timesteps=plan,
                                sampler="euler", prediction="flow", clip_x0=False)
    np.testing.assert_allclose(ops.convert_to_numpy(back), x0, atol=0.03)


def test_partial_sigmas_run_evenly_from_the_start_to_zero():
    np.testing.assert_allclose(samplers.partial_sigmas(0.6, 3), [0.6, 0.4, 0.2])
    np.testing.assert_array_equal(samplers.partial_levels(FlowMatchSchedule(), 0.5, 1), [0.5])
