"""Restoration and editing with a trained `DiffusionModel`: denoising,
inpainting (RePaint), image-to-image (SDEdit) and interpolation.

Each function turns a user's request (a noisy image, a mask, a strength, two
endpoints) into runs of the sampling pipeline (`keras_diffusion.pipeline`);
`DiffusionModel.denoise`, `inpaint`, `img2img` and `interpolate` call them.
Noise-level formulas live in `DiffusionSchedule`, the loops in `samplers`.
They work on any model of the pipeline's protocol.

Images go in as NHWC float32 in [0, 1] or uint8 (noisy floats given to
`denoise` may stray outside [0, 1]) and come out as float32 numpy arrays in
[0, 1].
"""

from typing import NamedTuple

import keras
import numpy as np

from keras_diffusion import pipeline
from keras_diffusion import samplers
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_integer
from keras_diffusion.checks import is_number
from keras_diffusion.data import check_images
from keras_diffusion.pipeline import from_model_range
from keras_diffusion.pipeline import to_model_range
from keras_diffusion.schedule import check_steps

MASK_SHAPES = ("center", "left-half", "random:P")
# Immerkaer's mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] maps white noise of
# std s to std sqrt(sum of squared weights) s = 6 s; 0.6745 is the median of
# |N(0, 1)|.
_LAPLACIAN_GAIN = 6.0
_MAD_TO_STD = 0.6745
_NOISE_BUDGET = 2**26  # floats of RePaint noise held at once (256 MiB)


class DenoiseResult(NamedTuple):
    """What `DiffusionModel.denoise` returns.

    Attributes:
        images: `(N, H, W, C)` float32 in [0, 1], the denoised images.
        sigma: the noise std (on the [0, 1] scale) the model removed.
        sigma_estimated: True when `sigma` was estimated from the images by
            `estimate_noise_std` rather than given.
    """

    images: np.ndarray
    sigma: float
    sigma_estimated: bool


# ------------------------------------------------------------------ denoise
def denoise(model, images, *, sigma=None, steps=10, labels=None, prompts=None,
            negative_prompts=None, guidance_scale=1.0, batch_size=None):
    """Remove additive Gaussian noise of std `sigma` from `images`.

    The noise level is matched to the diffusion timestep whose noise has
    that std (`DiffusionSchedule.timestep_for_noise_std`), and the
    deterministic DDIM reverse process runs from there to t = 0.

    Args:
        model: a `DiffusionModel`, or any model of the sampling pipeline's
            protocol (`keras_diffusion.pipeline`).
        images: `(N, H, W, C)` noisy images: uint8, or floats on the
            [0, 1] scale (values outside [0, 1] from the noise are fine
            and should not be clipped away).
        sigma: noise std on the [0, 1] scale, in (0, 1]; None estimates it
            from the images (`applications.estimate_noise_std`, the median
            over the batch, so denoise images of different noise levels in
            separate calls).
        steps: denoiser evaluations, spread evenly from the noise level
            down to 0; 1 gives the one-shot (minimum-MSE) estimate.
        labels, prompts, negative_prompts, guidance_scale: for
            class-conditional or prompted models, as in
            `DiffusionModel.generate`; by default the unconditional
            (null-label or empty-prompt) model.
        batch_size: images per compiled call.

    Returns:
        `DenoiseResult(images, sigma, sigma_estimated)`: float32 images in
        [0, 1], the sigma used and whether it was estimated.

    Example:

    >>> result = model.denoise(noisy_images)        # sigma estimated
    >>> result.images.shape, result.sigma
    ((8, 28, 28, 1), 0.198...)
    """
    if getattr(model, "autoencoder", None) is not None:
        raise ValueError(
            "denoise needs a pixel-space model: the autoencoder of a latent model was trained "
            "on clean images, so the latents of a noisy image are not the noised latents its "
            "diffusion model learned to clean; denoise with a DiffusionModel."
        )
    noisy = _check_noisy_images(images, model.image_shape)
    estimated = sigma is None
    if estimated:
        sigma = float(np.median(estimate_noise_std(noisy)))
        if sigma > 1:
            raise ValueError(
                f"the estimated noise std is {sigma:.3g}, above 1 on the [0, 1] image scale; "
                "are the images in [0, 255]? Pass floats in [0, 1] or uint8."
            )
    else:
        _check_sigma(sigma)
    check_steps(steps, model.schedule.timesteps)
    condition = pipeline.check_condition(model, len(noisy), guidance_scale, labels=labels, prompts=prompts,
                                        negative_prompts=negative_prompts)
    # On the model's [-1, 1] scale the noise std doubles.
    t = model.schedule.timestep_for_noise_std(2.0 * float(sigma))
    x_t = model.schedule.x_t_from_noisy(to_model_range(noisy), t)
    x0 = pipeline.run_sampler(
        model, x_t, timesteps=samplers.partial_levels(model.schedule, t, steps), sampler="ddim",
        condition=condition, guidance_scale=guidance_scale, batch_size=batch_size,
    )
    return DenoiseResult(from_model_range(x0), float(sigma), estimated)


