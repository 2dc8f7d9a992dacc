"""Stable Diffusion 1.x / 2.x: the pretrained checkpoints the world shares,
as Keras parts that fill the slots of `LatentDiffusionModel`.

Architecture and conversion are two rooms. `unet`, `vae`, `clip` and
`tokenizer` are ordinary Keras layers and models that know nothing of file
formats; each layer holding weights is named by its module path in the
reference implementation (diffusers / transformers), so `weights` derives
the table from a checkpoint key to a Keras variable from the layers
themselves, and `single_file` renames the original (CompVis / Stability)
single-file keys to those. `checkpoints` reads folders and files and
assembles the model.
"""

# The families' own parts (SDXL's text encoders and tokenizers, SD 3's), so
# that importing the package registers every class a `.keras` file names.
from keras_diffusion.stable_diffusion import sd3  # noqa: E402,F401
from keras_diffusion.stable_diffusion import xl  # noqa: E402,F401
