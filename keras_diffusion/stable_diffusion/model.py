"""`StableDiffusion`: a loaded Stable Diffusion checkpoint.

It is a `LatentDiffusionModel` whose slots hold the Stable Diffusion parts
(`StableDiffusionUNet`, `StableDiffusionVAE`, `CLIPTextTransformer`,
`CLIPTokenizer`), so generation, guidance, the samplers, the applications,
export and `fit` are the latent model's own. What it adds is what only a
checkpoint of the PyTorch world has: LoRA (Keras' own, on the layers at
diffusers' module paths) with the LoRA files diffusers and kohya-format
tools read and write (`keras_diffusion.stable_diffusion.lora`), and
writing it back as a diffusers folder.
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion import applications
from keras_diffusion import backend
from keras_diffusion import conditioning
from keras_diffusion import pipeline
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.data import check_training_images
from keras_diffusion.latent import LatentDiffusionModel
from keras_diffusion.model import check_model_arguments
from keras_diffusion.stable_diffusion import diffusers_folder
from keras_diffusion.stable_diffusion import lora
from keras_diffusion.stable_diffusion import xl  # noqa: F401 (registers SDXL's parts for .keras files)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusion")
class StableDiffusion(LatentDiffusionModel):
    """A Stable Diffusion 1.x / 2.x model; build one with
    `keras_diffusion.load_model(folder_or_file)`.

    Fine-tuning is `fit` on images in [0, 1] of the model's size with one
    caption each: of the whole UNet (every UNet weight trains; the VAE and
    text encoder are frozen), or, after `enable_lora`, of LoRA matrices
    only. The objective is the latent model's, with the checkpoint's noise
    schedule and prediction type; `configure_fine_tuning` sets what
    diffusers' training scripts offer besides (`noise_offset`, min-SNR
    weighting, caption dropout, which is 0 by default as in those scripts),
    `enable_gradient_checkpointing` trades compute for memory, and the
    optimizer's `clipnorm` clips gradients.

    Args:
        noise_offset: the std of a per-image, per-channel constant added to
            the training noise (Guttenberg 2023; diffusers' `--noise_offset`,
            typically 0.05-0.1), which lets the model learn very dark or
            bright images; 0 for none.
        Other arguments as `LatentDiffusionModel`'s.

    Example:

    >>> sd = kd.load_model("path/to/stable-diffusion-v1-5")
    >>> images = sd.generate(2, prompts="a photo of a cat", guidance_scale=7.5,
    ...                      steps=20, sampler="dpmpp_2m", seed=0)
    >>> sd.enable_lora(rank=8)
    >>> sd.configure_fine_tuning(min_snr_gamma=5.0)
    >>> sd.compile(optimizer=keras.optimizers.AdamW(1e-4, clipnorm=1.0))
    >>> sd.fit(images, captions, batch_size=1, epochs=10)
    >>> sd.save_lora_weights("my_lora/")
    """

    def __init__(self, *args, prompt_dropout=0.0, noise_offset=0.0, **kwargs):
        super().__init__(*args, prompt_dropout=prompt_dropout, **kwargs)
        self.noise_offset = _check_noise_offset(noise_offset)

    # ------------------------------------------------------------ sampling
    def generate(self, num_images, steps=50, sampler="ddim", seed=None, labels=None,
                 guidance_scale=1.0, eta=0.0, timestep_spacing=None, batch_size=None,
                 use_karras_sigmas=None, prompts=None, negative_prompts=None, noise=None,
                 image_size=None, denoising_end=None, output="images", **guidance):
        """`DiffusionModel.generate`, with options of diffusers' pipelines:
        `denoising_end`, a fraction in (0, 1), stops that far through the
        denoising (`keras_diffusion.samplers.split_point`) and hands the
        noisy latents on to a refiner's `img2img(..., denoising_start=)`;
        `output="latents"` returns the latents (float32 NHWC numpy) instead
        of decoding them; `guidance`: skip-layer guidance for a network that
        skips blocks (SD 3's: `skip_guidance_layers`, `skip_layer_guidance_
        scale`, `_start`, `_stop`, as `keras_diffusion.pipeline.sample`)."""
        applications.check_output(output)
        x = pipeline.sample(
            self, num_images, steps=steps, sampler=sampler, seed=seed, labels=labels,
            prompts=prompts, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
            eta=eta, timestep_spacing=timestep_spacing, batch_size=batch_size,
            use_karras_sigmas=use_karras_sigmas, noise=noise, image_size=image_size,
            denoising_end=denoising_end, **guidance,
        )
        return applications.finish(self, x, output, batch_size)

    def img2img(self, images, strength=0.5, steps=50, eta=0.0, seed=None, labels=None,
                prompts=None, negative_prompts=None, guidance_scale=1.0, batch_size=None,
                sampler="ddim", denoising_start=None, noise=None, output="images"):
        """Image-to-image as diffusers' img2img pipelines run it, with any
        sampler: of a `steps`-step plan the last `int(strength * steps)` run
        from the images noised to where they begin; `images` may be latents,
        and `denoising_start` finishes a base model's `denoising_end` run.
        See `keras_diffusion.applications.planned_img2img`."""
        return applications.planned_img2img(
            self, images, strength=strength, steps=steps, sampler=sampler, eta=eta, seed=seed,
            labels=labels, prompts=prompts, negative_prompts=negative_prompts,
            guidance_scale=guidance_scale, denoising_start=denoising_start, noise=noise,
            batch_size=batch_size, output=output)

    # ------------------------------------------------------------ training
    def configure_fine_tuning(self, noise_offset=0.0, min_snr_gamma=None, prompt_dropout=0.0):
        """Set the training options diffusers' fine-tuning scripts offer:
        `noise_offset` (see the class), `min_snr_gamma` (min-SNR loss
        weighting, Hang et al. 2023; diffusers' `--snr_gamma`, 5 is usual;
        None for plain MSE) and `prompt_dropout` (the share of captions
        replaced by the empty prompt). Each call sets all three; a train
        function traced before is traced again."""
        check_model_arguments(prediction=self.prediction, ema_decay=self.ema_decay,
                              min_snr_gamma=min_snr_gamma, label_dropout=self.label_dropout,
                              prompt_dropout=prompt_dropout)
        self.noise_offset = _check_noise_offset(noise_offset)
        self.min_snr_gamma = min_snr_gamma
        self.prompt_dropout = float(prompt_dropout)
        self.train_function = None

    def enable_gradient_checkpointing(self, enabled=True):
        """Rematerialise the UNet's residual blocks and transformers in
        training (`keras.remat`), as diffusers' `enable_gradient_checkpointing`:
        the same loss and gradients, activations recomputed in the backward
        pass instead of kept. `enabled=False` turns it off."""
        self.network.enable_gradient_checkpointing(enabled)
        self.train_function = None

    def fit(self, x=None, y=None, *args, **kwargs):
        """`LatentDiffusionModel.fit`. The images may be of any size the
        UNet divides (the model's own, or another, as diffusers' scripts'
        `--resolution`: SDXL at 512x512 where 1024x1024 does not fit); they
        are not resized, and a size that does not divide is refused in one
        line. `x` may also be the latents `encode_latents` made of the
        images: the frozen VAE then does not run in each step."""
        latents = self.is_latents(x)
        if getattr(self, "_fit_on_latents", latents) != latents:
            # A step traced for images does not take latents, nor the other
            # way round (TensorFlow's retrace loosens the channel count).
            self.train_function = None
        self._fit_on_latents = latents
        if latents:
            if not np.isfinite(x).all():
                raise ValueError("the latents hold NaN or infinite values.")
            y = conditioning.check_fit_condition(self, y, len(x))
            backend.before_fit(self)
            # DiffusionModel.fit would check them as images in [0, 1].
            return keras.Model.fit(self, x.astype("float32", copy=False), y, *args, **kwargs)
        return super().fit(x, y, *args, **kwargs)

    def is_latents(self, x):
        """Whether `x` is a NumPy array of latents (NHWC with the latent
        channels, where images have others), not images: those of
        `encode_latents`, at the model's size or another."""
        return (isinstance(x, np.ndarray) and x.ndim == 4
                and x.shape[-1] == self.sample_shape[-1] != self.image_shape[-1])

    def encode_latents(self, images, batch_size=4):
        """The latents of `images` (NumPy, in [0, 1], of a size `fit` takes),
        one posterior sample each times the VAE's scaling factor, as the
        train step would draw them: computed once, `fit` then trains on them
        without running the frozen VAE in every step (diffusers' and kohya's
        "cache latents"; at SD 1.5 size the encoding was a third of a LoRA
        step, docs/stable_diffusion.md). Returns float32 `(N, H / f, W / f,
        C)`, `f` the VAE's factor: `sample_shape` at the model's size."""
        images = check_training_images(images, pipeline.training_image_shape(self, images))
        batch_size = check_integer("batch_size", batch_size)
        latents = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            batch = batch.astype("float32") / 255 if batch.dtype == np.uint8 else batch
            latents.append(ops.convert_to_numpy(super().diffusion_inputs(
                ops.convert_to_tensor(batch.astype("float32", copy=False)))))
        return np.concatenate(latents).astype("float32", copy=False)

    def diffusion_inputs(self, images):
        """The latent model's (a posterior sample of the images' latents),
        or the batch itself when it holds latents (`encode_latents`): told
        apart by the channel count, the latents' 4 against the images' 3."""
        if images.shape[-1] == self.sample_shape[-1] != self.image_shape[-1]:
            return ops.cast(images, "float32")
        return super().diffusion_inputs(images)

    def training_noise(self, shape):
        """Gaussian noise of `shape` `(B, H, W, C)` for a training step, with
        `noise_offset` times a per-image, per-channel constant added
        (diffusers' `noise += noise_offset * randn(B, C, 1, 1)`)."""
        noise = keras.random.normal(shape, dtype="float32", seed=self.seed_generator)
        if not self.noise_offset:
            return noise
        offset = keras.random.normal((shape[0], 1, 1, shape[-1]), dtype="float32",
                                     seed=self.seed_generator)
        return noise + self.noise_offset * offset

    def compute_diffusion_loss(self, images, labels=None, training=True, sample_weight=None):
        """The latent model's objective (`DiffusionModel.compute_diffusion_loss`,
        the same draws in the same order), its training noise from
        `training_noise` (`noise_offset`) and the network's conditioning
        inputs from `training_conditions`."""
        x0 = self.diffusion_inputs(images)
        t = self.schedule.draw_levels(ops.shape(x0)[0], seed=self.seed_generator)
        noise = (self.training_noise(ops.shape(x0)) if training else
                 keras.random.normal(ops.shape(x0), dtype="float32", seed=self.seed_generator))
        inputs = [self.schedule.add_noise(x0, noise, t), self.schedule.network_time(t),
                  *self.training_conditions(labels, x0, training=training)]
        output = ops.cast(self.network(inputs, training=training), "float32")
        target = self.schedule.target(x0, noise, t, self.prediction)
        per_example = ops.mean(ops.square(output - target), axis=(1, 2, 3))
        weights = self.schedule.loss_weight(t, self.prediction, self.min_snr_gamma)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        return ops.mean(weights * per_example)

    def training_conditions(self, labels, x0, training=True):
        """The network's inputs after `[x_t, t]` in a training step on the
        clean latents `x0`: the text features of the batch's token ids
        (`conditioning.network_condition`, with prompt dropout)."""
        return [conditioning.network_condition(self, labels, ops.shape(x0)[0],
                                               training=training)]

    def get_config(self):
        return dict(super().get_config(), noise_offset=self.noise_offset)

    # ------------------------------------------------------------------ LoRA
    def lora_parts(self):
        """The parts a LoRA file names, by its names for them."""
        return {"unet": self.network, "text_encoder": self.text_encoder}

    def enable_lora(self, rank=8, alpha=None, targets=lora.ATTENTION_TARGETS,
                    text_encoder=False, seed=None):
        """Keras' LoRA (`Dense.enable_lora`) on the UNet's dense layers whose
        diffusers module paths end with one of `targets` (default the
        attention projections; `lora.FEED_FORWARD_TARGETS` adds the
        feed-forward), and with `text_encoder=True` on the text encoder's
        attention projections (or a list of suffixes). `alpha` None is
        `rank`. A starts as peft draws it (from `seed`), B at zero, so the
        images are unchanged until training. Afterwards only the LoRA
        matrices are trainable; compile (again) before `fit`. Once per
        model. `save` (a `.keras` file) writes the LoRA merged into the
        kernels, as Keras does; `save_lora_weights` writes it apart."""
        lora.enable_lora(self, rank=rank, alpha=alpha, targets=targets,
                         text_encoder=text_encoder, seed=seed)

    def load_lora_weights(self, path, scale=1.0, adapter_name=None):
        """Load a LoRA file or folder as diffusers' training scripts, peft,
        kohya or A1111 wrote it, applied at `scale`, as the adapter
        `adapter_name` (None: "default", replaced by a later load of the
        same name; another name adds a LoRA, and all apply):
        `keras_diffusion.stable_diffusion.lora.load_lora_weights`. A LoRA
        for another model raises one `ValueError` naming the first keys
        that do not fit, and changes nothing."""
        lora.load_lora_weights(self, path, scale=scale, adapter_name=adapter_name)

    def set_adapters(self, adapter_names, weights=None):
        """Apply only the LoRA adapters named, each at its weight (one
        number, one per adapter, or None for 1.0), as diffusers does."""
        lora.set_adapters(self, adapter_names, weights)

    def delete_adapters(self, adapter_names):
        """Remove the LoRA adapters named (one name or a list)."""
        lora.delete_adapters(self, adapter_names)

    def unload_lora_weights(self):
        """Remove every LoRA adapter."""
        lora.unload_lora_weights(self)

    def get_active_adapters(self):
        """The names of the LoRA adapters that apply now."""
        return lora.get_active_adapters(self)

    def get_list_adapters(self):
        """The names of the LoRA adapters loaded, active or not."""
        return lora.get_list_adapters(self)

    def save_lora_weights(self, path, format="peft", adapter_name=None):
        """Write the LoRA as `pytorch_lora_weights.safetensors` in the folder
        `path` (or to `path` if it ends with `.safetensors`), in diffusers'
        peft format (`format="peft"`, which diffusers' `load_lora_weights`
        reads) or kohya's (`"kohya"`): the adapter `adapter_name`, by
        default the one `fit` trains. Returns the file's path."""
        return lora.save_lora_weights(self, path, format=format, adapter_name=adapter_name)

    def fuse_lora(self, scale=1.0):
        """Merge the LoRA, times `scale`, into the base kernels (sampling
        then costs what it did without LoRA); `unfuse_lora` takes it out."""
        lora.fuse_lora(self, scale=scale)

    def unfuse_lora(self):
        """Take a fused LoRA out of the base kernels again."""
        lora.unfuse_lora(self)

    # ------------------------------------------------------------- diffusers
    def save_diffusers(self, path, overwrite=False):
        """Write the model as a diffusers `StableDiffusionPipeline` folder
        (configs, float32 safetensors weights, tokenizer files, a
        `DDIMScheduler` config), which `from_pretrained` loads to the same
        images; LoRA layers are written merged. Nothing is left half-written
        on failure; an existing `path` is replaced only with `overwrite`.
        Returns the path. See `keras_diffusion.stable_diffusion.diffusers_folder`."""
        return diffusers_folder.save_diffusers(self, path, overwrite=overwrite)


def _check_pixel_pairs(name, value, low):
    """An SDXL size or crop given per image: `(N, 2)` whole numbers of
    pixels, `(height, width)` or `(top, left)`, each at least `low`."""
    array = np.asarray(value)
    what = "(height, width) of at least 1" if low else "(top, left) of at least 0"
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.number) \
            or not np.isfinite(array).all() or (array < low).any() \
            or (array != np.round(array)).any():
        raise ValueError(f"y[{name!r}] must be (N, 2) whole numbers of pixels, "
                         f"{what}, one row per image; got shape {array.shape}: "
                         f"{str(array.tolist())[:80]}.")
    return array.astype("float32")


def _check_noise_offset(noise_offset):
    if not is_number(noise_offset) or not 0 <= noise_offset < 1:
        raise ValueError(f"noise_offset must be a number in [0, 1); got {noise_offset!r}.")
    return float(noise_offset)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusionXL")
class StableDiffusionXL(StableDiffusion):
    """A Stable Diffusion XL base or refiner model; build one with
    `keras_diffusion.load_model(folder)`.

    `generate`, guidance with negative prompts, the samplers and `img2img`
    are the Stable Diffusion model's; what SDXL adds is its conditioning
    (see `keras_diffusion.stable_diffusion.xl`). The refiner (a
    `StableDiffusionXLImg2ImgPipeline` folder: only the second text encoder,
    an aesthetic score in its time ids) refines: `img2img` of images or
    latents, or the end of a base model's run (`denoising_start`), as
    diffusers' ensemble of experts:

    >>> latents = base.generate(1, prompts=p, steps=40, sampler="euler",
    ...                         denoising_end=0.8, output="latents")
    >>> image = refiner.img2img(latents, prompts=p, steps=40, sampler="euler",
    ...                         denoising_start=0.8)

    The base model fine-tunes with `fit` as Stable Diffusion does (see
    `fit` for SDXL's per-image time ids); `enable_lora(text_encoder=True)`
    puts LoRA on the UNet and both text encoders, and LoRA files name
    them `unet`, `text_encoder`, `text_encoder_2` (kohya: `lora_unet_`
    with the UNet's original SGM names, `lora_te1_`, `lora_te2_`):

    >>> base.enable_lora(rank=8, text_encoder=True)
    >>> base.compile(optimizer=keras.optimizers.AdamW(1e-4))
    >>> base.fit(images, {"prompts": captions, "original_size": sizes,
    ...                   "crop_top_left": crops}, batch_size=1, epochs=10)
    >>> base.save_lora_weights("my_lora/", format="kohya")

    Args:
        force_zeros_for_empty_prompt: without a negative prompt, guide away
            from zero features and pooled output (diffusers' default for
            SDXL base) rather than from the empty prompt's.
        requires_aesthetics_score: the UNet's time ids end with an
            aesthetic score instead of the target size (the refiner's).
        aesthetic_score, negative_aesthetic_score: those scores for the
            prompt's branch of guidance and the other (diffusers' 6 and 2.5).
        Other arguments as `StableDiffusion`'s.
    """

    def __init__(self, *args, force_zeros_for_empty_prompt=True, requires_aesthetics_score=False,
                 aesthetic_score=6.0, negative_aesthetic_score=2.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        for name, score in (("aesthetic_score", aesthetic_score),
                            ("negative_aesthetic_score", negative_aesthetic_score)):
            if not is_number(score):
                raise ValueError(f"{name} must be a number; got {score!r}.")
        self.aesthetic_score = float(aesthetic_score)
        self.negative_aesthetic_score = float(negative_aesthetic_score)

    def added_conditions(self, x, pooled, negative=False):
        """The UNet's inputs after the context for latents `x`: the pooled
        prompt and SDXL's time ids, as diffusers' pipelines set them by
        default: original size and crop offsets (0, 0), then the target
        size (base) or the aesthetic score (refiner; `negative`: for the
        other branch of guidance), sizes in pixels of the image."""
        factor = self.autoencoder.factor
        height, width = x.shape[1] * factor, x.shape[2] * factor
        if self.requires_aesthetics_score:
            last = [self.negative_aesthetic_score if negative else self.aesthetic_score]
        else:
            last = [height, width]
        ids = ops.convert_to_tensor(np.array([height, width, 0, 0, *last], "float32"))
        return [pooled, ops.broadcast_to(ids[None], (ops.shape(x)[0], ids.shape[0]))]

    def generate(self, *args, **kwargs):
        """`StableDiffusion.generate`; a refiner refuses: it refines images."""
        if self.requires_aesthetics_score:
            raise ValueError(
                "this is an SDXL refiner (its UNet is conditioned on an aesthetic score), which "
                "refines images rather than making them: call img2img(images or latents, "
                "prompts=..., strength=0.3), or img2img(latents, denoising_start=0.8) on a base "
                "model's generate(..., denoising_end=0.8, output='latents').")
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------ training
    # What `fit`'s y may give per image besides the captions (a dict).
    image_conditions = ("original_size", "crop_top_left")

    def fit(self, x=None, y=None, *args, **kwargs):
        """`StableDiffusion.fit` with SDXL's conditioning, as diffusers'
        `train_text_to_image_sdxl.py` and `train_dreambooth_lora_sdxl.py`
        train: the UNet takes the captions' features, the second encoder's
        pooled output and six time ids per image, its original size `(h,
        w)`, the top-left corner `(top, left)` of the crop taken from it
        once resized, and the target size (the model's). `y` is the
        captions (original size = target size, crop (0, 0): images made at
        the model's size), or a dict `{"prompts": captions,
        "original_size": (N, 2), "crop_top_left": (N, 2)}` in pixels, either
        size key left out for its default; a dataset yields `(images,
        token_ids)` or `(images, that dict with token ids)` batches."""
        if self.requires_aesthetics_score:
            raise ValueError("fine-tuning the SDXL refiner with fit is not built (its time ids "
                             "hold an aesthetic score no training script sets); fine-tune the "
                             "SDXL base model.")
        if isinstance(y, dict):
            y = dict(y)
            for name, low in (("original_size", 1), ("crop_top_left", 0)):
                if name in y:
                    y[name] = _check_pixel_pairs(name, y[name], low)
        return super().fit(x, y, *args, **kwargs)

    def unpack_batch(self, data):
        """`StableDiffusion.unpack_batch`; with a dict `y`, Keras repeats
        `fit`'s one `sample_weight` array per entry: that array is the weight."""
        images, labels, sample_weight = super().unpack_batch(data)
        if isinstance(sample_weight, dict):
            sample_weight = sample_weight["prompts"]
        return images, labels, sample_weight

    def training_conditions(self, labels, x0, training=True):
        """The UNet's inputs after `[x_t, t]`: the features and pooled
        output of the batch's captions (with prompt dropout to the empty
        prompt, as diffusers' `--proportion_empty_prompts`), and each
        image's time ids `(original size, crop top-left, target size)`."""
        given = labels if isinstance(labels, dict) else {"prompts": labels}
        features, pooled = conditioning.encode_prompts(self, given["prompts"], training=training,
                                                       pooled=True)
        batch, factor = ops.shape(x0)[0], self.autoencoder.factor
        target = ops.convert_to_tensor(
            np.array([[x0.shape[1] * factor, x0.shape[2] * factor]], "float32"))
        target = ops.broadcast_to(target, (batch, 2))
        original = ops.cast(given["original_size"], "float32") if "original_size" in given \
            else target
        crop = ops.cast(given["crop_top_left"], "float32") if "crop_top_left" in given \
            else ops.zeros((batch, 2), "float32")
        return [features, pooled, ops.concatenate([original, crop, target], axis=1)]

    # ------------------------------------------------------------------ LoRA
    lora_family = "SDXL"  # named when a LoRA file does not fit

    def lora_parts(self):
        """The parts a LoRA file names, by its names for them: the UNet and
        both text encoders (the refiner's second alone)."""
        parts = {"unet": self.network, "text_encoder": self.text_encoder.first,
                 "text_encoder_2": self.text_encoder.second}
        return {name: part for name, part in parts.items() if part is not None}

    def get_config(self):
        return {**super().get_config(),
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                "requires_aesthetics_score": self.requires_aesthetics_score,
                "aesthetic_score": self.aesthetic_score,
                "negative_aesthetic_score": self.negative_aesthetic_score}
