"""The UNet of Stable Diffusion 1.x / 2.x (Rombach et al. 2022, appendix E):
the function of diffusers' `UNet2DConditionModel` in the configurations
those checkpoints use, as a functional Keras model.

Level `i` of `block_out_channels` runs `layers_per_block` residual blocks
(each followed, in a cross-attention block, by a `Transformer2D` that
attends to the positions of the map and to the prompt's features), then a
stride-2 convolution; the middle is residual, transformer, residual; the up
path mirrors the levels with one more residual block each, fed the matching
down-path activations by concatenation, and doubles the resolution with
nearest upsampling and a 3x3 convolution. Timesteps enter through the
sinusoidal `time_proj` and the two-layer `time_embedding`, which every
residual block adds to its features.

Every layer holding weights knows its module path in diffusers' state dict
(`module_path`, e.g. `"down_blocks.0.resnets.0.conv1"`; its Keras name is
`keras_name(module_path)`, `"down_blocks_0_resnets_0_conv1"`), so
`weights.load_state_dict(unet, diffusers_unet_state_dict)` needs no table.
The layers holding weights are the VAE's and the text encoder's, shared.
"""

import copy
import json
import math

import keras
import numpy as np
from keras import layers, ops

from keras_diffusion import backend
from keras_diffusion.stable_diffusion.clip import LayerNormalization
from keras_diffusion.stable_diffusion.layers import Conv2D
from keras_diffusion.stable_diffusion.layers import Dense
from keras_diffusion.stable_diffusion.layers import GroupNormalization
from keras_diffusion.stable_diffusion.layers import _Block
from keras_diffusion.stable_diffusion.layers import float32_output
from keras_diffusion.stable_diffusion.layers import ReferenceConfigured
from keras_diffusion.stable_diffusion.layers import half_weights_policy
from keras_diffusion.stable_diffusion.layers import keras_name

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
_TRANSFORMER_NORM_EPSILON = 1e-6  # diffusers' Transformer2DModel fixes its group norm's
_LAYER_NORM_EPSILON = 1e-5  # and its BasicTransformerBlock's layer norms' epsilons

# The keys of diffusers' config that this UNet implements, with diffusers' defaults.
DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
    "time_embedding_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    # SDXL: transformers several blocks deep, and the "text_time" added
    # embedding of the pooled prompt and the micro-conditioning time ids.
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
ADDITION_EMBED_TYPES = (None, "text_time")

# Options of diffusers' config that SDXL and other families use, with the
# values that leave them off: the only values accepted.
_OFF = {
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",),
}

