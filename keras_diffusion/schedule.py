"""Noise schedules: every formula that involves a noise level lives here.

Notation follows Ho et al. 2020 ("DDPM"): `betas` are the per-step noise
variances, `alphas = 1 - betas` and `alphas_cumprod[t] = prod_{s<=t} alphas[s]`
(written alpha-bar_t in the paper). A clean image `x0` in [-1, 1] is noised to
`x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps` (Ho 2020 eq. 4).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_integer

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v", "x0")
# The "_exclusive" spacings are diffusers' "linspace" and "leading" for its
# multistep solvers (DPMSolverMultistepScheduler): a plan of steps + 1
# timesteps with the last (t = 0, or the offset) dropped, as the solver's
# final step goes to sigma = 0 itself.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "linspace_exclusive",
                     "leading_exclusive")


def _per_example(values, like):
    """A per-example `(B,)` tensor reshaped to broadcast against `like`."""
    return ops.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def _betas(beta_schedule, timesteps, beta_start, beta_end):
    """Per-step betas as float32, built the way diffusers builds them so that
    `alphas_cumprod` agrees with `DDPMScheduler` to float32 rounding."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        # The latent-diffusion schedule: linear in sqrt(beta).
        betas = np.linspace(beta_start**0.5, beta_end**0.5, timesteps) ** 2
    elif beta_schedule == "cosine":
        # Nichol & Dhariwal 2021 eq. 17, betas clipped at 0.999 to avoid a
        # singularity at t = T.
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [
                min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                for i in range(timesteps)
            ]
        )
    else:  # sigmoid (Jabri et al. 2022, as in diffusers' DDPMScheduler)
        u = np.linspace(-6, 6, timesteps)
        betas = 1 / (1 + np.exp(-u)) * (beta_end - beta_start) + beta_start
    return betas.astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="DiffusionSchedule")
