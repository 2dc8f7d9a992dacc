"""Samplers against closed-form results.

For Gaussian data x0 ~ N(mu, s^2) the optimal epsilon denoiser is known in
closed form, and every deterministic sampler step is then affine in x; so the
exact output for given noise is A * noise + B, with (A, B) propagated in
float64 below. Stochastic steps add independent Gaussian terms, whose
variance is propagated the same way.
"""

import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import MU
from conftest import S
from conftest import gaussian_denoiser
from keras_diffusion import DiffusionSchedule
from keras_diffusion import backend


def exact_affine(schedule, timesteps, eta=0.0, mu=MU, s=S):
    """Propagate x -> A x + B (+ independent noise of variance V) through the
    generalised DDIM update, in float64."""
    ac = schedule.alphas_cumprod.astype(np.float64)
    A, B, V = 1.0, 0.0, 0.0
    prev = list(timesteps[1:]) + [-1]
    for t, tp in zip(timesteps, prev):
        a, ap = ac[t], (ac[tp] if tp >= 0 else 1.0)
        k = np.sqrt(1 - a) / (a * s**2 + 1 - a)  # eps_hat = k (x - sqrt(a) mu)
        ce, ct = k, -k * np.sqrt(a) * mu
        # x0_hat = (x - sqrt(1-a) eps_hat) / sqrt(a)
        cx0, cx0t = (1 - np.sqrt(1 - a) * ce) / np.sqrt(a), -np.sqrt(1 - a) * ct / np.sqrt(a)
        sigma = eta * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        d = np.sqrt(max(1 - ap - sigma**2, 0.0))
        gain = np.sqrt(ap) * cx0 + d * ce
        offset = np.sqrt(ap) * cx0t + d * ct
        A, B, V = gain * A, gain * B + offset, gain**2 * V + sigma**2
    return A, B, V


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 5, 50])
def test_ddim_is_exact_affine_map(beta_schedule, spacing, steps):
    schedule = DiffusionSchedule(beta_schedule, timesteps=1000)
    noise = np.random.default_rng(0).normal(size=(4, 3, 3, 1)).astype("float32")
    out = kd.sample(gaussian_denoiser(schedule), schedule, noise, sampler="ddim", steps=steps,
                    timestep_spacing=spacing, clip_x0=False)
    A, B, _ = exact_affine(schedule, schedule.sampling_timesteps(steps, spacing))
    # float32 steps against the float64 map: up to 50 steps of ~1e-6 rounding each.
    # Without clip_x0 nothing is clipped, the result neither: it is the map itself
    # (beyond [-1, 1] for a few steps of "leading", whose last step is not t = 0).
    np.testing.assert_allclose(ops.convert_to_numpy(out), A * noise + B, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_clip_x0_clips_estimates_and_result(sampler):
    # A denoiser sure that x0 = 3 everywhere: out of the pixel range, where a
    # latent may well be.
    schedule = DiffusionSchedule("cosine", timesteps=100)
    noise = np.random.default_rng(0).normal(size=(2, 2, 2, 1)).astype("float32")

    def denoiser(x, t):
        return ops.full(ops.shape(x), 3.0)

    for clip, expected in ((False, 3.0), (True, 1.0)):
        out = kd.sample(denoiser, schedule, noise, sampler=sampler, steps=5, prediction="x0",
                        clip_x0=clip)
        np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-4)


def test_ddim_with_many_steps_recovers_the_gaussian():
    schedule = DiffusionSchedule("linear", timesteps=1000)
    A, B, _ = exact_affine(schedule, schedule.sampling_timesteps(1000))
    # The probability-flow ODE maps N(0, 1) to the data distribution; 1000
    # DDIM steps discretise it finely enough to be within 1% of (mu, s).
    assert B == pytest.approx(MU, rel=0.01)
    assert A == pytest.approx(S, rel=0.01)
    noise = np.random.default_rng(1).normal(size=(256, 8, 8, 1)).astype("float32")
    # Compiled, as models sample: 1000 steps op by op take 15 s in eager TensorFlow.
    run = backend.current().compile_function(
        lambda x: kd.sample(gaussian_denoiser(schedule), schedule, x, steps=1000, clip_x0=False))
    out = ops.convert_to_numpy(run(noise))
    assert out.mean() == pytest.approx(MU, abs=0.005)
    assert out.std() == pytest.approx(S, rel=0.02)