# Other keys do not change the function of the blocks built here
# (`sample_size`, `resnet_skip_time_act`, `resnet_out_scale_factor`,
# `cross_attention_norm`, `mid_block_only_cross_attention` configure other
# block types or describe the checkpoint), and diffusers ignores keys it does
# not know: `from_reference_config` ignores them all.


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDUNetTimesteps")
class Timesteps(layers.Layer):
    """diffusers' `Timesteps`: the sinusoidal embedding of scalar timesteps
    (Vaswani et al. 2017, sec. 3.5), in float32 whatever the dtype policy.

    With `half = dim // 2` and frequencies
    `f_i = exp(-ln(10000) i / (half - freq_shift))`, the embedding is
    `[sin(t f), cos(t f)]`, or `[cos(t f), sin(t f)]` with `flip_sin_to_cos`
    (and a zero column appended when `dim` is odd).

    Args:
        dim: embedding size.
        flip_sin_to_cos: put the cosines first.
        freq_shift: the `downscale_freq_shift` of the frequencies.

    Input shape: `(B,)` integer or float timesteps. Output shape: `(B, dim)`.

    Example:

    >>> Timesteps(320)(np.array([1, 999])).shape
    (2, 320)
    """

    def __init__(self, dim, flip_sin_to_cos=True, freq_shift=0.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.freq_shift = float(freq_shift)
        half = self.dim // 2
        if half - self.freq_shift == 0:
            raise ValueError(f"freq_shift must differ from dim // 2 = {half}; got {freq_shift!r}.")
        exponent = -math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - self.freq_shift)
        self.frequencies = np.exp(exponent).astype(np.float32)

    def call(self, t):
        t = ops.cast(ops.reshape(t, (-1, 1)), "float32")
        phases = t * ops.convert_to_tensor(self.frequencies[None, :], "float32")
        parts = [ops.sin(phases), ops.cos(phases)]
        if self.flip_sin_to_cos:
            parts.reverse()
        if self.dim % 2:
            parts.append(ops.zeros_like(phases[:, :1]))
        return ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, t_shape):
        return (t_shape[0], self.dim)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(dim=self.dim, flip_sin_to_cos=self.flip_sin_to_cos,
                      freq_shift=self.freq_shift)
        return config


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDUNetResnetBlock2D")
class ResnetBlock2D(_Block):
    """diffusers' `ResnetBlock2D` with a time embedding (`"default"` time
    norm): `h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))`, then
    `h = conv2(dropout(silu(norm2(h))))`; the output is
    `(shortcut(x) + h) / output_scale_factor`, `shortcut` a 1x1 convolution
    (`conv_shortcut`) when the channel count changes.

    Args:
        out_channels: output channels.
        module_path: where the block sits in the reference state dict.
        groups: groups of both group norms.
        epsilon: epsilon of both group norms.
        dropout: dropout rate before `conv2`.
        output_scale_factor: what the sum is divided by.

    Call arguments: `x` `(B, H, W, C_in)`, `temb` `(B, E)`, `training`.
    Output shape: `(B, H, W, out_channels)`.

    With `gradient_checkpointing` set (by
    `StableDiffusionUNet.enable_gradient_checkpointing`), the block runs
    under `keras.remat`: its activations are recomputed in the backward
    pass instead of kept.

    Example:

    >>> block = ResnetBlock2D(64, "down_blocks.0.resnets.0")
    >>> block(np.zeros((1, 8, 8, 32)), np.zeros((1, 128))).shape
    (1, 8, 8, 64)
    """

    def __init__(self, out_channels, module_path, groups=32, epsilon=1e-5, dropout=0.0,
                 output_scale_factor=1.0, **kwargs):
        super().__init__(module_path, **kwargs)
        self.gradient_checkpointing = False
        self.out_channels = int(out_channels)
        self.groups = int(groups)
        self.epsilon = float(epsilon)
        self.dropout = float(dropout)
        self.output_scale_factor = float(output_scale_factor)
        self.norm1 = GroupNormalization(groups, self._sub("norm1"), epsilon=epsilon)
        self.conv1 = Conv2D(out_channels, 3, self._sub("conv1"), padding="same")
        self.time_emb_proj = Dense(out_channels, self._sub("time_emb_proj"))
        self.norm2 = GroupNormalization(groups, self._sub("norm2"), epsilon=epsilon)
        self.dropout_layer = layers.Dropout(dropout, name="dropout")
        self.conv2 = Conv2D(out_channels, 3, self._sub("conv2"), padding="same")
        self.conv_shortcut = None

    def build(self, x_shape, temb_shape):
        out_shape = tuple(x_shape[:-1]) + (self.out_channels,)
        if x_shape[-1] != self.out_channels:
            self.conv_shortcut = Conv2D(self.out_channels, 1, self._sub("conv_shortcut"))
            self.conv_shortcut.build(x_shape)
        self.norm1.build(x_shape)
        self.conv1.build(x_shape)
        self.time_emb_proj.build(temb_shape)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)

    def call(self, x, temb, training=None):
        if self.gradient_checkpointing:
            return keras.remat(lambda x, temb: self._forward(x, temb, training))(x, temb)
        return self._forward(x, temb, training)

    def _forward(self, x, temb, training):
        h = self.conv1(ops.silu(self.norm1(x)))
        e = self.time_emb_proj(ops.silu(temb))
        h = h + ops.expand_dims(ops.expand_dims(e, 1), 1)
        h = self.dropout_layer(ops.silu(self.norm2(h)), training=training)
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if self.output_scale_factor == 1.0:
            return shortcut + h
        return (shortcut + h) / self.output_scale_factor

    def compute_output_shape(self, x_shape, temb_shape):
        return tuple(x_shape[:-1]) + (self.out_channels,)

    def get_config(self):
        config = super().get_config()
        config.update(out_channels=self.out_channels, groups=self.groups, epsilon=self.epsilon,
                      dropout=self.dropout, output_scale_factor=self.output_scale_factor)
        return config


