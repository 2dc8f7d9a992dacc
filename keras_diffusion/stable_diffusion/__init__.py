"""Stable Diffusion 1.x / 2.x, SDXL and SD 3 / 3.5: the pretrained
checkpoints the world shares, as Keras parts that fill the slots of
`LatentDiffusionModel`.

Architecture and conversion are two rooms. `unet`, `vae`, `clip` and
`tokenizer` are ordinary Keras layers and models that know nothing of file
formats; each layer holding weights is named by its module path in the
reference implementation (diffusers / transformers), so `weights` derives
the table from a checkpoint key to a Keras variable from the layers
themselves, and `single_file` renames the original (CompVis / Stability)
single-file keys to those. `checkpoints` reads folders and files and
assembles SD 1.x / 2.x and SDXL models; what a later family adds lives in
its own module (`xl`, `sd3`, with `mmdit` and `t5`), and `loader` sends
each checkpoint to its family.
"""

