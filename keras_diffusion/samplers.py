"""Reverse-process samplers, written once in `keras.ops`.

A sampler takes a *denoiser*: any callable `(x_t, t) -> model output`, where
`x_t` is a `(B, H, W, C)` float32 tensor and `t` a `(B,)` int32 tensor of
training timesteps, and the output is an epsilon, x0 or v prediction as named
by `prediction`. Samplers know nothing of Keras models, so they can be tested
against closed-form denoisers.

The loop runs through `keras.ops.fori_loop`, so a caller that traces it (a
`jax.jit` or `tf.function`) gets one compiled program. Stochastic samplers
draw all their noise before the loop from one integer seed, which keeps the
loop body free of random state and the result identical whether the loop is
compiled or not.
"""

import numpy as np
from keras import ops
from keras import random

from keras_diffusion.schedule import check_steps

SAMPLERS = ("ddpm", "ddim")


def check_sampler(sampler):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")


def sample(
    denoiser,
    schedule,
    noise,
    sampler="ddim",
    steps=50,
    prediction="epsilon",
    seed=None,
    eta=0.0,
    timestep_spacing="leading",
    clip_x0=True,
    start_timestep=None,
):
    """Run the reverse diffusion process from `noise` and return x0 in [-1, 1].

    Args:
        denoiser: callable `(x_t, t) -> output`.
        schedule: a `DiffusionSchedule`.
        noise: `(B, H, W, C)` starting point, normally standard Gaussian noise
            (or a noised image when `start_timestep` is given).
        sampler: `"ddpm"` (ancestral, Ho 2020 eq. 6-7) or `"ddim"`
            (Song 2021 eq. 12, stochastic when `eta > 0`).
        steps: number of denoiser evaluations, 1 to `schedule.timesteps`.
        prediction: what the denoiser predicts: `"epsilon"`, `"v"` or `"x0"`.
        seed: integer seed for the noise the stochastic samplers add.
        eta: DDIM stochasticity; 0 is deterministic, 1 matches DDPM's variance.
        timestep_spacing: `"leading"`, `"trailing"` or `"linspace"`, as in
            diffusers.
        clip_x0: clip each clean-image estimate to [-1, 1] (diffusers'
            `clip_sample`).
        start_timestep: when given, `noise` is taken to be x at this timestep
            and only the sampling timesteps at or below it are run (SDEdit,
            denoising).

    Returns:
        The final clean-image estimate, `(B, H, W, C)` float32 in [-1, 1].
    """
    timesteps = plan_timesteps(schedule, sampler, steps, eta, timestep_spacing, start_timestep)
    x = ops.cast(ops.convert_to_tensor(noise), "float32")
    step_noise = draw_step_noise(x.shape, sampler, len(timesteps), eta, seed)
    return run_sampler(
        denoiser, schedule, x, timesteps, sampler, prediction, eta, clip_x0, step_noise
    )


def plan_timesteps(schedule, sampler, steps, eta=0.0, spacing="leading", start_timestep=None):
    """Validate sampler arguments and return the descending timesteps to run."""
    check_sampler(sampler)
    check_steps(steps, schedule.timesteps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}.")
    timesteps = schedule.sampling_timesteps(steps, spacing)
    if start_timestep is not None:
        timesteps = _timesteps_from(timesteps, start_timestep)
    return timesteps


def draw_step_noise(shape, sampler, num_steps, eta, seed):
    """All the noise a stochastic sampler adds, `(num_steps, *shape)`, or
    None for a deterministic one. Drawn up front so the loop stays traceable."""
    if sampler == "ddim" and eta == 0:
        return None
    return random.normal((num_steps,) + tuple(shape), seed=seed, dtype="float32")


def run_sampler(denoiser, schedule, x, timesteps, sampler, prediction, eta, clip_x0, step_noise):
    """The sampling loop itself, free of validation and randomness: safe to
    trace inside `jax.jit` or `tf.function`."""
    if sampler == "ddpm":
        # Ancestral sampling is DDIM with eta = 1 (Song 2021, section 4.1).
        eta = 1.0
    return _ddim_loop(denoiser, schedule, x, timesteps, prediction, eta, clip_x0, step_noise)


def _timesteps_from(timesteps, start_timestep):
    """Keep the sampling timesteps at or below `start_timestep`, starting
    exactly there so the first step sees the noise level it was given."""
    lower = timesteps[timesteps < start_timestep]
    return np.concatenate([[start_timestep], lower]).astype(np.int32)


def _ddim_loop(denoiser, schedule, x, timesteps, prediction, eta, clip_x0, step_noise):
    """Generalised DDIM update (Song 2021 eq. 12 with sigma from eq. 16):

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev).

    With eta = 1 this is the DDPM posterior q(x_prev | x_t, x0) with the
    "fixed small" variance, for any subsequence of timesteps.
    """
    batch = x.shape[0]
    ts = ops.convert_to_tensor(timesteps, dtype="int32")
    ts_prev = ops.convert_to_tensor(np.append(timesteps[1:], -1), dtype="int32")

    def body(i, x):
        t = ops.take(ts, i)
        t_prev = ops.take(ts_prev, i)
        t_batch = ops.full((batch,), t, dtype="int32")
        output = denoiser(x, t_batch)
        x0 = schedule.predict_x0(x, output, t_batch, prediction)
        if clip_x0:
            x0 = ops.clip(x0, -1.0, 1.0)
        eps = schedule.predict_epsilon(x, x0, t_batch, "x0")
        a = schedule.alpha_bar(t)
        a_prev = schedule.alpha_bar(t_prev)
        x_prev = ops.sqrt(a_prev) * x0
        if step_noise is None:
            return x_prev + ops.sqrt(1.0 - a_prev) * eps
        sigma = eta * ops.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
        direction = ops.sqrt(ops.maximum(1.0 - a_prev - sigma**2, 0.0))
        return x_prev + direction * eps + sigma * ops.take(step_noise, i, axis=0)

    x = ops.fori_loop(0, len(timesteps), body, x)
    return ops.clip(x, -1.0, 1.0)