def _split_heads(x, heads):
    """`(B, N, heads * d)` -> `(B, N, heads, d)`, the layout
    `backend.attention` takes (diffusers' `view(B, -1, heads, d)`)."""
    return ops.reshape(x, (-1, ops.shape(x)[1], heads, x.shape[-1] // heads))


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SDUNetBasicTransformerBlock")
class BasicTransformerBlock(_Block):
    """diffusers' `BasicTransformerBlock` (layer norms, no adaptive norm):
    `x + attn1(norm1(x))` (self-attention), `x + attn2(norm2(x), context)`
    (cross-attention to the prompt), `x + ff(norm3(x))` (a GEGLU feed-forward
    four times wider, Shazeer 2020). Each attention has bias-free `to_q`,
    `to_k`, `to_v` and a biased `to_out.0`; `backend.attention` computes its
    softmax in float32.

    Args:
        heads: attention heads.
        head_dim: width of each head; the attention's inner width is
            `heads * head_dim`.
        module_path: where the block sits in the reference state dict.

    Call arguments: `x` `(B, N, dim)`, `context` `(B, L, context_dim)`.
    Output shape: `(B, N, dim)`.

    Example:

    >>> block = BasicTransformerBlock(4, 8, "transformer_blocks.0")
    >>> block(np.zeros((1, 16, 32)), np.zeros((1, 7, 24))).shape
    (1, 16, 32)
    """

    def __init__(self, heads, head_dim, module_path, **kwargs):
        super().__init__(module_path, **kwargs)
        self.heads = int(heads)
        self.head_dim = int(head_dim)

    def build(self, x_shape, context_shape):
        x_shape = tuple(x_shape)
        dim = int(x_shape[-1])
        inner = self.heads * self.head_dim
        inner_shape = x_shape[:-1] + (inner,)
        self.norm1, self.norm2, self.norm3 = (
            LayerNormalization(_LAYER_NORM_EPSILON, self._sub(f"norm{i}")) for i in (1, 2, 3))
        self.attn1 = [Dense(inner, self._sub(f"attn1.to_{p}"), use_bias=False) for p in "qkv"]
        self.attn1_out = Dense(dim, self._sub("attn1.to_out.0"))
        self.attn2 = [Dense(inner, self._sub(f"attn2.to_{p}"), use_bias=False) for p in "qkv"]
        self.attn2_out = Dense(dim, self._sub("attn2.to_out.0"))
        self.ff_in = Dense(8 * dim, self._sub("ff.net.0.proj"))  # values and gates, 4 * dim each
        self.ff_out = Dense(dim, self._sub("ff.net.2"))
        for layer in (self.norm1, self.norm2, self.norm3, self.ff_in, *self.attn1, self.attn2[0]):
            layer.build(x_shape)
        for layer in self.attn2[1:]:
            layer.build(tuple(context_shape))
        self.attn1_out.build(inner_shape)
        self.attn2_out.build(inner_shape)
        self.ff_out.build(x_shape[:-1] + (4 * dim,))

    def _attention(self, projections, output, x, context):
        to_q, to_k, to_v = projections
        q, k, v = (_split_heads(a, self.heads) for a in (to_q(x), to_k(context), to_v(context)))
        h = backend.attention(q, k, v)
        return output(ops.reshape(h, (-1, ops.shape(x)[1], self.heads * self.head_dim)))

    def call(self, x, context):
        h = self.norm1(x)
        x = x + self._attention(self.attn1, self.attn1_out, h, h)
        x = x + self._attention(self.attn2, self.attn2_out, self.norm2(x), context)
        values, gates = ops.split(self.ff_in(self.norm3(x)), 2, axis=-1)
        return x + self.ff_out(values * ops.gelu(gates, approximate=False))

    def compute_output_shape(self, x_shape, context_shape):
        return x_shape

    def get_config(self):
        config = super().get_config()
        config.update(heads=self.heads, head_dim=self.head_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDUNetTransformer2D")
class Transformer2D(_Block):
    """diffusers' `Transformer2DModel` on a continuous feature map: group
    norm (epsilon 1e-6), `proj_in`, `depth` `BasicTransformerBlock`s over the
    `H * W` positions (1 in SD 1.x / 2.x, up to 10 in SDXL), `proj_out`,
    plus the input. The
    projections are 1x1 convolutions (SD 1.x) or, with
    `use_linear_projection`, dense layers (SD 2.x): the same function with
    differently laid-out weights, as both act on the channel axis alone.

    Args:
        heads: attention heads.
        head_dim: width of each head (diffusers passes `channels // heads`).
        module_path: where the layer sits in the reference state dict.
        groups: groups of the group norm.
        use_linear_projection: dense rather than 1x1 convolution projections.
        depth: transformer blocks, one after the other.

    Call arguments: `x` `(B, H, W, C)`, `context` `(B, L, context_dim)`.
    Output shape: `(B, H, W, C)`. `gradient_checkpointing` as in
    `ResnetBlock2D`.

    Example:

    >>> layer = Transformer2D(4, 8, "mid_block.attentions.0", groups=8)
    >>> layer(np.zeros((1, 4, 6, 32)), np.zeros((1, 7, 24))).shape
    (1, 4, 6, 32)
    """

    def __init__(self, heads, head_dim, module_path, groups=32, use_linear_projection=False,
                 depth=1, **kwargs):
        super().__init__(module_path, **kwargs)
        self.gradient_checkpointing = False
        self.heads = int(heads)
        self.head_dim = int(head_dim)
        self.groups = int(groups)
        self.use_linear_projection = bool(use_linear_projection)
        self.depth = int(depth)
        self.norm = GroupNormalization(groups, self._sub("norm"),
                                       epsilon=_TRANSFORMER_NORM_EPSILON)
        # The first block keeps its own attribute, so that files of one-deep
        # transformers keep their variables' places.
        self.block = BasicTransformerBlock(heads, head_dim, self._sub("transformer_blocks.0"))
        self.deeper_blocks = [BasicTransformerBlock(heads, head_dim,
                                                    self._sub(f"transformer_blocks.{k}"))
                              for k in range(1, self.depth)]

    def _projection(self, units, suffix):
        if self.use_linear_projection:
            return Dense(units, self._sub(suffix))
        return Conv2D(units, 1, self._sub(suffix))

    def build(self, x_shape, context_shape):
        inner = self.heads * self.head_dim
        self.proj_in = self._projection(inner, "proj_in")
        self.proj_out = self._projection(int(x_shape[-1]), "proj_out")
        self.norm.build(x_shape)
        self.proj_in.build(x_shape)
        self.proj_out.build(tuple(x_shape[:-1]) + (inner,))
        for block in [self.block, *self.deeper_blocks]:
            block.build((None, None, inner), context_shape)

    def call(self, x, context):
        if self.gradient_checkpointing:
            return keras.remat(self._forward)(x, context)
        return self._forward(x, context)

    def _forward(self, x, context):
        shape = ops.shape(x)
        inner = self.heads * self.head_dim
        h = self.proj_in(self.norm(x))
        h = ops.reshape(h, (-1, shape[1] * shape[2], inner))
        for block in [self.block, *self.deeper_blocks]:
            h = block(h, context)
        return x + self.proj_out(ops.reshape(h, (-1, shape[1], shape[2], inner)))

    def compute_output_shape(self, x_shape, context_shape):
        return x_shape

    def get_config(self):
        config = super().get_config()
        config.update(heads=self.heads, head_dim=self.head_dim, groups=self.groups,
                      use_linear_projection=self.use_linear_projection)
        if self.depth != 1:
            config["depth"] = self.depth
        return config


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDUNetTextTimeEmbedding")
class TextTimeEmbedding(layers.Layer):
    """SDXL's added embedding (diffusers' `addition_embed_type="text_time"`):
    each micro-conditioning time id (original size, crop offsets, target
    size, or the refiner's aesthetic score) embedded by `Timesteps(time_dim)`
    (`add_time_proj`), concatenated after the pooled prompt embedding, and
    mapped by `add_embedding` (linear, SiLU, linear) to the time embedding's
    width, which it is added to.

    Args:
        units: the time embedding's width.
        time_dim: `addition_time_embed_dim`.
        input_dim: `projection_class_embeddings_input_dim`, the pooled
            embedding's width plus `time_dim` per time id.
        flip_sin_to_cos, freq_shift: as the UNet's `Timesteps`.

    Call arguments: `text_embeds` `(B, D)`, `time_ids` `(B, n)` with `D + n
    time_dim = input_dim`. Output shape: `(B, units)`.
    """

    def __init__(self, units, time_dim, input_dim, flip_sin_to_cos=True, freq_shift=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.units, self.time_dim, self.input_dim = int(units), int(time_dim), int(input_dim)
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), float(freq_shift)
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos, freq_shift, name="add_time_proj")
        self.linear_1 = Dense(units, "add_embedding.linear_1", activation="silu")
        self.linear_2 = Dense(units, "add_embedding.linear_2")

    def build(self, text_embeds_shape, time_ids_shape):
        self.time_proj.build((None,))  # weightless, but fit builds what is not built
        self.linear_1.build((None, self.input_dim))
        self.linear_2.build((None, self.units))

    def call(self, text_embeds, time_ids):
        batch = ops.shape(text_embeds)[0]
        times = ops.reshape(self.time_proj(ops.reshape(time_ids, (-1,))), (batch, -1))
        joined = ops.concatenate([ops.cast(text_embeds, times.dtype), times], axis=-1)
        return self.linear_2(self.linear_1(ops.cast(joined, self.compute_dtype)))

    def compute_output_shape(self, text_embeds_shape, time_ids_shape):
        return (text_embeds_shape[0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, time_dim=self.time_dim, input_dim=self.input_dim,
                      flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        return config


# ---------------------------------------------------------------- the config
def _per_level(config, key, levels):
    """An int or a list with one entry per level -> a list."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{key} has {len(value)} entries, one per level is needed "
                             f"({levels} levels in block_out_channels); got {list(value)!r}.")
        values = list(value)
    else:
        values = [value] * levels
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{key} must be a positive integer or a list of them, one per level; "
                         f"got {value!r}.")
    return values


def _per_layer(value, layers, key):
    """A level's transformer depth (an int, or one per layer) -> a list."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * layers
    if len(values) != layers or not all(_is_int(v) for v in values):
        raise ValueError(f"{key} must give each level a positive integer, or one per layer of "
                         f"the level ({layers}); got {value!r}.")
    return values


def _depths(config):
    """Transformer depths as diffusers reads `transformer_layers_per_block`
    (an int, one per level, or per level one per layer) and
    `reverse_transformer_layers_per_block` (the up path's; default the down
    path's reversed): `(down[level][layer], up[block][layer], mid)`."""
    levels = len(config["block_out_channels"])
    per_block = _per_level(config, "layers_per_block", levels)
    key = "transformer_layers_per_block"
    value = config[key]
    per_level = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(per_level) != levels:
        raise ValueError(f"{key} has {len(per_level)} entries, one per level is needed "
                         f"({levels} levels in block_out_channels); got {value!r}.")
    down = [_per_layer(v, per_block[i], key) for i, v in enumerate(per_level)]
    reverse = config["reverse_transformer_layers_per_block"]
    up_levels = per_level[::-1] if reverse is None else list(reverse)
    if len(up_levels) != levels:
        raise ValueError(f"reverse_transformer_layers_per_block must have one entry per level "
                         f"({levels}); got {reverse!r}.")
    up = [_per_layer(v, per_block[levels - 1 - i] + 1, "reverse_transformer_layers_per_block")
          for i, v in enumerate(up_levels)]
    mid = per_level[-1]
    return down, up, (mid[0] if isinstance(mid, (list, tuple)) else mid)


def _check_text_time(config):
    kind = config["addition_embed_type"]
    if kind not in ADDITION_EMBED_TYPES:
        raise ValueError(f"the Stable Diffusion UNet does not support addition_embed_type="
                         f"{kind!r}; supported: None (SD 1.x / 2.x) and 'text_time' (SDXL).")
    if kind == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not _is_int(config[key]):
                raise ValueError(f"addition_embed_type='text_time' needs {key}, a positive "
                                 f"integer; got {config[key]!r}.")


def _check_off(key, value):
    accepted = _OFF[key]
    values = value if isinstance(value, (list, tuple)) and key != "act_fn" else [value]
    if not all(v in accepted for v in values) or (isinstance(value, (list, tuple)) and not value):
        raise ValueError(
            f"the Stable Diffusion UNet does not support {key}={value!r} (an option of SDXL and "
            f"other model families); supported: {key}={accepted[0]!r}, the SD 1.x / 2.x value."
        )


def _is_int(value, low=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_blocks(config, levels):
    for key, kinds in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        blocks = list(config[key])
        if len(blocks) != levels:
            raise ValueError(f"{key} must name one block per level ({levels} levels in "
                             f"block_out_channels); got {blocks!r}.")
        for block in blocks:
            if block not in kinds:
                raise ValueError(f"the Stable Diffusion UNet does not support the block type "
                                 f"{block!r} in {key}; supported: {', '.join(kinds)}.")
    if config["mid_block_type"] not in MID_BLOCKS:
        raise ValueError(f"the Stable Diffusion UNet does not support "
                         f"mid_block_type={config['mid_block_type']!r}; supported: "
                         f"{', '.join(MID_BLOCKS)}.")


def _check_config(config):
    """A complete, checked copy of a config holding `DEFAULTS`' keys, its
    tuples as lists (as JSON gives them back)."""
    config = {key: list(value) if isinstance(value, tuple) else copy.deepcopy(value)
              for key, value in config.items()}
    channels = config["block_out_channels"]
    if not isinstance(channels, list) or not channels or not all(map(_is_int, channels)):
        raise ValueError(f"block_out_channels must be a non-empty list of positive integers; "
                         f"got {channels!r}.")
    _check_blocks(config, len(channels))
    _per_level(config, "layers_per_block", len(channels))
    _per_level(config, "attention_head_dim", len(channels))
    _depths(config)
    _check_text_time(config)
    groups = config["norm_num_groups"]
    if not _is_int(groups):
        raise ValueError(f"norm_num_groups must be a positive integer; got {groups!r} (a UNet "
                         f"without group norms is not a Stable Diffusion UNet).")
    if any(c % groups for c in channels):
        raise ValueError(f"norm_num_groups={groups} must divide every entry of "
                         f"block_out_channels; got {channels!r}.")
    checks = {
        "in_channels": (_is_int, "a positive integer"),
        "out_channels": (_is_int, "a positive integer"),
        "cross_attention_dim": (_is_int, "a positive integer"),
        "conv_in_kernel": (lambda v: _is_int(v) and v % 2, "a positive odd integer"),
        "conv_out_kernel": (lambda v: _is_int(v) and v % 2, "a positive odd integer"),
        "downsample_padding": (lambda v: v in (0, 1), "0 or 1"),
        "time_embedding_dim": (lambda v: v is None or _is_int(v), "a positive integer or None"),
        "freq_shift": (_is_number, "a number"),
        "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "mid_block_scale_factor": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "norm_eps": (lambda v: _is_number(v) and v > 0, "a positive number"),
        **{key: (lambda v: isinstance(v, bool), "True or False")
           for key in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection")},
        # SDXL's config says null; diffusers reads it as False.
        "upcast_attention": (lambda v: v is None or isinstance(v, bool), "True, False or None"),
    }
    for key, (check, accepted) in checks.items():
        if not check(config[key]):
            raise ValueError(f"{key} must be {accepted}; got {config[key]!r}.")
    return config


# ------------------------------------------------------------------ the UNet
@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusionUNet")
class StableDiffusionUNet(ReferenceConfigured, keras.Model):
    """The UNet of Stable Diffusion 1.x / 2.x: diffusers'
    `UNet2DConditionModel` with `CrossAttnDownBlock2D` / `DownBlock2D` down
    blocks, a `UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D` /
    `UpBlock2D` up blocks, as a functional Keras model.

    The keyword arguments are the keys of diffusers' `config.json` that
    change the function, with diffusers' defaults (`DEFAULTS`); build from a
    checkpoint's config with `from_reference_config`. As in diffusers,
    `attention_head_dim` (an int, or one per level) is the number of heads of
    each level's transformers, whose heads are `channels // heads` wide.
    `upcast_attention` is accepted and changes nothing: the softmax runs in
    float32 anyway.

    Inputs: `[x_t, t, context]`: `x_t` `(B, H, W, in_channels)` float, `H`
        and `W` multiples of `downsampling_factor`; `t` `(B,)` timesteps,
        integer or float (taken as float32); `context` `(B, L,
        cross_attention_dim)` float, any `L`.
    Output: `(B, H, W, out_channels)` float32, also under a mixed-precision
        policy.

    Attributes:
        config: the reference config dict, complete (`DEFAULTS`' keys).
        context_dim: `cross_attention_dim`.
        downsampling_factor: `2 ** (levels - 1)`, what `H` and `W` must be
            multiples of.

    Example:

    >>> unet = StableDiffusionUNet(block_out_channels=[32, 64], norm_num_groups=8,
    ...     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    ...     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16)
    >>> unet([np.zeros((1, 8, 12, 4)), np.array([10]), np.zeros((1, 7, 16))]).shape
    (1, 8, 12, 4)
    """

    def __init__(self, name="unet", **options):
        model_kwargs = {k: options.pop(k) for k in ("trainable", "dtype") if k in options}
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"StableDiffusionUNet got unknown options {unknown}; it takes the "
                             f"keys of diffusers' UNet config it supports: {sorted(DEFAULTS)} "
                             f"(from_reference_config reads a whole config.json).")
        config = _check_config({**DEFAULTS, **options})
        inputs, outputs = _build(config)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **model_kwargs)
        self.weights_dtype = half_weights_policy()
        # Held as JSON text: Keras would track a dict attribute, and
        # copying a tracked structure walks the whole model.
        self._reference_config = json.dumps(config)
        self.context_dim = config["cross_attention_dim"]
        self.downsampling_factor = 2 ** (len(config["block_out_channels"]) - 1)


    @classmethod
    def from_reference_config(cls, config, **kwargs):
        """The UNet of a diffusers `unet/config.json` dict.

        Keys that do not change the function (`_class_name`, `sample_size`,
        options of block types not built here) are ignored, as are keys
        diffusers itself ignores; an option of SDXL or another family set to
        a value other than its off value raises one `ValueError` naming it.
        `kwargs` go to the constructor (e.g. `name`)."""
        if not isinstance(config, dict):
            raise ValueError(f"from_reference_config takes a config dict; got {type(config).__name__}.")
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"the Stable Diffusion UNet reads a UNet2DConditionModel config; "
                             f"got _class_name={class_name!r}.")
        for key in _OFF:
            if key in config:
                _check_off(key, config[key])
        options = {key: config[key] for key in DEFAULTS if key in config}
        return cls(**options, **kwargs)

    def enable_gradient_checkpointing(self, enabled=True):
        """Run every residual block and transformer under `keras.remat`
        (or not, with `enabled=False`), as diffusers'
        `enable_gradient_checkpointing`: training keeps only the blocks'
        inputs and recomputes their activations in the backward pass, the
        same gradients for less memory and more compute. A runtime
        setting, not saved with the model; a train function traced before
        keeps what it traced."""
        for layer in self._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, (ResnetBlock2D, Transformer2D)):
                layer.gradient_checkpointing = bool(enabled)



def _build(config):
    """The functional graph: `(inputs, outputs)`."""
    channels = config["block_out_channels"]
    levels = len(channels)
    per_block = _per_level(config, "layers_per_block", levels)
    heads = _per_level(config, "attention_head_dim", levels)
    groups, eps = config["norm_num_groups"], config["norm_eps"]
    time_dim = config["time_embedding_dim"] or 4 * channels[0]
    down_depth, up_depth, mid_depth = _depths(config)
    text_time = config["addition_embed_type"] == "text_time"

    x_t = keras.Input((None, None, config["in_channels"]), name="x_t")
    t = keras.Input((), dtype="float32", name="t")
    context = keras.Input((None, config["cross_attention_dim"]), name="context")
    inputs = [x_t, t, context]
    if text_time:  # SDXL: the pooled prompt and the micro-conditioning time ids
        inputs += [keras.Input((None,), name="text_embeds"), keras.Input((None,), name="time_ids")]

    def resnet(h, out_channels, path, scale=1.0):
        block = ResnetBlock2D(out_channels, path, groups=groups, epsilon=eps,
                              dropout=config["dropout"], output_scale_factor=scale)
        return block(h, emb)

    def transformer(h, level_heads, path, depth):
        width = h.shape[-1]
        layer = Transformer2D(level_heads, width // level_heads, path, groups=groups,
                              use_linear_projection=config["use_linear_projection"],
                              depth=depth)
        return layer(h, context)

    # === Time embedding ===
    emb = Timesteps(channels[0], config["flip_sin_to_cos"], config["freq_shift"],
                    name="time_proj")(t)
    emb = Dense(time_dim, "time_embedding.linear_1", activation="silu")(emb)
    emb = Dense(time_dim, "time_embedding.linear_2")(emb)
    if text_time:
        added = TextTimeEmbedding(time_dim, config["addition_time_embed_dim"],
                                  config["projection_class_embeddings_input_dim"],
                                  config["flip_sin_to_cos"], config["freq_shift"],
                                  name="add_embedding")(*inputs[3:])
        emb = layers.Add(name="add_text_time")([emb, added])

    # === Down path ===
    h = x_t
    if config["center_input_sample"]:
        h = layers.Rescaling(2.0, offset=-1.0, name="center_input_sample")(h)
    h = Conv2D(channels[0], config["conv_in_kernel"], "conv_in", padding="same")(h)
    skips = [h]
    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(per_block[i]):
            h = resnet(h, channels[i], f"down_blocks.{i}.resnets.{j}")
            if block_type == "CrossAttnDownBlock2D":
                h = transformer(h, heads[i], f"down_blocks.{i}.attentions.{j}",
                                down_depth[i][j])
            skips.append(h)
        if i < levels - 1:
            path = f"down_blocks.{i}.downsamplers.0.conv"
            # PyTorch pads symmetrically (padding=1), or diffusers pads
            # (0, 1, 0, 1) itself (padding=0); Keras' "same" would pad (0, 1).
            pad = 1 if config["downsample_padding"] == 1 else ((0, 1), (0, 1))
            h = layers.ZeroPadding2D(pad, name=keras_name(f"{path}.pad"))(h)
            h = Conv2D(channels[i], 3, path, strides=2, padding="valid")(h)
            skips.append(h)

    # === Middle ===
    scale = float(config["mid_block_scale_factor"])
    h = resnet(h, channels[-1], "mid_block.resnets.0", scale)
    h = transformer(h, heads[-1], "mid_block.attentions.0", mid_depth)
    h = resnet(h, channels[-1], "mid_block.resnets.1", scale)

    # === Up path: diffusers reverses the levels, heads and blocks per level ===
    for i, block_type in enumerate(config["up_block_types"]):
        level = levels - 1 - i
        for j in range(per_block[level] + 1):
            h = layers.Concatenate(name=keras_name(f"up_blocks.{i}.concat.{j}"))([h, skips.pop()])
            h = resnet(h, channels[level], f"up_blocks.{i}.resnets.{j}")
            if block_type == "CrossAttnUpBlock2D":
                h = transformer(h, heads[level], f"up_blocks.{i}.attentions.{j}", up_depth[i][j])
        if i < levels - 1:
            path = f"up_blocks.{i}.upsamplers.0.conv"
            h = layers.UpSampling2D(2, interpolation="nearest",
                                    name=keras_name(f"{path}.upsample"))(h)
            h = Conv2D(channels[level], 3, path, padding="same")(h)

    # === Output ===
    h = GroupNormalization(groups, "conv_norm_out", epsilon=eps)(h)
    h = layers.Activation("silu", name="conv_act")(h)
    outputs = float32_output(Conv2D, config["out_channels"], config["conv_out_kernel"],
                             "conv_out", padding="same")(h)
    return inputs, outputs