def estimate_noise_std(images):
    """Per-image std of additive white Gaussian noise, on the images' scale.

    Immerkaer's estimator (1996) made robust, in the way of Tai & Yang
    (2008): each channel is filtered with the mask [[1, -2, 1], [-2, 4, -2],
    [1, -2, 1]], which cancels locally linear content and turns noise of std
    s into noise of std 6 s; the half of the pixels where the (smoothed) image
    gradient is largest, i.e. the edges, is set aside; and s is the median
    absolute response of the rest / 0.6745 / 6 (a MAD estimate). On MNIST and
    CIFAR-10 the batch median is within 5% of the truth for 0.02 <= s <= 1
    (per image: within 15%); clean images give about 0. It assumes the
    noise was not clipped to [0, 1]; clipped noise reads low.

    Args:
        images: `(N, H, W, C)` or `(N, H, W)` array, H and W at least 3.

    Returns:
        float64 array `(N,)`.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or min(x.shape[1:3]) < 3:
        raise ValueError(f"images must be (N, H, W, C) with H, W >= 3; got shape {x.shape}.")
    rows = x[:, :-2] - 2.0 * x[:, 1:-1] + x[:, 2:]
    response = np.abs(rows[:, :, :-2] - 2.0 * rows[:, :, 1:-1] + rows[:, :, 2:])
    smooth = _binomial_blur(_binomial_blur(x, axis=1), axis=2)
    gradient = np.hypot(
        smooth[:, 2:, 1:-1] - smooth[:, :-2, 1:-1], smooth[:, 1:-1, 2:] - smooth[:, 1:-1, :-2]
    )
    response, gradient = response.reshape(len(x), -1), gradient.reshape(len(x), -1)
    flattest = np.argsort(gradient, axis=1, kind="stable")[:, : max(1, gradient.shape[1] // 2)]
    mad = np.median(np.take_along_axis(response, flattest, axis=1), axis=1)
    return mad / _MAD_TO_STD / _LAPLACIAN_GAIN


def _binomial_blur(x, axis):
    """Blur along `axis` with the binomial kernel [1, 4, 6, 4, 1] / 16 (about
    a Gaussian of std 1), repeating the edge pixels."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    padded = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    return sum(
        weight / 16.0 * np.take(padded, np.arange(i, i + n), axis=axis)
        for i, weight in enumerate((1, 4, 6, 4, 1))
    )


