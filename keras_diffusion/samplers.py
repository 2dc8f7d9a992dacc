"""Reverse-process samplers, written once in `keras.ops`.

A sampler takes a *denoiser*: any callable `(x_t, t) -> model output`, where
`x_t` is a `(B, H, W, C)` float32 tensor and `t` a `(B,)` int32 tensor of
training timesteps, and the output is an epsilon, x0 or v prediction as named
by `prediction`. Samplers know nothing of Keras models, so they can be tested
against closed-form denoisers.

On a flow-matching schedule (`FlowMatchSchedule`) the same names run in
sigma: x_t = (1 - sigma) x0 + sigma noise, the plan is float sigmas, `t` is
the float `sigma * timesteps` the network was trained with, and the output is
the velocity (`prediction="flow"`). `"ddim"` (deterministic) is then the
Euler step, which it equals on a straight path; `"ddpm"` (and `"ddim"` with
eta > 0) samples ancestrally from the flow's own Gaussian posteriors; and
`"euler"` re-noises at each step, as diffusers' `stochastic_sampling=True`,
where the schedule says so.

The loop runs through `keras.ops.fori_loop`, so a caller that traces it (a
`jax.jit` or `tf.function`) gets one compiled program. Stochastic samplers
draw all their noise before the loop from one integer seed, which keeps the
loop body free of random state and the result identical whether the loop is
compiled or not.

`SAMPLERS` is the one table of what each sampler is: its loop, whether it is
stochastic, whether it uses Karras sigmas by default, whether it takes `eta`.
Every question about a sampler elsewhere is answered from it. The restoration
loops (RePaint, DDIM inversion) sit at the end of the module, with the DDIM
step they share with the DDIM sampler.

Callers that hold a model go through `keras_diffusion.pipeline`, which turns
the model into a denoiser and compiles the loops.
"""

import dataclasses
from types import MappingProxyType
from typing import Callable

import numpy as np
from keras import ops
from keras import random

