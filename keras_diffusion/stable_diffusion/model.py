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

from keras_diffusion import backend
from keras_diffusion import conditioning
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.data import check_training_images
from keras_diffusion.latent import LatentDiffusionModel
from keras_diffusion.model import check_model_arguments
from keras_diffusion.stable_diffusion import diffusers_folder
from keras_diffusion.stable_diffusion import lora


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
        """`LatentDiffusionModel.fit`; NumPy images of another size than the
        model's are refused with one error (they are not resized). `x` may
        also be the latents `encode_latents` made of the images (shaped as
        `sample_shape`): the frozen VAE then does not run in each step."""
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
        if isinstance(x, np.ndarray) and x.ndim == 4 and tuple(x.shape[1:3]) != \
                tuple(self.image_shape[:2]):
            height, width = self.image_shape[:2]
            raise ValueError(
                f"the training images are {x.shape[1]}x{x.shape[2]}, but this Stable Diffusion "
                f"model trains at {height}x{width} (its image size); resize or crop them to "
                f"{height}x{width} first, e.g. keras_diffusion.load_image_folder(folder, "
                f"image_size=({height}, {width}))."
            )
        return super().fit(x, y, *args, **kwargs)

    def is_latents(self, x):
        """Whether `x` is a NumPy array of latents (`sample_shape` per
        example, latent channels where images have others), not images."""
        return (isinstance(x, np.ndarray) and x.ndim == 4
                and tuple(x.shape[1:]) == tuple(self.sample_shape)
                and self.sample_shape[-1] != self.image_shape[-1])

    def encode_latents(self, images, batch_size=4):
        """The latents of `images` (NumPy, in [0, 1], of the model's size),
        one posterior sample each times the VAE's scaling factor, as the
        train step would draw them: computed once, `fit` then trains on them
        without running the frozen VAE in every step (diffusers' and kohya's
        "cache latents"; at SD 1.5 size the encoding was a third of a LoRA
        step, docs/stable_diffusion.md). Returns float32 `(N,) +
        sample_shape`."""
        images = check_training_images(images, self.image_shape)
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
        """The latent model's objective (`DiffusionModel.compute_diffusion_loss`),
        its training noise from `training_noise` when `noise_offset` is set."""
        if not (training and self.noise_offset):
            weighted = {} if sample_weight is None else {"sample_weight": sample_weight}
            return super().compute_diffusion_loss(images, labels, training=training, **weighted)
        x0 = self.diffusion_inputs(images)
        batch = ops.shape(x0)[0]
        t = keras.random.randint((batch,), 0, self.schedule.timesteps, dtype="int32",
                                 seed=self.seed_generator)
        noise = self.training_noise(ops.shape(x0))
        condition = conditioning.network_condition(self, labels, batch, training=training)
        output = self.network([self.schedule.add_noise(x0, noise, t), t, condition],
                              training=training)
        target = self.schedule.target(x0, noise, t, self.prediction)
        per_example = ops.mean(ops.square(ops.cast(output, "float32") - target), axis=(1, 2, 3))
        weights = self.schedule.loss_weight(t, self.prediction, self.min_snr_gamma)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        return ops.mean(weights * per_example)

    def get_config(self):
        return dict(super().get_config(), noise_offset=self.noise_offset)

    # ------------------------------------------------------------------ LoRA
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


def _check_noise_offset(noise_offset):
    if not is_number(noise_offset) or not 0 <= noise_offset < 1:
        raise ValueError(f"noise_offset must be a number in [0, 1); got {noise_offset!r}.")
    return float(noise_offset)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusionXL")
class StableDiffusionXL(StableDiffusion):
    """A Stable Diffusion XL base model; build one with
    `keras_diffusion.load_model(folder)`.

    `generate`, guidance with negative prompts, the samplers and `img2img`
    are the Stable Diffusion model's; what SDXL adds is its conditioning
    (see this module). Fine-tuning SDXL with `fit` is not built yet: `fit`
    says so.

    Args:
        force_zeros_for_empty_prompt: without a negative prompt, guide away
            from zero features and pooled output (diffusers' default for
            SDXL base) rather than from the empty prompt's.
        Other arguments as `StableDiffusion`'s.
    """

    def __init__(self, *args, force_zeros_for_empty_prompt=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    def added_conditions(self, x, pooled):
        """The UNet's inputs after the context for latents `x`: the pooled
        prompt and SDXL's six time ids, original size, crop offsets (0, 0)
        and target size, each the image's height and width in pixels, as
        diffusers' pipeline sets them by default."""
        factor = self.autoencoder.factor
        height, width = x.shape[1] * factor, x.shape[2] * factor
        ids = ops.convert_to_tensor(np.array([height, width, 0, 0, height, width], "float32"))
        return [pooled, ops.broadcast_to(ids[None], (ops.shape(x)[0], 6))]

    def fit(self, *args, **kwargs):
        raise ValueError("fine-tuning SDXL with fit is not built yet (its training step needs "
                         "the pooled prompt and the time ids per image); generate, img2img and "
                         "the samplers work.")

    def get_config(self):
        return {**super().get_config(),
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