def test_ddim_matches_diffusers_ddim_scheduler():
    # diffusers 0.42.1: DDIMScheduler(1000, beta_schedule="linear", clip_sample=False,
    # set_alpha_to_one=True), set_timesteps(10), stepped with the same closed-form
    # epsilon denoiser (mu=0.3, s=0.2) from noise = linspace(-2, 2, 8).
    expected = [0.090168, 0.149973, 0.209777, 0.269582, 0.329386, 0.389191, 0.448995, 0.5088]
    schedule = DiffusionSchedule("linear", timesteps=1000)
    noise = np.linspace(-2, 2, 8).reshape(2, 2, 2, 1).astype("float32")
    out = kd.sample(gaussian_denoiser(schedule), schedule, noise, sampler="ddim", steps=10,
                    timestep_spacing="leading", clip_x0=False)
    np.testing.assert_allclose(ops.convert_to_numpy(out).ravel(), expected, atol=1e-5)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_stochastic_samplers_match_exact_moments(sampler, eta):
    schedule = DiffusionSchedule("cosine", timesteps=1000)
    steps = 20
    noise = np.random.default_rng(2).normal(size=(512, 8, 8, 1)).astype("float32")
    out = ops.convert_to_numpy(kd.sample(gaussian_denoiser(schedule), schedule, noise, sampler=sampler,
                                         steps=steps, eta=eta, seed=3, clip_x0=False))
    A, B, V = exact_affine(schedule, schedule.sampling_timesteps(steps), eta=1.0 if sampler == "ddpm" else eta)
    n = out.size  # 32768 independent values: standard error of the mean ~ 0.001
    assert out.mean() == pytest.approx(B, abs=4 * np.sqrt(A**2 + V) / np.sqrt(n))
    assert out.std() == pytest.approx(np.sqrt(A**2 + V), rel=0.02)


def test_seeded_sampling_is_reproducible():
    schedule = DiffusionSchedule("linear", timesteps=100)
    noise = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype("float32")
    den = gaussian_denoiser(schedule)
    first = ops.convert_to_numpy(kd.sample(den, schedule, noise, sampler="ddpm", steps=10, seed=7))
    again = ops.convert_to_numpy(kd.sample(den, schedule, noise, sampler="ddpm", steps=10, seed=7))
    other = ops.convert_to_numpy(kd.sample(den, schedule, noise, sampler="ddpm", steps=10, seed=8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_prediction_types_give_the_same_trajectory(prediction):
    schedule = DiffusionSchedule("linear", timesteps=1000)
    eps_denoiser = gaussian_denoiser(schedule)

    def converted(x_t, t):
        eps = eps_denoiser(x_t, t)
        x0 = schedule.predict_x0(x_t, eps, t, "epsilon")
        return schedule.target(x0, eps, t, prediction)

    noise = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype("float32")
    ref = kd.sample(eps_denoiser, schedule, noise, steps=10, clip_x0=False)
    out = kd.sample(converted, schedule, noise, steps=10, prediction=prediction, clip_x0=False)
    # Converting to v or x0 and back rounds in float32, and the x0 estimate at
    # t = 999 divides by sqrt(alpha_bar) ~ 6e-3: ~1e-5 per step over 10 steps.
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(ref), atol=1e-4)


def test_output_is_clipped_to_model_range():
    schedule = DiffusionSchedule("linear", timesteps=100)
    noise = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype("float32")
    out = ops.convert_to_numpy(kd.sample(gaussian_denoiser(schedule, mu=3.0), schedule, noise, steps=5))
    assert out.max() <= 1.0 and out.min() >= -1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sampler": "plms"}, "sampler must be one of .*got 'plms'"),
        ({"steps": 0}, r"steps must be an integer from 1 to the schedule's timesteps \(100\); got 0"),
        ({"steps": 101}, "got 101"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"prediction": "score"}, "prediction must be one of epsilon, v, x0"),
    ],
)
def test_bad_arguments(kwargs, match):
    schedule = DiffusionSchedule("linear", timesteps=100)
    with pytest.raises(ValueError, match=match):
        kd.sample(gaussian_denoiser(schedule), schedule, np.zeros((1, 2, 2, 1), "float32"), **kwargs)


def test_ddim_from_a_start_known_only_at_run_time():
    """The loop an exported `denoise` runs, whose start is a tensor, takes
    exactly the steps `run_sampler` takes over the plan for that start."""
    from keras_diffusion import samplers

    schedule = DiffusionSchedule("cosine", timesteps=100)
    denoiser = gaussian_denoiser(schedule)
    x = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(2, 4, 4, 1)), "float32")

    def plan(start):
        return samplers.partial_timesteps(start, 4)

    for start in (0, 2, 37, 99):
        expected = samplers.run_sampler(
            denoiser, schedule, x, timesteps=plan(start), sampler="ddim", prediction="epsilon"
        )
        got = samplers.run_ddim_from(
            denoiser, schedule, x, ops.convert_to_tensor(start, "int32"), plan=plan,
            prediction="epsilon"
        )
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(expected),
                                   atol=1e-6)
