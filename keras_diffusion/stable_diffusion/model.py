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

from keras_diffusion.latent import LatentDiffusionModel
from keras_diffusion.stable_diffusion import diffusers_folder
from keras_diffusion.stable_diffusion import lora


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusion")
class StableDiffusion(LatentDiffusionModel):
    """A Stable Diffusion 1.x / 2.x model; build one with
    `keras_diffusion.load_model(folder_or_file)`.

    Fine-tuning is `fit` on images in [0, 1] of the model's size with one
    caption each: of the whole UNet (every UNet weight trains; the VAE and
    text encoder are frozen), or, after `enable_lora`, of LoRA matrices
    only. Captions are not dropped by default (`prompt_dropout=0`), as in
    diffusers' fine-tuning scripts.

    Example:

    >>> sd = kd.load_model("path/to/stable-diffusion-v1-5")
    >>> images = sd.generate(2, prompts="a photo of a cat", guidance_scale=7.5,
    ...                      steps=20, sampler="dpmpp_2m", seed=0)
    >>> sd.enable_lora(rank=8)
    >>> sd.compile(optimizer=keras.optimizers.AdamW(1e-4))
    >>> sd.fit(images, captions, batch_size=1, epochs=10)
    >>> sd.save_lora_weights("my_lora/")
    """

    def __init__(self, *args, prompt_dropout=0.0, **kwargs):
        super().__init__(*args, prompt_dropout=prompt_dropout, **kwargs)

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
        model."""
        lora.enable_lora(self, rank=rank, alpha=alpha, targets=targets,
                         text_encoder=text_encoder, seed=seed)

    def load_lora_weights(self, path, scale=1.0):
        """Load a LoRA file or folder in diffusers/peft or kohya format, its
        strength times `scale`: `keras_diffusion.stable_diffusion.lora.
        load_lora_weights`. A LoRA for another architecture raises one
        `ValueError` naming the first keys that do not fit."""
        lora.load_lora_weights(self, path, scale=scale)

    def save_lora_weights(self, path, format="peft"):
        """Write the LoRA as `pytorch_lora_weights.safetensors` in the folder
        `path` (or to `path` if it ends with `.safetensors`), in diffusers'
        peft format (`format="peft"`, which diffusers' `load_lora_weights`
        reads) or kohya's (`"kohya"`). Returns the file's path."""
        return lora.save_lora_weights(self, path, format=format)

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
