"""Stable Diffusion XL (Podell et al. 2023): what the family adds to the
Stable Diffusion parts.

- Two text encoders (`SDXLTextEncoders`): CLIP ViT-L (`CLIPTextModel`) and
  OpenCLIP ViT-bigG (`CLIPTextModelWithProjection`), each read at its
  penultimate layer, their features concatenated (768 + 1280 = 2048 wide in
  SDXL), and the second's projected pooled output, which the UNet's
  `text_time` embedding takes.
- Two tokenizers (`SDXLTokenizer`): each text's ids by the first, then by
  the second (whose padding token may differ), in one `(N, 2 L)` array, so
  a prompt stays one row of ids through the sampling pipeline.
- The refiner has only the second encoder and tokenizer (`first` None):
  its features are the second's alone (1280 wide), and its time ids carry
  an aesthetic score in place of the target size.
- Micro-conditioning (`StableDiffusionXL.added_conditions`, in
  `stable_diffusion/model.py` beside the model it extends): the time ids
  original size, crop offsets and target size, in pixels, embedded beside
  the pooled prompt; and `force_zeros_for_empty_prompt`: without a negative
  prompt, guidance steers away from zero features, as diffusers' pipeline.

The UNet is `StableDiffusionUNet` with SDXL's options (`text_time`,
transformers several blocks deep); the VAE is `StableDiffusionVAE` with its
config's `scaling_factor` (0.13025).
"""

import os

import keras
import numpy as np
from keras import ops

# model_index.json's options that the model takes.
CONFIG_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDXLTokenizer")
class SDXLTokenizer:
    """Texts to `(N, 2 * max_length)` int32 ids: SDXL's first tokenizer's
    ids, then its second's (the refiner's: `(N, max_length)`, the second's).

    Args:
        first, second: `CLIPTokenizer`s of the same length (77); `first`
            None for the refiner.
    """

    def __init__(self, first, second):
        if first is not None and first.max_length != second.max_length:
            raise ValueError(f"SDXL's two tokenizers must give ids of one length; got "
                             f"{first.max_length} and {second.max_length}.")
        self.first, self.second = first, second
        self.max_length = second.max_length

    def __call__(self, texts):
        tokenizers = [t for t in (self.first, self.second) if t is not None]
        return np.concatenate([np.asarray(t(texts)) for t in tokenizers],
                              axis=1).astype("int32")

    def save_folder(self, path):
        """Write the tokenizers' files as diffusers' folders do: the first's
        to `path`, the second's to `path` + "_2" (`tokenizer/`,
        `tokenizer_2/`); the refiner's one to `path` + "_2"."""
        path = os.fspath(path)
        if self.first is not None:
            self.first.save_folder(path)
        self.second.save_folder(path + "_2")

    def get_config(self):
        return {"first": keras.saving.serialize_keras_object(self.first),
                "second": keras.saving.serialize_keras_object(self.second)}

    @classmethod
    def from_config(cls, config):
        return cls(*(None if config[key] is None
                     else keras.saving.deserialize_keras_object(config[key])
                     for key in ("first", "second")))


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDXLTextEncoders")
class SDXLTextEncoders(keras.Model):
    """SDXL's two text encoders as one: ids `(B, 2 L)` (`SDXLTokenizer`'s)
    to `{"sequence_output": (B, L, D1 + D2), "pooled_output": (B, P)}`;
    the refiner's, with only the second, ids `(B, L)` to features
    `(B, L, D2)`.

    Args:
        first: a `CLIPTextTransformer` read at its penultimate layer
            (`skip_layers=1, final_layer_norm=False`); None for the refiner.
        second: the same, with a projection (`projection_dim`): its pooled
            output is the model's.
    """

    def __init__(self, first, second, **kwargs):
        super().__init__(**kwargs)
        if second.projection_dim is None:
            raise ValueError("SDXL's second text encoder must have a projection "
                             "(CLIPTextModelWithProjection); it has none.")
        self.first, self.second = first, second
        self.dim = second.hidden_size + (0 if first is None else first.hidden_size)
        self.max_length = second.max_length
        self.tokenizer = None

    @property
    def output_dim(self):
        return self.dim

    def call(self, ids, training=False):
        if self.first is None:
            features, pooled = self.second(ids)
            return {"sequence_output": features, "pooled_output": pooled}
        length = ops.shape(ids)[1] // 2
        features = self.first(ids[:, :length])
        second, pooled = self.second(ids[:, length:])
        return {"sequence_output": ops.concatenate([features, second], axis=-1),
                "pooled_output": pooled}

    def get_config(self):
        return {"name": self.name, "first": keras.saving.serialize_keras_object(self.first),
                "second": keras.saving.serialize_keras_object(self.second)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        parts = [None if config[k] is None else keras.saving.deserialize_keras_object(config[k])
                 for k in ("first", "second")]
        del config["first"], config["second"]
        return cls(*parts, **config)