from keras_diffusion.checks import check_integer
from keras_diffusion.schedule import check_steps


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What the rest of the library asks of a sampler; one row of `SAMPLERS`.

    Attributes:
        loop: `loop(denoiser, schedule, x, step_noise, *, timesteps,
            prediction, eta, clip_x0) -> x0`, the traceable sampling loop.
        flow_loop: the same on a flow-matching schedule, over sigmas.
        stochastic_on_flow: on a flow schedule, stochastic exactly when
            the schedule says `stochastic_sampling` (the Euler sampler).
        stochastic: adds fresh noise at every step, whatever `eta`.
        karras: spaces its noise levels by Karras 2022 eq. 5 by default.
        takes_eta: accepts the DDIM stochasticity `eta` (noise when > 0).
        stops: its loops take `stop`, to run only a plan's first steps
            (a base model's `denoising_end`, handing its latents on).
    """

    loop: Callable
    stochastic: bool
    karras: bool
    takes_eta: bool
    flow_loop: Callable = None

    stochastic_on_flow: bool = False
    stops: bool = True

    def needs_noise(self, eta, schedule=None):
        """Whether a run with this `eta` (on `schedule`) draws per-step noise."""
        if getattr(schedule, "flow", False) and self.stochastic_on_flow:
            return schedule.stochastic_sampling
        return self.stochastic or (self.takes_eta and eta > 0)


def check_sampler(sampler):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")
    return SAMPLERS[sampler]


def sample(
    denoiser,
    schedule,
    noise,
    sampler="ddim",
    steps=50,
    prediction="epsilon",
    seed=None,
    eta=0.0,
    timestep_spacing=None,
    clip_x0=True,
    start_timestep=None,
    use_karras_sigmas=None,
    mu=None,
):
    """Run the reverse diffusion process from `noise` and return x0.

    Args:
        denoiser: callable `(x_t, t) -> output`.
        schedule: a `DiffusionSchedule`.
        noise: `(B, H, W, C)` starting point, normally standard Gaussian noise
            (or a noised image when `start_timestep` is given).
        sampler: `"ddpm"` (ancestral, Ho 2020 eq. 6-7), `"ddim"` (Song 2021
            eq. 12, stochastic when `eta > 0`), `"euler"` or `"heun"` (Karras
            2022 algorithm 1, first and second order), `"dpmpp_2m"` or
            `"dpmpp_2m_sde"` (DPM-Solver++ 2M and its SDE variant, Lu 2022b;
            good images in 10-20 steps).
        steps: number of noise levels visited, 1 to `schedule.timesteps`;
            one denoiser evaluation each, except `"heun"`, which makes
            `2 * steps - 1` (as diffusers' `HeunDiscreteScheduler`).
        prediction: what the denoiser predicts: `"epsilon"`, `"v"` or `"x0"`.
        seed: integer seed for the noise the stochastic samplers add.
        eta: DDIM stochasticity; 0 is deterministic, 1 matches DDPM's variance.
        timestep_spacing: `"linspace"`, `"leading"` or `"trailing"`, as in
            diffusers; None (the default) is the schedule's own default,
            `"linspace"` unless it names another. `"linspace"` starts at the last
            training timestep, where x_T really is pure noise, and ends at 0;
            `"leading"` starts a step short of it (t = 950 of 1000 at 20
            steps), which Lin et al. 2023 show costs sample quality. On the
            MNIST model of `docs/quality.md` DPM-Solver++ at 20 steps scores
            FID 8.0 leading and 6.4 linspace.
        clip_x0: clip each clean-image estimate, and the result, to
            [-1, 1] (diffusers' `clip_sample`): right for pixels, wrong
            for latents, which have no fixed range.
        start_timestep: when given, `noise` is taken to be x at this timestep
            and only the sampling timesteps at or below it are run (SDEdit,
            denoising).
        use_karras_sigmas: respace the noise levels by Karras 2022 eq. 5
            (denser near the data), for any sampler. None (the default)
            turns it on for `"euler"`, `"heun"` and the DPM-Solver++
            samplers and off for `"ddpm"` and `"ddim"`.
        mu: on a flow schedule that shifts by the image
            (`use_dynamic_shifting`), the shift, e.g. `schedule.mu_for(
            image_seq_len)`.

    On a `FlowMatchSchedule` the denoiser predicts the velocity
    (`prediction="flow"`) and is called with `t = sigma * timesteps`;
    `start_timestep` is then a sigma in (0, 1], and `eta`,
    `timestep_spacing` and Karras sigmas do not apply.

    Returns:
        The final clean-image estimate, `(B, H, W, C)` float32 (in
        [-1, 1] with `clip_x0`).
    """
    timesteps = plan_timesteps(
        schedule, sampler, steps, eta=eta, spacing=timestep_spacing,
        start_timestep=start_timestep, use_karras_sigmas=use_karras_sigmas, mu=mu,
    )
    x = ops.cast(ops.convert_to_tensor(noise), "float32")
    step_noise = draw_step_noise(x.shape, sampler, len(timesteps), eta=eta, seed=seed,
                                 schedule=schedule)
    return run_sampler(
        denoiser, schedule, x, step_noise, timesteps=timesteps, sampler=sampler,
        prediction=prediction, eta=eta, clip_x0=clip_x0,
    )


def plan_timesteps(
    schedule, sampler, steps, *, eta=0.0, spacing=None, start_timestep=None,
    use_karras_sigmas=None, mu=None,
):
    """Validate sampler arguments and return the descending timesteps to run
    (see `sample` for the arguments); on a flow schedule the sigmas, float64
    (`mu`: the dynamic shift of a schedule that shifts by the image)."""
    spec = check_sampler(sampler)
    check_steps(steps, schedule.timesteps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}.")
    if eta and not spec.takes_eta:
        raise ValueError(
            f"eta is a DDIM option; sampler {sampler!r} takes none (got eta={eta!r}). "
            "For a stochastic few-step sampler use 'dpmpp_2m_sde'."
        )
    if getattr(schedule, "flow", False):
        return _plan_sigmas(schedule, sampler, steps, spacing=spacing, start_sigma=start_timestep,
                            use_karras_sigmas=use_karras_sigmas, mu=mu)
    if spacing is None:
        spacing = schedule.default_spacing(sampler)
    if use_karras_sigmas is None:
        use_karras_sigmas = (spec.karras if schedule.use_karras_sigmas is None
                             else schedule.use_karras_sigmas)
    timesteps = schedule.sampling_timesteps(steps, spacing, use_karras_sigmas=use_karras_sigmas)
    if start_timestep is not None:
        timesteps = _timesteps_from(timesteps, start_timestep)
    return timesteps


def _plan_sigmas(schedule, sampler, steps, *, spacing, start_sigma, use_karras_sigmas, mu):
    """A flow schedule's descending sampling sigmas (without the final 0):
    those of diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True)`
    for the DPM-Solver++ samplers, of `FlowMatchEulerDiscreteScheduler` (and
    its Heun twin) for the others."""
    for name, value in (("timestep_spacing", spacing), ("use_karras_sigmas", use_karras_sigmas)):
        if value:
            raise ValueError(f"{name} is an option of DDPM schedules; a flow-matching schedule "
                             f"spaces its sigmas by its shift (got {name}={value!r}).")
    if sampler.startswith("dpmpp"):
        sigmas = schedule.dpm_sigmas(steps, mu=mu)
    else:
        sigmas = schedule.sampling_sigmas(steps, mu=mu)[:-1].astype(np.float64)
    if start_sigma is not None:
        if not 0 < start_sigma <= 1:
            raise ValueError(f"a flow schedule starts from a sigma in (0, 1]; got {start_sigma!r}.")
        sigmas = np.concatenate([[start_sigma], sigmas[sigmas < start_sigma]])
    return sigmas


def plan(timesteps):
    """A plan as the loops take it: int32 timesteps, or a flow schedule's
    float64 sigmas as they are."""
    timesteps = np.asarray(timesteps)
    return timesteps if timesteps.dtype.kind == "f" else timesteps.astype(np.int32)


def draw_step_noise(shape, sampler, num_steps, *, eta, seed, schedule=None):
    """All the noise a stochastic sampler adds, `(num_steps, *shape)`, or
    None for a deterministic one. Drawn up front so the loop stays traceable."""
    if not SAMPLERS[sampler].needs_noise(eta, schedule):
        return None
    return random.normal((num_steps,) + tuple(shape), seed=seed, dtype="float32")


def split_point(schedule, timesteps, fraction):
    """Where a plan splits at `fraction` of the denoising, as diffusers'
    SDXL pipelines split it between base (`denoising_end`) and refiner
    (`denoising_start`): the number of its levels at or above the training
    timestep round(T - fraction * T) (on a flow schedule, of its sigmas
    times T). The base runs the plan's first that many steps, the refiner
    the rest."""
    if not isinstance(fraction, (int, float, np.number)) or isinstance(fraction, bool) \
            or not 0 < fraction < 1:
        raise ValueError(f"a denoising_end / denoising_start must be a fraction in (0, 1); "
                         f"got {fraction!r}.")
    cutoff = int(round(schedule.timesteps - fraction * schedule.timesteps))
    levels = np.asarray(timesteps, np.float64)
    if getattr(schedule, "flow", False):
        levels = levels * schedule.timesteps
    return int(np.sum(levels >= cutoff))


def check_stop(sampler, stop, num_steps):
    """`stop`, the number of a plan's steps to run before handing the noisy
    sample on (None: all, to the clean sample), checked against `sampler`
    and the plan's length."""
    if stop is None:
        return None
    if not check_sampler(sampler).stops:
        accepted = ", ".join(name for name, spec in SAMPLERS.items() if spec.stops)
        raise ValueError(f"sampler {sampler!r} cannot stop part way (its steps are pairs); "
                         f"one that can: {accepted}.")
    if not 0 < stop <= num_steps:
        raise ValueError(f"the run would stop after {stop} of its {num_steps} steps; it "
                         f"must take at least one.")
    return None if stop == num_steps else int(stop)


def run_sampler(denoiser, schedule, x, step_noise=None, *, timesteps, sampler, prediction,
                eta=0.0, clip_x0=True, stop=None):
    """The sampling loop itself, free of validation and randomness: safe to
    trace inside `jax.jit` or `tf.function`. `step_noise` is what
    `draw_step_noise` drew (None for a deterministic run). `stop` (see
    `check_stop`): run only the first `stop` steps and return the sample at
    the noise level they reach, `timesteps[stop]`, in the space the loops
    start from (x_t; unclipped), so that a run over `timesteps[stop:]`
    finishes it."""
    spec = SAMPLERS[sampler]
    if not spec.needs_noise(eta, schedule):
        step_noise = None
    elif step_noise is None:
        raise ValueError(f"sampler {sampler!r} needs step_noise; draw it with draw_step_noise.")
    loop = spec.flow_loop if getattr(schedule, "flow", False) else spec.loop
    stopping = {} if stop is None else {"stop": stop}
    return loop(denoiser, schedule, x, step_noise, timesteps=plan(timesteps),
                prediction=prediction, eta=eta, clip_x0=clip_x0, **stopping)


def _end(x, clip_x0, stop):
    """A loop's result: the clean sample (clipped as `_clip`), or after a
    `stop` the noisy sample as it is."""
    return x if stop is not None else _clip(x, clip_x0)


def _timesteps_from(timesteps, start_timestep):
    """Keep the sampling timesteps at or below `start_timestep`, starting
    exactly there so the first step sees the noise level it was given."""
    lower = timesteps[timesteps < start_timestep]
    return np.concatenate([[start_timestep], lower]).astype(np.int32)


def run_ddim_from(denoiser, schedule, x, start_timestep, *, plan, prediction, clip_x0=True):
    """Deterministic DDIM from `x` at `start_timestep`, an int32 scalar
    *tensor*: a noise level known only at run time, as in an exported
    model's `denoise`. `plan(t)` gives the descending timesteps (numpy)
    for a start at `t`, e.g. `lambda t: partial_timesteps(t, 10)`; it is
    tabulated for every start, so the steps are exactly those `run_sampler`
    takes over `plan(t)`, in a loop whose length is a tensor."""
    plans = [np.asarray(plan(t), dtype=np.int32) for t in range(schedule.timesteps)]
    width = max(len(p) for p in plans)
    table = np.full((len(plans), width), -1, dtype=np.int32)  # -1 pads past the last step
    for t, p in enumerate(plans):
        table[t, : len(p)] = p
    start = ops.cast(start_timestep, "int32")
    timesteps = ops.take(ops.convert_to_tensor(table), start, axis=0)
    num_steps = ops.take(ops.convert_to_tensor([len(p) for p in plans], dtype="int32"), start)
    return _ddim_loop(
        denoiser, schedule, x, None, timesteps=timesteps, prediction=prediction, eta=0.0,
        clip_x0=clip_x0, num_steps=num_steps,
    )


def run_euler_from(denoiser, schedule, x, start_sigma, *, steps, prediction, clip_x0=True):
    """Euler on a flow schedule from `x` at `start_sigma`, a float32 scalar
    *tensor* known only at run time (an exported `denoise`): the steps of
    `run_sampler` over `partial_sigmas(start_sigma, steps)`, sigma_i =
    start (1 - i / steps), computed in the loop."""
    start = ops.cast(start_sigma, "float32")

    def body(i, x):
        sigma = start * (1.0 - ops.cast(i, "float32") / steps)
        sigma_next = start * (1.0 - ops.cast(i + 1, "float32") / steps)
        return x + (sigma_next - sigma) * _flow_velocity(
            denoiser, schedule, x, sigma, prediction=prediction, clip_x0=clip_x0)

    return _clip(ops.fori_loop(0, steps, body, x), clip_x0)


def _flow_velocity(denoiser, schedule, x, sigma, *, prediction, clip_x0, x0=None):
    """The velocity at scalar sigma, read back from the (clipped) x0
    estimate (`FlowMatchSchedule.velocity`), so that clipping to the pixel
    range steers the step; `x0` when already predicted."""
    if x0 is None:
        x0 = _predict_x0(denoiser, schedule, x, sigma, prediction=prediction, clip_x0=clip_x0)
    return schedule.velocity(x, x0, sigma)


def _ddim_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0,
               num_steps=None, stop=None):
    """Generalised DDIM (Song 2021 eq. 12), one `_ddim_step` per timestep;
    `step_noise` None for the deterministic run (eta = 0).

    `timesteps` may be an int32 tensor of which only the first `num_steps`
    (a tensor too) are run; see `run_ddim_from`.
    """
    ts = ops.convert_to_tensor(timesteps, dtype="int32")
    final = schedule.final_alpha_bar_timestep
    ts_prev = ops.concatenate([ts[1:], ops.full((1,), final, dtype="int32")])
    if num_steps is not None:  # a padded table: -1 follows the last step run
        ts_prev = ops.where(ts_prev < 0, final, ts_prev)

    def body(i, x):
        z = None if step_noise is None else ops.take(step_noise, i, axis=0)
        return _ddim_step(denoiser, schedule, x, ops.take(ts, i), ops.take(ts_prev, i),
                          prediction=prediction, eta=eta, clip_x0=clip_x0, z=z)

    if num_steps is None:
        num_steps = len(timesteps) if stop is None else stop
    return _end(ops.fori_loop(0, num_steps, body, x), clip_x0, stop)


def _clip(x, clip_x0):
    """x clipped to the data range [-1, 1] of pixels, or as it is: latents
    have no fixed range."""
    return ops.clip(x, -1.0, 1.0) if clip_x0 else x


def _ancestral_loop(denoiser, schedule, x, step_noise, **options):
    """DDPM's ancestral sampling (Ho 2020 algorithm 2) is DDIM with eta = 1
    (Song 2021, section 4.1), for any subsequence of timesteps."""
    return _ddim_loop(denoiser, schedule, x, step_noise, **{**options, "eta": 1.0})


def _ddim_step(denoiser, schedule, x, t, t_prev, *, prediction, eta, clip_x0, z):
    """One generalised DDIM update between traced scalar timesteps (Song
    2021 eq. 12 with sigma from eq. 16):

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev).

    With eta = 1 this is the DDPM posterior q(x_prev | x_t, x0) with the
    "fixed small" variance. `z` None: the deterministic step (sigma = 0)."""
    t_batch = ops.full((ops.shape(x)[0],), t, dtype="int32")
    x0 = schedule.predict_x0(x, denoiser(x, t_batch), t_batch, prediction)
    x0 = _clip(x0, clip_x0)
    eps = schedule.predict_epsilon(x, x0, t_batch, "x0")
    a, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x_prev = ops.sqrt(a_prev) * x0
    if z is None:
        return x_prev + ops.sqrt(1.0 - a_prev) * eps
    sigma = eta * ops.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    direction = ops.sqrt(ops.maximum(1.0 - a_prev - sigma**2, 0.0))
    return x_prev + direction * eps + sigma * z


def _predict_x0(denoiser, schedule, x, t, *, prediction, clip_x0, network_time=None):
    """The clean-image estimate at scalar timestep `t` (a traced int32), or
    on a flow schedule at sigma `t` (a traced float32), where the network
    is called with `network_time` (default `sigma * timesteps`)."""
    if getattr(schedule, "flow", False):
        sigma = ops.full((ops.shape(x)[0],), t, dtype="float32")
        time = (schedule.network_time(sigma) if network_time is None
                else ops.full((ops.shape(x)[0],), network_time, dtype="float32"))
        return _clip(schedule.predict_x0(x, denoiser(x, time), sigma), clip_x0)
    t_batch = ops.full((ops.shape(x)[0],), t, dtype="int32")
    x0 = schedule.predict_x0(x, denoiser(x, t_batch), t_batch, prediction)
    return _clip(x0, clip_x0)


def _table(values, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(values).astype(dtype))


def _euler_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0,
                stop=None):
    """Euler steps of the probability-flow ODE in sigma space (Karras 2022
    algorithm 1 without the Heun correction): with y = x_t / sqrt(a) and
    d = (y - x0) / sigma (eq. 3 for sigma(t) = t), y_next = y + (sigma_next - sigma) d.
    The last step goes to sigma = 0, where y is the clean image."""
    sigmas = schedule.sigmas(timesteps)
    steps = len(timesteps)
    ts, s, s_next = _table(timesteps, "int32"), _table(sigmas), _table(np.append(sigmas[1:], 0.0))
    scale = _table(1.0 / np.sqrt(1.0 + sigmas**2))  # sqrt(a): y -> x_t

    def body(i, y):
        sigma = ops.take(s, i)
        x0 = _predict_x0(denoiser, schedule, y * ops.take(scale, i), ops.take(ts, i),
                         prediction=prediction, clip_x0=clip_x0)
        return y + (ops.take(s_next, i) - sigma) * (y - x0) / sigma

    y = ops.fori_loop(0, steps if stop is None else stop, body,
                      x * float(np.sqrt(1.0 + sigmas[0] ** 2)))
    if stop is not None:  # back from y = x_t / sqrt(a) to x_t
        return y * float(1.0 / np.sqrt(1.0 + sigmas[stop] ** 2))
    return _clip(y, clip_x0)


def _heun_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0):
    """Heun's second-order method (Karras 2022 algorithm 1, deterministic):
    an Euler step to sigma_next, then the average of the slopes at both ends.
    Between the last noise level and sigma = 0 it takes the Euler step (the
    slope there is undefined), as algorithm 1 and diffusers do, so `steps`
    noise levels cost 2 * steps - 1 denoiser evaluations."""
    sigmas = schedule.sigmas(timesteps)
    ts, s = _table(timesteps, "int32"), _table(sigmas)
    scale = _table(1.0 / np.sqrt(1.0 + sigmas**2))

    def x0_at(y, i):
        return _predict_x0(denoiser, schedule, y * ops.take(scale, i), ops.take(ts, i),
                           prediction=prediction, clip_x0=clip_x0)

    def body(i, y):
        sigma, sigma_next = ops.take(s, i), ops.take(s, i + 1)
        slope = (y - x0_at(y, i)) / sigma
        y_euler = y + (sigma_next - sigma) * slope
        slope_next = (y_euler - x0_at(y_euler, i + 1)) / sigma_next
        return y + (sigma_next - sigma) * 0.5 * (slope + slope_next)

    last = len(timesteps) - 1
    y = ops.fori_loop(0, last, body, x * float(np.sqrt(1.0 + sigmas[0] ** 2)))
    return _clip(x0_at(y, last), clip_x0)


def _flow_ddim_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0,
                    stop=None):
    """Generalised DDIM (Song 2021 eq. 12) on the flow's path x = alpha x0 +
    sigma noise, alpha = 1 - sigma:

        x_next = alpha_next x0 + sqrt(sigma_next^2 - c^2) eps + c z,
        c = eta sigma_next sqrt(1 - r^2),  r = alpha sigma_next / (alpha_next sigma),

    with eps = (x - alpha x0) / sigma; c^2 is the variance of q(x_next | x,
    x0), so eta = 1 is ancestral sampling (`"ddpm"`) and eta = 0 the
    deterministic step, which on this straight path is exactly Euler's."""
    if step_noise is None:
        return _flow_euler_loop(denoiser, schedule, x, None, timesteps=timesteps,
                                prediction=prediction, eta=0.0, clip_x0=clip_x0, stop=stop)
    sigmas = np.asarray(timesteps, np.float32)
    s, s_next = _table(sigmas), _table(np.append(sigmas[1:], 0.0))

    def body(i, x):
        return _flow_ddim_step(denoiser, schedule, x, ops.take(s, i), ops.take(s_next, i),
                               prediction=prediction, eta=eta, clip_x0=clip_x0,
                               z=ops.take(step_noise, i, axis=0))

    return _end(ops.fori_loop(0, len(sigmas) if stop is None else stop, body, x), clip_x0,
                stop)


def _flow_ddim_step(denoiser, schedule, x, sigma, sigma_next, *, prediction, eta, clip_x0, z):
    """One step of `_flow_ddim_loop` between traced scalar sigmas; RePaint
    takes it on a flow schedule."""
    x0 = _predict_x0(denoiser, schedule, x, sigma, prediction=prediction, clip_x0=clip_x0)
    eps = (x - (1.0 - sigma) * x0) / sigma
    r = (1.0 - sigma) * sigma_next / ((1.0 - sigma_next) * sigma)
    c = eta * sigma_next * ops.sqrt(ops.maximum(1.0 - r**2, 0.0))
    direction = ops.sqrt(ops.maximum(sigma_next**2 - c**2, 0.0))
    return (1.0 - sigma_next) * x0 + direction * eps + c * z


def _flow_ancestral_loop(denoiser, schedule, x, step_noise, **options):
    """Ancestral sampling on a flow schedule: its DDIM with eta = 1."""
    return _flow_ddim_loop(denoiser, schedule, x, step_noise, **{**options, "eta": 1.0})


def _flow_euler_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0,
                     stop=None):
    """Euler steps of the flow ODE dx/dsigma = v (diffusers'
    `FlowMatchEulerDiscreteScheduler`), x_next = x + (sigma_next - sigma) v,
    the last to sigma = 0. The velocity is read back from the x0 estimate,
    v = (x - x0) / sigma, so that clipping x0 to the pixel range steers the
    step as it does on a DDPM schedule. With `step_noise`, the stochastic
    variant: x_next = (1 - sigma_next) x0 + sigma_next z."""
    sigmas = np.asarray(timesteps, np.float32)
    s, s_next = _table(sigmas), _table(np.append(sigmas[1:], 0.0))

    def body(i, x):
        sigma, sigma_next = ops.take(s, i), ops.take(s_next, i)
        x0 = _predict_x0(denoiser, schedule, x, sigma, prediction=prediction, clip_x0=clip_x0)
        if step_noise is not None:
            return (1.0 - sigma_next) * x0 + sigma_next * ops.take(step_noise, i, axis=0)
        return x + (sigma_next - sigma) * _flow_velocity(
            denoiser, schedule, x, sigma, prediction=prediction, clip_x0=clip_x0, x0=x0)

    return _end(ops.fori_loop(0, len(sigmas) if stop is None else stop, body, x), clip_x0,
                stop)


def _flow_heun_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0):
    """Heun's method on the flow ODE (diffusers' `FlowMatchHeunDiscreteScheduler`):
    an Euler step to sigma_next, then the mean of the velocities at both
    ends; the last step, to sigma = 0, is Euler's, so `steps` sigmas cost
    2 * steps - 1 network calls."""
    sigmas = np.asarray(timesteps, np.float32)
    s = _table(sigmas)

    def slope(x, sigma):
        return _flow_velocity(denoiser, schedule, x, sigma, prediction=prediction,
                              clip_x0=clip_x0)

    def body(i, x):
        sigma, sigma_next = ops.take(s, i), ops.take(s, i + 1)
        first = slope(x, sigma)
        second = slope(x + (sigma_next - sigma) * first, sigma_next)
        return x + (sigma_next - sigma) * 0.5 * (first + second)

    last = len(sigmas) - 1
    x = ops.fori_loop(0, last, body, x)
    x0 = _predict_x0(denoiser, schedule, x, ops.take(s, last), prediction=prediction,
                     clip_x0=clip_x0)
    return _clip(x0, clip_x0)


def _flow_dpmpp_2m_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta,
                        clip_x0, stop=None):
    """DPM-Solver++(2M) on a flow schedule, as diffusers'
    `DPMSolverMultistepScheduler(use_flow_sigmas=True)`: alpha = 1 - sigma
    and sigma as they are in x_t = alpha x0 + sigma noise, the network
    called at the whole timesteps floor(sigma N) that scheduler hands it."""
    sigmas = np.asarray(timesteps, np.float64)
    sigmas_next = np.append(sigmas[1:], 0.0)
    times = np.floor(sigmas * schedule.timesteps)
    sigmas, sigmas_next = sigmas.astype(np.float32), sigmas_next.astype(np.float32)
    tables = _dpmpp_2m_coefficients(1.0 - sigmas.astype(np.float64), sigmas.astype(np.float64),
                                    1.0 - sigmas_next.astype(np.float64),
                                    sigmas_next.astype(np.float64), sde=step_noise is not None)
    return _multistep(denoiser, schedule, x, step_noise, tables, _table(sigmas), _table(times),
                      prediction=prediction, clip_x0=clip_x0, stop=stop)


def _dpmpp_2m_tables(schedule, timesteps, sde):
    """Per-step coefficients of DPM-Solver++(2M) (Lu 2022b, algorithm 2 and
    eq. 8-9; the SDE variant from its appendix, as diffusers'
    `sde-dpmsolver++` with the midpoint rule). Each step is

        x_next = ratio x + gain (w_now x0_now + w_prev x0_prev) + noise_std z

    with alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma) and
    h = lambda_next - lambda:
      ODE: ratio = sigma_next / sigma,          gain = alpha_next (1 - e^-h)
      SDE: ratio = sigma_next / sigma e^-h,     gain = alpha_next (1 - e^-2h),
           noise_std = sigma_next sqrt(1 - e^-2h)
    and the second-order weights w_now = 1 + 1/(2r), w_prev = -1/(2r) with
    r = h_prev / h. The first step has no previous estimate and the last
    (to sigma = 0, where lambda = inf) is first order, as in diffusers with
    `final_sigmas_type="zero"`; both use w_now = 1, w_prev = 0."""
    alpha, sigma = schedule.alphas_sigmas(timesteps)
    return _dpmpp_2m_coefficients(alpha, sigma, *schedule.alphas_sigmas(
        np.append(timesteps[1:], -1)), sde=sde)


def _dpmpp_2m_coefficients(alpha, sigma, alpha_next, sigma_next, sde):
    """`_dpmpp_2m_tables` from the (alpha, sigma) of each step and of the
    next (float64; the last next is (1, 0), no noise)."""
    with np.errstate(divide="ignore"):
        lam, lam_next = np.log(alpha / sigma), np.log(alpha_next / sigma_next)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam_next - lam
        decay = np.exp(-h) if not sde else np.exp(-2.0 * h)  # 0 on the last step
        ratio = sigma_next / sigma * (np.exp(-h) if sde else 1.0)
        gain = alpha_next * (1.0 - decay)
        noise_std = sigma_next * np.sqrt(1.0 - decay) if sde else np.zeros_like(h)
        r = np.concatenate([[np.inf], h[:-1] / h[1:]])
        w_prev = -0.5 / r
    w_prev[0] = w_prev[-1] = 0.0
    ratio[-1], noise_std[-1] = 0.0, 0.0
    return [_table(v) for v in (ratio, gain, 1.0 - w_prev, w_prev, noise_std)]


def _dpmpp_2m_loop(denoiser, schedule, x, step_noise, *, timesteps, prediction, eta, clip_x0,
                   stop=None):
    """DPM-Solver++(2M) (Lu 2022b): a multistep exponential integrator on
    the data prediction; the previous x0 estimate rides in the loop state.
    With `step_noise` it is the SDE variant, drawing z from it."""
    tables = _dpmpp_2m_tables(schedule, timesteps, sde=step_noise is not None)
    return _multistep(denoiser, schedule, x, step_noise, tables, _table(timesteps, "int32"),
                      prediction=prediction, clip_x0=clip_x0, stop=stop)


def _multistep(denoiser, schedule, x, step_noise, tables, ts, times=None, *, prediction, clip_x0,
               stop=None):
    """The DPM-Solver++(2M) loop over its coefficient `tables`, at levels
    `ts` (timesteps, or sigmas with the network's `times`)."""
    ratio, gain, w_now, w_prev, noise_std = tables

    def body(i, state):
        x, x0_prev = state
        x0 = _predict_x0(denoiser, schedule, x, ops.take(ts, i), prediction=prediction,
                         clip_x0=clip_x0,
                         network_time=None if times is None else ops.take(times, i))
        estimate = ops.take(w_now, i) * x0 + ops.take(w_prev, i) * x0_prev
        x_next = ops.take(ratio, i) * x + ops.take(gain, i) * estimate
        if step_noise is not None:
            x_next = x_next + ops.take(noise_std, i) * ops.take(step_noise, i, axis=0)
        return x_next, x0

    x, _ = ops.fori_loop(0, ts.shape[0] if stop is None else stop, body, (x, ops.zeros_like(x)))
    return _end(x, clip_x0, stop)


# The table every question about a sampler is answered from. The multistep
# solvers default to Karras sigmas: on uniformly spaced timesteps their steps
# in lambda grow sharply near t = 0 and they lose much of their accuracy
# (measured in tests/test_fast_samplers.py). `ddpm` accepts eta and ignores
# it: ancestral sampling is eta = 1.
SAMPLERS = MappingProxyType({
    "ddpm": Sampler(_ancestral_loop, stochastic=True, karras=False, takes_eta=True,
                    flow_loop=_flow_ancestral_loop),
    "ddim": Sampler(_ddim_loop, stochastic=False, karras=False, takes_eta=True,
                    flow_loop=_flow_ddim_loop),
    "euler": Sampler(_euler_loop, stochastic=False, karras=True, takes_eta=False,
                     flow_loop=_flow_euler_loop, stochastic_on_flow=True),
    "heun": Sampler(_heun_loop, stochastic=False, karras=True, takes_eta=False,
                    flow_loop=_flow_heun_loop, stops=False),
    "dpmpp_2m": Sampler(_dpmpp_2m_loop, stochastic=False, karras=True, takes_eta=False,
                        flow_loop=_flow_dpmpp_2m_loop),
    "dpmpp_2m_sde": Sampler(_dpmpp_2m_loop, stochastic=True, karras=True, takes_eta=False,
                            flow_loop=_flow_dpmpp_2m_loop),
})


# ----------------------------------------------------------------------------
# Restoration loops: RePaint inpainting and DDIM inversion (issue 3). Used by
# `keras_diffusion.applications`; like the samplers above they are pure
# keras.ops over a denoiser, with all noise passed in, so a model can compile them.
# ----------------------------------------------------------------------------
def partial_timesteps(start_timestep, steps):
    """`steps` descending timesteps evenly spaced from `start_timestep` down
    to 0 (fewer when that range holds fewer integers): the plan for a reverse
    process that starts part-way, from an image noised to `start_timestep`
    (denoising, SDEdit)."""
    ts = np.unique(np.round(np.linspace(int(start_timestep), 0, steps)).astype(np.int32))
    return ts[::-1].copy()


def partial_sigmas(start_sigma, steps):
    """`steps` descending sigmas evenly spaced from `start_sigma` (the last
    step goes on to 0): a flow schedule's `partial_timesteps`."""
    return np.linspace(float(start_sigma), 0.0, steps + 1)[:-1]


def partial_levels(schedule, start, steps):
    """`partial_timesteps` on a DDPM schedule, `partial_sigmas` on a flow one."""
    if getattr(schedule, "flow", False):
        return partial_sigmas(start, steps)
    return partial_timesteps(start, steps)


def repaint_timesteps(timesteps, jump_length=10, resamples=10):
    """RePaint's resampling plan (Lugmayr 2022, section 4.2 and the authors'
    `get_schedule_jump`) over descending sampling `timesteps`.

    Returns `(t_from, t_to)`, int32 arrays with one entry per transition. A
    transition with `t_to < t_from` is a reverse step (`t_to = -1`: the last
    one, to the clean image); one with `t_to > t_from` is a forward jump of
    one sampling step. After every `jump_length` reverse steps the plan goes
    back up `jump_length` steps, `resamples - 1` times, so it makes about
    `len(timesteps) * resamples` reverse steps; `resamples=1` is plain sampling.
    """
    check_integer("jump_length", jump_length)
    check_integer("resamples", resamples)
    n = len(timesteps)
    timesteps = plan(timesteps)  # a flow schedule's sigmas end at 0, timesteps at -1
    final = 0.0 if timesteps.dtype.kind == "f" else -1
    levels = np.append(timesteps[::-1], final).astype(timesteps.dtype)  # index -1 -> final
    jumps = {k: resamples - 1 for k in range(0, n - jump_length, jump_length)}
    k, path = n - 1, [n - 1]
    while k >= 0:
        k -= 1
        path.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                path.append(k)
    path = levels[np.array(path)]
    return path[:-1].copy(), path[1:].copy()


def repaint(denoiser, schedule, x, known, mask, jump_noise, step_noise, *, t_from, t_to,
            prediction, eta=1.0, clip_x0=True):
    """Inpaint by RePaint (Lugmayr 2022, algorithm 1) from `x` at `t_from[0]`.

    Reverse steps are generalised DDIM steps (eta = 1: DDPM, as in the
    paper) whose known pixels are replaced by the known image noised to the
    new level: x_prev = m q(x_prev | known) + (1 - m) p(x_prev | x_t). A run
    of forward jumps is drawn in one go with `schedule.renoise`, which has
    the law of the one-step forward noisings composed; so each loop
    iteration is "jump (often by zero steps), then one reverse step", with no
    branch for a compiler to trace.

    Args:
        known: `(B, H, W, C)` image in [-1, 1]; only its known pixels matter.
        mask: broadcastable to `known`, 1 where pixels are known, 0 elsewhere.
        t_from, t_to: the transitions of `repaint_timesteps`.
        jump_noise, step_noise: `(R, B, H, W, C)` standard normal, R the
            number of reverse steps (`sum(t_to < t_from)`). One step-noise
            draw serves both regions: the known pixels' renoising and the
            unknown pixels' DDPM noise touch disjoint pixels.

    Returns:
        x0 (in [-1, 1] with `clip_x0`); the caller composites the known
        pixels exactly.
    """
    plan = _repaint_steps(t_from, t_to)
    flow = getattr(schedule, "flow", False)
    level_dtype = "float32" if flow else "int32"
    step = _flow_ddim_step if flow else _ddim_step
    starts, ts, ts_prev = (ops.convert_to_tensor(levels, dtype=level_dtype) for levels in plan)
    x = ops.cast(ops.convert_to_tensor(x), "float32")
    jump_noise = ops.convert_to_tensor(jump_noise, dtype="float32")
    step_noise = ops.convert_to_tensor(step_noise, dtype="float32")
    known, mask = ops.cast(known, "float32"), ops.cast(mask, "float32")
    batch = ops.shape(x)[0]

    def body(i, x):
        t, t_prev = ops.take(ts, i), ops.take(ts_prev, i)
        z = ops.take(step_noise, i, axis=0)
        # A zero-step jump is exact: a / a == 1, so x is kept as it is.
        x = schedule.renoise(x, ops.take(jump_noise, i, axis=0), ops.take(starts, i), t)
        x_prev = step(denoiser, schedule, x, t, t_prev, prediction=prediction, eta=eta,
                            clip_x0=clip_x0, z=z)
        known_prev = schedule.add_noise(known, z, ops.full((batch,), t_prev, dtype=level_dtype))
        return mask * known_prev + (1.0 - mask) * x_prev

    return _clip(ops.fori_loop(0, len(plan[0]), body, x), clip_x0)


def _repaint_steps(t_from, t_to):
    """Fold a RePaint plan into reverse steps: for each, the level x is at,
    the level the forward jumps before it reach, and the level it steps to."""
    t_from, t_to = plan(t_from), plan(t_to)
    starts, ts, ts_prev = [], [], []
    level = t_from[0]
    for t, t_next in zip(t_from, t_to):
        if t_next < t:
            starts.append(level)
            ts.append(t)
            ts_prev.append(t_next)
            level = t_next
    return tuple(np.array(levels, t_from.dtype) for levels in (starts, ts, ts_prev))


def invert(denoiser, schedule, x0, *, timesteps, prediction):
    """`ddim_invert` on a DDPM schedule, `flow_invert` on a flow one."""
    run = flow_invert if getattr(schedule, "flow", False) else ddim_invert
    return run(denoiser, schedule, x0, timesteps=timesteps, prediction=prediction)


def flow_invert(denoiser, schedule, x0, *, timesteps, prediction):
    """The flow ODE run forwards: Euler steps up from sigma = 0 through the
    descending sampling sigmas `timesteps`, read backwards, to the noise the
    Euler sampler maps back to (about) `x0`; each step takes the velocity
    where it starts."""
    x0 = ops.cast(ops.convert_to_tensor(x0), "float32")
    batch = ops.shape(x0)[0]
    levels = _table(np.append(0.0, np.asarray(timesteps, np.float64)[::-1]))

    def body(i, x):
        sigma, up = ops.take(levels, i), ops.take(levels, i + 1)
        time = schedule.network_time(ops.full((batch,), sigma, dtype="float32"))
        return x + (up - sigma) * ops.cast(denoiser(x, time), "float32")

    return ops.fori_loop(0, len(timesteps), body, x0)


def ddim_invert(denoiser, schedule, x0, *, timesteps, prediction):
    """Deterministic DDIM run backwards (Song 2021 section 4.3): climb from
    the clean `x0` up the descending sampling `timesteps` to the x_T that
    DDIM with eta = 0 maps back to (about) `x0`.

    Each step predicts epsilon at the level it climbs to and moves along it,
    x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps (eq. 12 solved for x_t), the
    approximation diffusers' `DDIMInverseScheduler` makes.
    """
    x0 = ops.cast(ops.convert_to_tensor(x0), "float32")
    batch = ops.shape(x0)[0]
    ascending = np.asarray(timesteps, dtype=np.int32)[::-1]
    ts = ops.convert_to_tensor(ascending.copy(), dtype="int32")
    ts_prev = ops.convert_to_tensor(np.append(-1, ascending[:-1]).astype(np.int32), dtype="int32")

    def body(i, x):
        t = ops.full((batch,), ops.take(ts, i), dtype="int32")
        t_prev = ops.full((batch,), ops.take(ts_prev, i), dtype="int32")
        eps = schedule.predict_epsilon(x, denoiser(x, t), t, prediction)
        return schedule.add_noise(schedule.predict_x0(x, eps, t_prev, "epsilon"), eps, t)

    return ops.fori_loop(0, len(ascending), body, x0)