class DiffusionSchedule(keras.layers.Layer):
    """A discrete-time diffusion noise schedule.

    Holds no weights; its tables are float32 constants whatever the dtype
    policy, because noise levels near t = 0 and t = T lose their meaning in
    half precision.

    Args:
        beta_schedule: one of `"linear"`, `"scaled_linear"`, `"cosine"`
            (Nichol & Dhariwal, max beta 0.999) or `"sigmoid"`.
        timesteps: number of training timesteps T.
        beta_start: first beta (ignored by `"cosine"`).
        beta_end: last beta (ignored by `"cosine"`).
        steps_offset: added to every timestep of a `"leading"` plan
            (diffusers' `steps_offset`; Stable Diffusion uses 1).
        set_alpha_to_one: whether DDIM's last step goes to alpha-bar = 1 (a
            clean image) or, as diffusers does with `set_alpha_to_one=False`
            (Stable Diffusion), to alpha-bar_0.
        timestep_spacing: the spacing of a sampling plan when a caller names
            none: one name for every sampler, a dict `{sampler: spacing}`
            (diffusers' defaults differ by scheduler class), or None for
            `"linspace"`.
        use_karras_sigmas: the default of the samplers' `use_karras_sigmas`
            when a caller names none; None keeps each sampler's own.

    Timesteps are integers in `[0, timesteps)`. Images are `(B, H, W, C)`
    tensors in [-1, 1]; `t` is a `(B,)` integer tensor.

    Example:

    >>> schedule = DiffusionSchedule("cosine", timesteps=1000)
    >>> x_t = schedule.add_noise(x0, noise, t)
    >>> x0_hat = schedule.predict_x0(x_t, model_output, t, "epsilon")
    """

    def __init__(
        self,
        beta_schedule="cosine",
        timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        steps_offset=0,
        set_alpha_to_one=True,
        timestep_spacing=None,
        use_karras_sigmas=None,
        **kwargs,
    ):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; "
                f"got {beta_schedule!r}."
            )
        check_integer("timesteps", timesteps, low=2)
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(
                "beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1; "
                f"got beta_start={beta_start!r}, beta_end={beta_end!r}."
            )
        check_integer("steps_offset", steps_offset, low=0)
        for spacing in (timestep_spacing.values() if isinstance(timestep_spacing, dict)
                        else [timestep_spacing]):
            if spacing is not None and spacing not in TIMESTEP_SPACINGS:
                raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, "
                                 f"a dict of them by sampler, or None; got {spacing!r}.")
        self.steps_offset = int(steps_offset)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.timestep_spacing = (dict(timestep_spacing) if isinstance(timestep_spacing, dict)
                                 else timestep_spacing)
        self.use_karras_sigmas = None if use_karras_sigmas is None else bool(use_karras_sigmas)
        self.beta_schedule = beta_schedule
        self.timesteps = int(timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.betas = _betas(beta_schedule, self.timesteps, beta_start, beta_end)
        # float32 cumulative product, as torch.cumprod does it in diffusers.
        self.alphas_cumprod = np.cumprod(1.0 - self.betas, dtype=np.float32)
        self.built = True  # no weights to create

    # ------------------------------------------------------------------ lookup
    def alpha_bar(self, t):
        """alpha-bar_t for integer timesteps `t`; `t < 0` means "no noise" (1.0),
        the convention DDIM uses for the step after the last one."""
        t = ops.convert_to_tensor(t, dtype="int32")
        table = ops.convert_to_tensor(self.alphas_cumprod, dtype="float32")
        value = ops.take(table, ops.maximum(t, 0))
        return ops.where(t >= 0, value, ops.ones_like(value))

    def _coefficients(self, t, like):
        a = _per_example(self.alpha_bar(t), like)
        return ops.sqrt(a), ops.sqrt(1.0 - a)

    # ------------------------------------------------------------ forward noise
    def add_noise(self, x0, noise, t):
        """Sample x_t ~ q(x_t | x0) (Ho 2020 eq. 4)."""
        x0 = ops.cast(x0, "float32")
        sqrt_a, sqrt_1ma = self._coefficients(t, x0)
        return sqrt_a * x0 + sqrt_1ma * ops.cast(noise, "float32")

    def call(self, x0, noise, t):
        return self.add_noise(x0, noise, t)

    # The training protocol the model's loss asks of every schedule: draw a
    # noise level per example, noise at it, call the network with it.
    flow = False

    def draw_levels(self, batch_size, seed=None):
        """`(B,)` training timesteps, uniform over `[0, timesteps)` (Ho 2020,
        algorithm 1)."""
        from keras import random

        return random.randint((batch_size,), 0, self.timesteps, dtype="int32", seed=seed)

    def network_time(self, t):
        """What the network is called with at timesteps `t`: `t` itself."""
        return t

    def snr(self, t):
        """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) (Kingma 2021)."""
        a = self.alpha_bar(t)
        return a / (1.0 - a)

    # ------------------------------------------- prediction-type conversions
    def target(self, x0, noise, t, prediction):
        """The regression target for a network trained to predict `prediction`.

        `"v"` is the velocity sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022,
        section 4)."""
        check_prediction(prediction)
        if prediction == "epsilon":
            return ops.cast(noise, "float32")
        if prediction == "x0":
            return ops.cast(x0, "float32")
        sqrt_a, sqrt_1ma = self._coefficients(t, x0)
        return sqrt_a * ops.cast(noise, "float32") - sqrt_1ma * ops.cast(x0, "float32")

    def predict_x0(self, x_t, output, t, prediction):
        """Clean-image estimate from a network output (Ho 2020 eq. 15 for
        epsilon; x0 = sqrt(a) x_t - sqrt(1 - a) v for velocity)."""
        check_prediction(prediction)
        x_t = ops.cast(x_t, "float32")
        output = ops.cast(output, "float32")
        if prediction == "x0":
            return output
        sqrt_a, sqrt_1ma = self._coefficients(t, x_t)
        if prediction == "epsilon":
            return (x_t - sqrt_1ma * output) / sqrt_a
        return sqrt_a * x_t - sqrt_1ma * output

    def predict_epsilon(self, x_t, output, t, prediction):
        """Noise estimate from a network output (inverse of eq. 4 given x0)."""
        check_prediction(prediction)
        x_t = ops.cast(x_t, "float32")
        output = ops.cast(output, "float32")
        if prediction == "epsilon":
            return output
        sqrt_a, sqrt_1ma = self._coefficients(t, x_t)
        if prediction == "x0":
            return (x_t - sqrt_a * output) / sqrt_1ma
        return sqrt_1ma * x_t + sqrt_a * output

    def loss_weight(self, t, prediction, min_snr_gamma=None):
        """Per-example loss weight for min-SNR-gamma weighting (Hang et al.
        2023): min(SNR, gamma) expressed in the units of each target."""
        check_prediction(prediction)
        if min_snr_gamma is None:
            return ops.ones_like(self.alpha_bar(t))
        snr = self.snr(t)
        clipped = ops.minimum(snr, float(min_snr_gamma))
        if prediction == "epsilon":
            return clipped / snr
        if prediction == "v":
            return clipped / (snr + 1.0)
        return clipped

    # ----------------------------------------------------------- inference
    def default_spacing(self, sampler):
        """The timestep spacing of `sampler` when the caller names none."""
        spacing = self.timestep_spacing
        if isinstance(spacing, dict):
            spacing = spacing.get(sampler)
        return spacing or "linspace"

    @property
    def final_alpha_bar_timestep(self):
        """The timestep DDIM's last step goes to: -1 (alpha-bar 1, no noise)
        or, without `set_alpha_to_one`, 0 (diffusers' `final_alpha_cumprod`)."""
        return -1 if self.set_alpha_to_one else 0

    def sampling_timesteps(self, steps, spacing="linspace", use_karras_sigmas=False):
        """Descending integer timesteps for a `steps`-step sampler, with the
        meaning of diffusers' `timestep_spacing` (Lin et al. 2023, table 2).

        With `use_karras_sigmas`, the noise levels between the first and last
        of those timesteps are respaced by Karras 2022 eq. 5 (rho = 7) and
        snapped to the nearest training timesteps; where two snap to the
        same timestep it is kept once, so fewer than `steps` may remain.
        A plan that starts at the last training timestep (`"trailing"`,
        `"linspace"`) keeps that start, where x_T is pure noise, and respaces
        only the rest: the last timestep's sigma is ~2e4 on the cosine
        schedule, and a ramp from there would spend most steps at noise
        levels the network cannot tell apart."""
        if use_karras_sigmas:
            plan = self.sampling_timesteps(steps, spacing)
            keep = int(len(plan) > 2 and plan[0] == self.timesteps - 1)  # the pure-noise start
            ramp = self.karras_sigmas(steps - keep, *self.sigmas(plan[[-1, keep]]))
            return np.concatenate([plan[:keep], self.timesteps_for_sigmas(ramp)])
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}; got {spacing!r}."
            )
        check_steps(steps, self.timesteps)
        T = self.timesteps
        if spacing == "linspace":
            # One step starts from pure noise, not at t = 0 (where diffusers' linspace puts it).
            ts = np.linspace(0, T - 1, steps).round()[::-1] if steps > 1 else np.array([T - 1])
        elif spacing == "linspace_exclusive":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(steps) * (T // steps)).round()[::-1] + self.steps_offset
        elif spacing == "leading_exclusive":
            ts = (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        return ts.astype(np.int32)

    # ------------------------------------------- sigma (variance-exploding) view
    # Samplers plan in numpy float64, once, before the (traced) loop; these
    # helpers take integer timesteps with t < 0 meaning "no noise", as
    # `alpha_bar` does.
    def alphas_sigmas(self, t):
        """The pair (alpha_t, sigma_t) = (sqrt(a), sqrt(1 - a)) of x_t =
        alpha_t x0 + sigma_t eps (Lu 2022, eq. 2.1), in float64; (1, 0) for t < 0."""
        t = np.asarray(t)
        a = np.where(t >= 0, self.alphas_cumprod.astype(np.float64)[np.maximum(t, 0)], 1.0)
        return np.sqrt(a), np.sqrt(1.0 - a)

    def sigmas(self, t):
        """sigma_t = sqrt((1 - a) / a), the noise level of x_t / sqrt(a) =
        x0 + sigma_t eps (Karras 2022, eq. 1 with s(t) = sqrt(a)); 0 for t < 0."""
        alpha, sigma = self.alphas_sigmas(t)
        return sigma / alpha

    def lambdas(self, t):
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) = -log(sigma_t), with
        alpha_t = sqrt(a) and sigma_t = sqrt(1 - a) (Lu 2022, section 3.1);
        +inf for t < 0."""
        with np.errstate(divide="ignore"):
            return -np.log(self.sigmas(t))

    def karras_sigmas(self, steps, sigma_min, sigma_max, rho=7.0):
        """`steps` noise levels from `sigma_max` down to `sigma_min`, spaced
        as Karras 2022 eq. 5: (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho."""
        ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
        low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        return (high + ramp * (low - high)) ** rho

    def timesteps_for_sigmas(self, sigmas):
        """The training timesteps nearest (in log sigma) to `sigmas`, in the
        order given, with repeats removed. Snapping keeps each step's noise
        level exactly the one the network was trained at, so a denoiser only
        ever sees integer timesteps."""
        log_table = np.log(self.sigmas(np.arange(self.timesteps)))
        log_sigmas = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
        nearest = np.abs(log_sigmas[:, None] - log_table[None, :]).argmin(axis=1)
        _, first = np.unique(nearest, return_index=True)
        return nearest[np.sort(first)].astype(np.int32)

    def timestep_for_noise_std(self, std):
        """The timestep whose noise, seen on the x0 scale, has std `std`:
        x_t / sqrt(a) = x0 + sqrt((1 - a) / a) eps, so pick the t whose
        sqrt((1 - a) / a) is nearest to `std` (std on the [-1, 1] scale).

        A number gives an int; a tensor (the `sigma` input of an exported
        model) gives an int32 scalar tensor, chosen in float32."""
        a = self.alphas_cumprod.astype(np.float64)
        ratio = np.sqrt((1 - a) / a)
        if ops.is_tensor(std):
            table = ops.convert_to_tensor(ratio.astype(np.float32))
            return ops.cast(ops.argmin(ops.abs(table - ops.cast(std, "float32"))), "int32")
        return int(np.argmin(np.abs(ratio - float(std))))

    def x_t_from_noisy(self, noisy, t):
        """x_t for an image that already carries Gaussian noise, `noisy =
        x0 + std eps` with std matched to `t` by `timestep_for_noise_std`:
        scaling by sqrt(a) turns that variance-exploding view into Ho 2020
        eq. 4, x_t = sqrt(a) x0 + sqrt(1 - a) eps (Song 2021b, section 3.4)."""
        noisy = ops.cast(noisy, "float32")
        return ops.sqrt(_per_example(self.alpha_bar(t), noisy)) * noisy

    def renoise(self, x_t, noise, t, t_next):
        """Sample x_{t_next} ~ q(x_{t_next} | x_t) for `t_next > t`: Ho 2020
        eq. 2 composed over the steps between them, with mean
        sqrt(a_next / a) x_t and variance 1 - a_next / a (the forward jump of
        RePaint, Lugmayr 2022 algorithm 1 line 10)."""
        x_t = ops.cast(x_t, "float32")
        ratio = _per_example(self.alpha_bar(t_next) / self.alpha_bar(t), x_t)
        return ops.sqrt(ratio) * x_t + ops.sqrt(1.0 - ratio) * ops.cast(noise, "float32")

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            beta_schedule=self.beta_schedule,
            timesteps=self.timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        # Written only when set, so files of schedules without them stay as they were.
        defaults = dict(steps_offset=0, set_alpha_to_one=True, timestep_spacing=None,
                        use_karras_sigmas=None)
        config.update({name: getattr(self, name) for name, default in defaults.items()
                       if getattr(self, name) != default})
        return config


def check_prediction(prediction):
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction must be one of {', '.join(PREDICTION_TYPES)}; got {prediction!r}."
        )


def check_steps(steps, timesteps):
    if not is_integer(steps) or not 1 <= steps <= timesteps:
        raise ValueError(
            f"steps must be an integer from 1 to the schedule's timesteps ({timesteps}); got {steps!r}."
        )


# ----------------------------------------------------------------------------
# Flow matching (rectified flow; Lipman et al. 2023, Liu et al. 2023), as
# Stable Diffusion 3 (Esser et al. 2024) trains and samples it: x_t = (1 -
# sigma) x0 + sigma noise, the network predicts the velocity noise - x0 and is
# called with t = sigma * timesteps.
# ----------------------------------------------------------------------------
TIME_SHIFTS = ("exponential", "linear")
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# diffusers' SD 3 training scripts' one `--weighting_scheme`, as the
# (density, weighting) pair it means: a density draws the sigmas and weights
# every example alike; a weighting draws them uniformly and weights the loss.
WEIGHTING_SCHEMES = {"logit_normal": ("logit_normal", "none"), "mode": ("mode", "none"),
                     "uniform": ("uniform", "none"), "sigma_sqrt": ("uniform", "sigma_sqrt"),
                     "cosmap": ("uniform", "cosmap")}
FLOW_PREDICTION = "flow"
ALL_PREDICTIONS = PREDICTION_TYPES + (FLOW_PREDICTION,)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="FlowMatchSchedule")
class FlowMatchSchedule(keras.layers.Layer):
    """A flow-matching noise schedule, the numbers of diffusers'
    `FlowMatchEulerDiscreteScheduler` from the same settings.

    Holds no weights; its tables are float32 constants whatever the dtype
    policy.

    Args:
        timesteps: number of training timesteps N; the network sees
            `t = sigma * N`.
        shift: the fixed time shift `shift s / (1 + (shift - 1) s)` of every
            sigma (SD 3 uses 3.0; 1.0 is none), when not dynamic.
        use_dynamic_shifting: shift by `mu`, the image's own (Flux; SD 3.5
            optional), given at sampling time; `mu_for` computes it from the
            image's token count as diffusers' `calculate_shift` does.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: the
            line from (base_image_seq_len, base_shift) to
            (max_image_seq_len, max_shift) that gives `mu`.
        time_shift_type: `"exponential"` (e^mu / (e^mu + 1/s - 1)) or
            `"linear"` (mu / (mu + 1/s - 1)).
        shift_terminal: when set, the sampling sigmas are stretched to end at
            this value (LTX-Video's schedules).
        stochastic_sampling: the Euler sampler re-noises at every step
            (x_next = (1 - sigma_next) x0 + sigma_next z), as diffusers'
            option of that name.
        density: how training draws its sigmas (Esser 2024, section 3.1):
            `"uniform"`, `"logit_normal"` (sigmoid of a normal with
            `logit_mean`, `logit_std`; SD 3 trains so) or `"mode"`
            (`mode_scale`), as diffusers' `compute_density_for_timestep_sampling`.
        weighting: the per-example loss weight, as diffusers'
            `compute_loss_weighting_for_sd3`: `"none"`, `"sigma_sqrt"`
            (1 / sigma^2) or `"cosmap"`.
        precondition_outputs: train as diffusers' SD 3 scripts'
            `--precondition_outputs` (Karras 2022, section 5): the output
            read as x0 = x_t - sigma v and regressed on x0. As x_t - x0 =
            sigma (noise - x0), that is the velocity loss times sigma^2,
            which `loss_weight` applies.

    Images are `(B, H, W, C)` tensors; `sigma` a `(B,)` float tensor in [0, 1].
    The network predicts the velocity (`prediction="flow"`).

    Example:

    >>> schedule = FlowMatchSchedule(shift=3.0)
    >>> x_t = schedule.add_noise(x0, noise, sigma)
    >>> x0_hat = schedule.predict_x0(x_t, velocity, sigma)
    """

    def __init__(self, timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                 time_shift_type="exponential", shift_terminal=None, stochastic_sampling=False,
                 density="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                 weighting="none", precondition_outputs=False, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        check_integer("timesteps", timesteps, low=2)
        for name, value in (("shift", shift), ("base_shift", base_shift),
                            ("max_shift", max_shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}.")
        check_integer("base_image_seq_len", base_image_seq_len, low=1)
        check_integer("max_image_seq_len", max_image_seq_len, low=base_image_seq_len + 1)
        if time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFTS)}; got "
                             f"{time_shift_type!r}.")
        if shift_terminal is not None and not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1) or None; got {shift_terminal!r}.")
        self.timesteps = int(timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len = int(base_image_seq_len)
        self.max_image_seq_len = int(max_image_seq_len)
        self.time_shift_type = time_shift_type
        self.shift_terminal = None if shift_terminal is None else float(shift_terminal)
        self.stochastic_sampling = bool(stochastic_sampling)
        self.set_training(density=density, weighting=weighting, logit_mean=logit_mean,
                          logit_std=logit_std, mode_scale=mode_scale,
                          precondition_outputs=precondition_outputs)
        # The training sigmas, N down to 1 over N, shifted unless the shift is dynamic.
        sigmas = np.linspace(1, self.timesteps, self.timesteps, dtype=np.float32)[::-1]
        sigmas = sigmas / np.float32(self.timesteps)
        self.training_sigmas = (sigmas if self.use_dynamic_shifting
                                else self._fixed_shift(sigmas)).astype(np.float32)
        self.built = True

    # ------------------------------------------------------------ noise levels
    def _fixed_shift(self, sigmas):
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def mu_for(self, image_seq_len):
        """The dynamic shift of an image of `image_seq_len` tokens (latent
        pixels over the patch area): linear between the base and max points."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len
                                                      - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len

    def time_shift(self, sigmas, mu):
        """`sigmas` shifted by `mu` (Esser 2024, eq. 23 with e^mu for the
        ratio of resolutions)."""
        sigmas = np.asarray(sigmas, np.float32)
        with np.errstate(divide="ignore"):
            odds = 1.0 / sigmas - 1.0
        if self.time_shift_type == "exponential":
            return (math.exp(mu) / (math.exp(mu) + odds)).astype(np.float32)
        return (mu / (mu + odds)).astype(np.float32)

    def sampling_sigmas(self, steps, mu=None):
        """The `steps + 1` descending sigmas of a `steps`-step run, the last 0,
        as diffusers' `set_timesteps(steps, mu=mu)` gives them (float32)."""
        check_integer("steps", steps, low=1)
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("this schedule shifts by the image (use_dynamic_shifting): pass mu, "
                             "e.g. schedule.mu_for(image_seq_len).")
        high, low = self.training_sigmas[0], self.training_sigmas[-1]
        sigmas = (np.linspace(high * self.timesteps, low * self.timesteps, steps)
                  / self.timesteps).astype(np.float32)
        sigmas = (self.time_shift(sigmas, mu) if self.use_dynamic_shifting
                  else self._fixed_shift(sigmas).astype(np.float32))
        if self.shift_terminal is not None:
            remaining = 1.0 - sigmas
            sigmas = (1.0 - remaining / (remaining[-1] / (1.0 - self.shift_terminal)))
        return np.append(sigmas.astype(np.float32), np.float32(0.0))

    def dpm_sigmas(self, steps, mu=None):
        """The `steps` descending sigmas of diffusers' `DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=shift)` (float64, as it plans them;
        its last step goes to 0): 1 - linspace(1, 1/N, steps + 1), shifted,
        without the 0. A dynamic shift is e^mu there (exponential only)."""
        check_integer("steps", steps, low=1)
        shift = self.shift
        if self.use_dynamic_shifting:
            if mu is None or self.time_shift_type != "exponential":
                raise ValueError("the DPM-Solver++ samplers shift a dynamic schedule by e^mu: pass "
                                 "mu, on a schedule with time_shift_type='exponential'.")
            shift = math.exp(mu)
        sigmas = 1.0 - np.linspace(1.0, 1.0 / self.timesteps, steps + 1)
        return np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()

    def network_time(self, sigma):
        """What the network is called with: `sigma * timesteps`."""
        return ops.cast(sigma, "float32") * float(self.timesteps)

    def renoise(self, x_t, noise, sigma, sigma_next):
        """Sample x at `sigma_next >= sigma` given x at `sigma`: the forward
        process is Markov with x_next = r x + sqrt(sigma_next^2 - (r
        sigma)^2) z, r = (1 - sigma_next) / (1 - sigma) (RePaint's jump)."""
        x_t = ops.cast(x_t, "float32")
        sigma, sigma_next = ops.cast(sigma, "float32"), ops.cast(sigma_next, "float32")
        # No jump (sigma_next == sigma, 1 included) keeps x as it is.
        ratio = ops.where(sigma_next > sigma,
                          (1.0 - sigma_next) / ops.maximum(1.0 - sigma, 1e-12), 1.0)
        spread = ops.sqrt(ops.maximum(sigma_next**2 - (ratio * sigma) ** 2, 0.0))
        return ratio * x_t + spread * ops.cast(noise, "float32")

    def timestep_for_noise_std(self, std):
        """The sigma whose noise, seen on the x0 scale, has std `std`: x_t /
        (1 - sigma) = x0 + sigma / (1 - sigma) noise, so sigma = std / (1 + std)."""
        if ops.is_tensor(std):
            std = ops.cast(std, "float32")
            return std / (1.0 + std)
        return float(std) / (1.0 + float(std))

    def x_t_from_noisy(self, noisy, sigma):
        """x_t for `noisy = x0 + std noise` with `sigma` from
        `timestep_for_noise_std`: (1 - sigma) noisy."""
        return (1.0 - self._expand(sigma, noisy)) * ops.cast(noisy, "float32")

    # ------------------------------------------------------ the interpolation
    def _expand(self, sigma, like):
        return _per_example(ops.cast(sigma, "float32"), like)

    def add_noise(self, x0, noise, sigma):
        """x_t = (1 - sigma) x0 + sigma noise (diffusers' `scale_noise`)."""
        x0 = ops.cast(x0, "float32")
        sigma = self._expand(sigma, x0)
        return (1.0 - sigma) * x0 + sigma * ops.cast(noise, "float32")

    def call(self, x0, noise, sigma):
        return self.add_noise(x0, noise, sigma)

    def target(self, x0, noise, sigma=None, prediction="flow"):
        """The velocity the network learns: d x_t / d sigma = noise - x0
        (the same at every sigma)."""
        check_flow_prediction(prediction)
        return ops.cast(noise, "float32") - ops.cast(x0, "float32")

    def predict_x0(self, x_t, velocity, sigma):
        """x0 = x_t - sigma v."""
        return ops.cast(x_t, "float32") - self._expand(sigma, x_t) * ops.cast(velocity, "float32")

    def predict_noise(self, x_t, velocity, sigma):
        """noise = x_t + (1 - sigma) v."""
        sigma = self._expand(sigma, x_t)
        return ops.cast(x_t, "float32") + (1.0 - sigma) * ops.cast(velocity, "float32")

    def velocity(self, x_t, x0, sigma):
        """v from x_t and an x0 estimate: (x_t - x0) / sigma."""
        return (ops.cast(x_t, "float32") - ops.cast(x0, "float32")) / self._expand(sigma, x_t)

    # --------------------------------------------------------------- training
    flow = True

    def set_training(self, density, weighting, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                     precondition_outputs=False):
        """Set how training draws its sigmas and weights its loss (see the
        class); all checked before any is set. A train step traced before
        keeps the old settings: the model's `configure_fine_tuning` retraces."""
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"density must be one of {', '.join(TIMESTEP_DENSITIES)}; got "
                             f"{density!r}.")
        if weighting not in FLOW_LOSS_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(FLOW_LOSS_WEIGHTINGS)}; got "
                             f"{weighting!r}.")
        for name, value in (("logit_mean", logit_mean), ("logit_std", logit_std),
                            ("mode_scale", mode_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number; got {value!r}.")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0; got {logit_std!r}.")
        if not isinstance(precondition_outputs, (bool, np.bool_)):
            raise ValueError(f"precondition_outputs must be True or False; got "
                             f"{precondition_outputs!r}.")
        self.density, self.weighting = density, weighting
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.mode_scale = float(mode_scale)
        self.precondition_outputs = bool(precondition_outputs)

    def draw_levels(self, batch_size, seed=None):
        """`(B,)` training sigmas from the schedule's own `density`."""
        return self.draw_sigmas(batch_size, seed=seed, density=self.density,
                                logit_mean=self.logit_mean, logit_std=self.logit_std,
                                mode_scale=self.mode_scale)

    def timestep_density(self, u, density="uniform", logit_mean=0.0, logit_std=1.0,
                         mode_scale=1.29):
        """Training's u in [0, 1) drawn from a density (Esser 2024, section
        3.1), as diffusers' `compute_density_for_timestep_sampling`, from
        its raw draw `u`: standard normal for `"logit_normal"` (u =
        sigmoid(mean + std u)), uniform otherwise; `"mode"` maps a uniform u
        to 1 - u - scale (cos^2(pi u / 2) - 1 + u)."""
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"density must be one of {', '.join(TIMESTEP_DENSITIES)}; got "
                             f"{density!r}.")
        u = ops.cast(u, "float32")
        if density == "logit_normal":
            return ops.sigmoid(logit_mean + logit_std * u)
        if density == "mode":
            return 1.0 - u - mode_scale * (ops.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
        return u

    def draw_sigmas(self, batch_size, seed=None, density="uniform", **options):
        """`(B,)` training sigmas: u from `timestep_density`, the training
        sigma at index floor(u N), as diffusers' SD 3 scripts pick them."""
        from keras import random

        raw = (random.normal if density == "logit_normal" else random.uniform)(
            (batch_size,), seed=seed)
        u = self.timestep_density(raw, density, **options)
        index = ops.clip(ops.cast(u * self.timesteps, "int32"), 0, self.timesteps - 1)
        return ops.take(ops.convert_to_tensor(self.training_sigmas), index)

    def loss_weight(self, sigma, prediction="flow", min_snr_gamma=None):
        """Per-example loss weights by the schedule's `weighting`, times
        sigma^2 with `precondition_outputs` (min-SNR weighting is for DDPM
        schedules; the model refuses it here)."""
        check_flow_prediction(prediction)
        weights = self.weights_for(sigma, self.weighting)
        if self.precondition_outputs:
            weights = weights * ops.square(ops.cast(sigma, "float32"))
        return weights

    def weights_for(self, sigma, weighting):
        """Per-example loss weights (diffusers' `compute_loss_weighting_for_sd3`):
        `"sigma_sqrt"` 1 / sigma^2, `"cosmap"` 2 / (pi (1 - 2 sigma + 2 sigma^2))
        (Esser 2024, section 3.1), else 1."""
        if weighting not in FLOW_LOSS_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(FLOW_LOSS_WEIGHTINGS)}; got "
                             f"{weighting!r}.")
        sigma = ops.cast(sigma, "float32")
        if weighting == "sigma_sqrt":
            return sigma ** -2.0
        if weighting == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
        return ops.ones_like(sigma)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(timesteps=self.timesteps, shift=self.shift,
                      use_dynamic_shifting=self.use_dynamic_shifting,
                      base_shift=self.base_shift, max_shift=self.max_shift,
                      base_image_seq_len=self.base_image_seq_len,
                      max_image_seq_len=self.max_image_seq_len,
                      time_shift_type=self.time_shift_type, shift_terminal=self.shift_terminal,
                      stochastic_sampling=self.stochastic_sampling, density=self.density,
                      logit_mean=self.logit_mean, logit_std=self.logit_std,
                      mode_scale=self.mode_scale, weighting=self.weighting,
                      precondition_outputs=self.precondition_outputs)
        return config


def check_flow_prediction(prediction):
    if prediction != FLOW_PREDICTION:
        raise ValueError(f"a flow-matching schedule's network predicts the velocity: prediction "
                         f"must be {FLOW_PREDICTION!r}; got {prediction!r}.")
