"""`StableDiffusion`: a loaded Stable Diffusion checkpoint.

It is a `LatentDiffusionModel` whose slots hold the Stable Diffusion parts
(`StableDiffusionUNet`, `StableDiffusionVAE`, `CLIPTextTransformer`,
`CLIPTokenizer`), so generation, guidance, the samplers, the applications,
export and `fit` are the latent model's own. What it adds is what only a
checkpoint of the PyTorch world has: writing it back as a diffusers folder
and LoRA files that diffusers and kohya-format tools read.
"""

import keras

from keras_diffusion.latent import LatentDiffusionModel


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusion")
class StableDiffusion(LatentDiffusionModel):
    """A Stable Diffusion 1.x / 2.x model; build one with
    `keras_diffusion.load_model(folder_or_file)`.

    Example:

    >>> sd = kd.load_model("path/to/stable-diffusion-v1-5")
    >>> images = sd.generate(2, prompts="a photo of a cat", guidance_scale=7.5,
    ...                      steps=20, sampler="dpmpp_2m", seed=0)
    """