# ------------------------------------------------------------------ inpaint
def inpaint(model, images, mask, *, steps=50, jump_length=5, resamples=4, eta=1.0, seed=None,
            labels=None, prompts=None, negative_prompts=None, guidance_scale=1.0,
            batch_size=None):
    """Fill in the pixels of `images` where `mask` is 0, by RePaint
    (Lugmayr 2022): sampling with the known pixels renoised from the
    image at every step, and `resamples - 1` jumps back of `jump_length`
    steps after every `jump_length` steps to harmonise the two regions.

    Args:
        model: a `DiffusionModel`, or any model of the sampling pipeline's
            protocol (`keras_diffusion.pipeline`).
        images: `(N, H, W, C)` float in [0, 1] or uint8.
        mask: 1 (or True) where pixels are known, 0 where missing; shape
            `(H, W)`, `(H, W, 1 or C)` or `(N or 1, H, W, 1 or C)`.
            Values >= 0.5 count as known. See `applications.make_mask`
            for the built-in shapes.
        steps: reverse steps of one pass, 1 to the schedule's timesteps;
            the run makes about `steps * resamples` denoiser evaluations.
        jump_length, resamples: RePaint's j and r; `resamples=1` turns
            resampling off.
        eta: DDIM stochasticity of the reverse steps (1: DDPM, as RePaint).
        seed: integer seed for all the noise.
        labels, prompts, negative_prompts, guidance_scale: as in
            `DiffusionModel.generate`.
        batch_size: images per compiled call; by default as many as keep
            the pre-drawn noise under 256 MiB.

    Returns:
        float32 `(N, H, W, C)` in [0, 1] whose known pixels equal the
        input's exactly (uint8 input: its value / 255).
    """
    images = check_images(images, model.image_shape)
    known = _check_mask(mask, images.shape)
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}.")
    timesteps = samplers.plan_timesteps(model.schedule, "ddim", steps)
    t_from, t_to = samplers.repaint_timesteps(timesteps, jump_length, resamples)
    condition = pipeline.check_condition(model, len(images), guidance_scale, labels=labels, prompts=prompts,
                                        negative_prompts=negative_prompts)
    reverse_steps = int(np.sum(t_to < t_from))
    size = int(np.prod(model.sample_shape))
    batch_size = batch_size or max(1, min(len(images), _NOISE_BUDGET // (2 * reverse_steps * size)))
    plan = dict(t_from=t_from, t_to=t_to, eta=float(eta), clip_x0=pipeline.clips(model))
    seeds = keras.random.SeedGenerator(seed)
    outputs = []
    for part in _batches(len(images), batch_size):
        target = pipeline.encode(model, images[part])
        shape = tuple(target.shape)
        x = keras.random.normal(shape, seed=seeds)
        jump_noise = keras.random.normal((reverse_steps,) + shape, seed=seeds)
        step_noise = keras.random.normal((reverse_steps,) + shape, seed=seeds)
        inputs = [x, target, pipeline.encode_mask(model, known[part]), jump_noise, step_noise]
        x0 = pipeline.run_loop(
            model, samplers.repaint, inputs, constants=plan, batch_axes=(0, 0, 0, 1, 1),
            condition=None if condition is None else condition[part], guidance_scale=guidance_scale,
        )
        outputs.append(pipeline.decode(model, x0))
    # Composite in [0, 1] so the known pixels come back bit for bit.
    return np.where(known, images, np.concatenate(outputs, axis=0))


def make_mask(kind, shape, seed=0):
    """A built-in inpainting mask: 1 where pixels are known, 0 where missing.

    Args:
        kind: `"center"` (a centred box of half the height and width is
            missing), `"left-half"` or `"random:P"` (each pixel is missing
            with probability P, independently per image).
        shape: `(N, H, W, C)` or `(H, W, C)` of the images.
        seed: seed for `"random:P"`.

    Returns:
        float32 mask of `shape` with C = 1, the same for every channel.
    """
    shape = tuple(shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"shape must be (N, H, W, C) or (H, W, C); got {shape}.")
    out_shape = shape[:-1] + (1,)
    height, width = shape[-3], shape[-2]
    mask = np.ones(out_shape, dtype=np.float32)
    if kind == "center":
        top, left = height // 4, width // 4
        mask[..., top:top + height // 2, left:left + width // 2, :] = 0.0
    elif kind == "left-half":
        mask[..., :, : width // 2, :] = 0.0
    elif isinstance(kind, str) and kind.startswith("random:"):
        fraction = _parse_fraction(kind)
        missing = np.random.default_rng(seed).random(out_shape) < fraction
        mask[missing] = 0.0
    else:
        raise ValueError(
            f"unknown mask {kind!r}; expected one of {', '.join(MASK_SHAPES)} "
            "(P a fraction in [0, 1], e.g. random:0.5) or a mask image."
        )
    return mask


# ------------------------------------------------------------------ img2img
def img2img(model, images, *, strength=0.5, steps=50, eta=0.0, seed=None, labels=None,
            prompts=None, negative_prompts=None, guidance_scale=1.0, batch_size=None):
    """Image-to-image translation by SDEdit (Meng 2022): noise `images`
    to timestep `round(strength * (T - 1))` (on a flow schedule to sigma =
    `strength`), then run DDIM back to t = 0.

    Args:
        model: a `DiffusionModel`, or any model of the sampling pipeline's
            protocol (`keras_diffusion.pipeline`).
        images: `(N, H, W, C)` float in [0, 1] or uint8.
        strength: in (0, 1]; how much of the image is noised away (1
            keeps nothing of it).
        steps: denoiser evaluations from that timestep down to 0.
        eta: DDIM stochasticity; seed: integer seed for all the noise.
        labels, prompts, negative_prompts, guidance_scale: as in
            `DiffusionModel.generate`, e.g. to steer a conditional model towards a
            class or a prompted one towards a prompt.
        batch_size: images per compiled call.

    Returns:
        float32 `(N, H, W, C)` in [0, 1].
    """
    images = check_images(images, model.image_shape)
    if not is_number(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength!r}.")
    check_steps(steps, model.schedule.timesteps)
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}.")
    condition = pipeline.check_condition(model, len(images), guidance_scale, labels=labels, prompts=prompts,
                                        negative_prompts=negative_prompts)
    if getattr(model.schedule, "flow", False):  # the noise level is the sigma itself
        t, t_batch = float(strength), np.full((len(images),), strength, dtype="float32")
    else:
        t = int(round(float(strength) * (model.schedule.timesteps - 1)))
        t_batch = np.full((len(images),), t, dtype="int32")
    x0 = pipeline.encode(model, images, batch_size=batch_size)
    noise = keras.random.normal(x0.shape, seed=seed)
    x_t = model.schedule.add_noise(x0, noise, t_batch)
    timesteps = samplers.partial_levels(model.schedule, t, steps)
    step_seed = None if seed is None else seed + 1
    step_noise = samplers.draw_step_noise(
        x0.shape, "ddim", len(timesteps), eta=eta, seed=step_seed, schedule=model.schedule
    )
    x0 = pipeline.run_sampler(
        model, x_t, timesteps=timesteps, sampler="ddim", eta=eta, condition=condition,
        guidance_scale=guidance_scale, step_noise=step_noise, batch_size=batch_size,
    )
    return pipeline.decode(model, x0, batch_size=batch_size)


OUTPUTS = ("images", "latents")


def check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}.")
    return output


def finish(model, x, output, batch_size=None):
    """A run's samples as `output` asks: decoded images in [0, 1], or the
    latents themselves (float32 numpy, NHWC) to hand to another model."""
    if check_output(output) == "latents":
        return np.asarray(keras.ops.convert_to_numpy(x), dtype="float32")
    return pipeline.decode(model, x, batch_size=batch_size)


def is_latents(model, images):
    """Whether `images` are a latent model's latents (its latent channels,
    where its images have others) rather than images."""
    channels = model.sample_shape[-1]
    return (getattr(images, "ndim", 0) == 4 and images.shape[-1] == channels
            and channels != model.image_shape[-1])


def img2img_start(num_steps, strength):
    """Where img2img begins in a plan of `num_steps`: after the first
    `num_steps - int(num_steps * strength)`, as diffusers' SD and SDXL
    img2img pipelines count. A model may count otherwise (its own
    `img2img_start`)."""
    return num_steps - min(int(num_steps * strength), num_steps)


def planned_img2img(model, images, *, strength=0.3, steps=50, sampler="ddim", eta=0.0,
                    seed=None, labels=None, prompts=None, negative_prompts=None, guidance_scale=1.0,
                    denoising_start=None, noise=None, timestep_spacing=None,
                    use_karras_sigmas=None, batch_size=None, output="images"):
    """Image-to-image as diffusers' img2img pipelines run it: plan `steps`
    steps of `sampler` over the whole schedule (as `generate` would), noise
    the images to the level where the last `int(strength * steps)` of them
    begin, and run those (the model's `img2img_start`, if it has one,
    decides where that is).

    Args:
        images: `(N, H, W, C)` images in [0, 1] (or uint8), or the model's
            latents `(N, h, w, c)` (told apart by the channel count), used
            as they are instead of encoded.
        denoising_start: SDXL's ensemble of experts: begin at this fraction
            of the denoising (`samplers.split_point`) instead, with no noise
            added: `images` are then the latents a base model's
            `generate(..., denoising_end=..., output="latents")` handed on.
            `strength` does not apply.
        noise: the noise to add, shaped like the latents, instead of one
            drawn from `seed` (e.g. to run from the noise another tool drew).
        output: `"images"` or `"latents"` (see `finish`).
        Others: as in `DiffusionModel.generate`.
    """
    check_output(output)
    if not is_latents(model, images):
        images = check_images(images, model.image_shape)
    condition = pipeline.check_condition(model, len(images), guidance_scale, labels=labels,
                                        prompts=prompts, negative_prompts=negative_prompts)
    x = (keras.ops.convert_to_tensor(np.asarray(images, "float32")) if is_latents(model, images)
         else pipeline.encode(model, images, batch_size=batch_size))
    timesteps = samplers.plan_timesteps(
        model.schedule, sampler, steps, eta=eta, spacing=timestep_spacing,
        use_karras_sigmas=use_karras_sigmas, mu=pipeline.dynamic_shift(model, x.shape[1:]))
    if denoising_start is None:
        if not is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength!r}.")
        begin = getattr(model, "img2img_start", img2img_start)(len(timesteps), strength)
    else:
        begin = samplers.split_point(model.schedule, timesteps, denoising_start)
    if begin >= len(timesteps):
        raise ValueError(
            f"no step is left to run of the {len(timesteps)} planned: raise "
            + ("strength (at least 1/steps)" if denoising_start is None
               else "steps, or lower denoising_start") + ".")
    timesteps = timesteps[begin:]
    if denoising_start is None:
        if noise is None:
            noise = keras.random.normal(x.shape, seed=seed)
        elif tuple(np.shape(noise)) != tuple(x.shape):
            raise ValueError(f"noise must be shaped like the latents, {tuple(x.shape)}; got "
                             f"{tuple(np.shape(noise))}.")
        level = np.full((x.shape[0],), timesteps[0],
                        dtype="float32" if samplers.plan(timesteps).dtype.kind == "f" else "int32")
        x = model.schedule.add_noise(x, keras.ops.convert_to_tensor(noise, "float32"), level)
    step_noise = samplers.draw_step_noise(x.shape, sampler, len(timesteps), eta=eta,
                                          seed=None if seed is None else seed + 1,
                                          schedule=model.schedule)
    x = pipeline.run_sampler(model, x, timesteps=timesteps, sampler=sampler, eta=eta,
                             condition=condition, guidance_scale=guidance_scale,
                             step_noise=step_noise, batch_size=batch_size)
    return finish(model, x, output, batch_size)


# -------------------------------------------------------------- interpolate
def interpolate(model, a, b, *, num=8, steps=50, labels=None, prompts=None,
                negative_prompts=None, guidance_scale=1.0, batch_size=None):
    """`num` images along a spherical interpolation between two noises,
    each decoded by deterministic DDIM.

    Args:
        model: a `DiffusionModel`, or any model of the sampling pipeline's
            protocol (`keras_diffusion.pipeline`).
        a, b: each an integer seed (the noise `generate` draws from it, so
            the ends equal `generate(1, steps=steps, seed=a)`), or one
            image `(H, W, C)` / `(1, H, W, C)` in [0, 1] or uint8, whose
            noise is found by DDIM inversion with `steps` steps.
        num: number of images, the two ends included (>= 2).
        steps: DDIM steps for inversion and decoding.
        labels, prompts, negative_prompts, guidance_scale: as in
            `DiffusionModel.generate` (one each, or `num`).
        batch_size: images per compiled call.

    Returns:
        float32 `(num, H, W, C)` in [0, 1].
    """
    check_integer("num", num, low=2, note=" (the two ends included)")
    timesteps = samplers.plan_timesteps(model.schedule, "ddim", steps)
    condition = pipeline.check_condition(model, num, guidance_scale, labels=labels, prompts=prompts,
                                        negative_prompts=negative_prompts)
    ends = [
        _endpoint_noise(model, end, name, timesteps,
                        None if condition is None else condition[index:index + 1], guidance_scale)
        for name, end, index in (("a", a, 0), ("b", b, num - 1))
    ]
    noise = keras.ops.convert_to_tensor(slerp(ends[0], ends[1], np.linspace(0.0, 1.0, num)))
    x0 = pipeline.run_sampler(
        model, noise, timesteps=timesteps, sampler="ddim", condition=condition,
        guidance_scale=guidance_scale, batch_size=batch_size,
    )
    return pipeline.decode(model, x0, batch_size=batch_size)


def slerp(a, b, weights):
    """Spherical linear interpolation (Shoemake 1985) between two arrays,
    one result per weight in `weights` (0 gives `a`, 1 gives `b`), stacked
    along the first axis of `a`. Unlike a straight line it keeps the norm of
    Gaussian noise, so every point looks like a sample of N(0, I)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    out = []
    for w in np.asarray(weights, dtype=np.float64):
        if theta < 1e-6:  # parallel: the sphere is flat here
            out.append((1 - w) * a + w * b)
        else:
            out.append((np.sin((1 - w) * theta) * a + np.sin(w * theta) * b) / np.sin(theta))
    return np.concatenate(out, axis=0).astype(np.float32)


def _endpoint_noise(model, end, name, timesteps, condition, guidance_scale):
    """x_T for one end of an interpolation: the noise an integer seed draws
    (as `generate` draws it), or an image's DDIM inversion."""
    shape = (1,) + tuple(model.sample_shape)
    if is_integer(end):
        return keras.ops.convert_to_numpy(keras.random.normal(shape, seed=int(end)))
    image = np.asarray(end)
    image = check_images(image[np.newaxis] if image.ndim == 3 else image, model.image_shape, name=name)
    if len(image) != 1:
        raise ValueError(f"{name} must be one image or an integer seed; got {len(image)} images.")
    x_t = pipeline.run_loop(
        model, samplers.invert, [pipeline.encode(model, image)],
        constants=dict(timesteps=timesteps),
        condition=condition, guidance_scale=guidance_scale,
    )
    return keras.ops.convert_to_numpy(x_t)


# ------------------------------------------------------------------ checks
def _check_noisy_images(images, image_shape):
    """`check_images` for noisy images: floats keep values outside [0, 1],
    where Gaussian noise puts some pixels."""
    array = np.asarray(images)
    if not np.issubdtype(array.dtype, np.floating):
        return check_images(array, image_shape)
    if not np.all(np.isfinite(array)):
        raise ValueError("images contain NaN or Inf values.")
    shape = check_images(np.clip(array, 0.0, 1.0), image_shape).shape
    if array.min() >= 0 and array.max() > 2:
        raise ValueError(
            f"images must be float in [0, 1] (plus noise) or uint8; got floats in "
            f"[{array.min():.4g}, {array.max():.4g}]: they look like [0, 255] pixel values; "
            "divide by 255 or pass uint8."
        )
    return array.astype(np.float32).reshape(shape)


def _check_sigma(sigma):
    if not is_number(sigma) or not 0 < sigma <= 1:
        raise ValueError(
            f"sigma must be in (0, 1] (the noise std on the [0, 1] image scale), or None to "
            f"estimate it; got {sigma!r}."
        )


def _check_mask(mask, images_shape):
    """The mask as a boolean array of `images_shape`, True where known."""
    array = np.asarray(mask)
    given = array.shape
    if array.dtype == np.uint8:
        array = array / 255.0
    if array.ndim == 2:
        array = array[..., np.newaxis]
    expected = (
        f"(H, W), (H, W, 1 or C) or (N or 1, H, W, 1 or C) with (H, W, C) = {tuple(images_shape[1:])}"
    )
    try:
        fits = np.broadcast_shapes(array.shape, images_shape) == tuple(images_shape)
    except ValueError:
        fits = False
    if array.ndim not in (3, 4) or not fits:
        raise ValueError(
            f"mask shape {given} does not match images shape {tuple(images_shape)}; "
            f"expected {expected}."
        )
    if array.dtype != bool:
        array = array.astype(np.float64)
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError("mask must hold values in [0, 1] (1 = known pixel), or be boolean.")
        array = array >= 0.5
    return np.broadcast_to(array, images_shape)


def _parse_fraction(kind):
    text = kind.partition(":")[2]
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is None or not 0 <= fraction <= 1:
        raise ValueError(f"mask {kind!r}: random:P needs a fraction P in [0, 1], e.g. random:0.5.")
    return fraction


def _batches(n, batch_size):
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]
