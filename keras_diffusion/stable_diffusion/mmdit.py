"""`SD3Transformer`: the MMDiT of Stable Diffusion 3 / 3.5 (Esser et al.
2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", sec. 4), the function of diffusers' `SD3Transformer2DModel` in
the configurations SD 3 medium, SD 3.5 medium and SD 3.5 large use.

The latents are cut into `patch_size` x `patch_size` patches, each a token
(`pos_embed.proj`, a strided convolution) plus its 2-D sinusoidal position,
read from a `pos_embed_max_size`-square table cropped to the centre of the
image's patch grid. The prompt's token features are projected to the same
width (`context_embedder`), and the timestep's sinusoidal embedding plus the
pooled prompt (`time_text_embed`) condition every block. Each
`JointTransformerBlock` keeps two streams, image and text, with their own
weights, modulated by the conditioning (adaLN-Zero, Peebles & Xie 2023) and
mixed by one attention over the tokens of both; SD 3.5 medium's first blocks
attend over the image tokens a second time (`attn2`). The last block only
reads the text stream. A last adaptive norm and `proj_out` give each token
its patch of the output.

Every layer holding weights knows its module path in diffusers' state dict
(`transformer_blocks.0.attn.to_q`), so `weights.load_state_dict(model,
state)` needs no table and `weights.checkpoint_table(model)` writes
diffusers' keys back; the square position table is a weight there too
(`pos_embed.pos_embed`, a buffer in diffusers, not trained).
"""

import json
import types

import keras
import numpy as np
from keras import layers, ops

from keras_diffusion import backend
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.layers import Conv2D
from keras_diffusion.stable_diffusion.layers import Dense
from keras_diffusion.stable_diffusion.layers import _AtModulePath
from keras_diffusion.stable_diffusion.layers import _Block
from keras_diffusion.stable_diffusion.layers import float32_output
from keras_diffusion.stable_diffusion.layers import ReferenceConfigured
from keras_diffusion.stable_diffusion.layers import half_weights_policy
from keras_diffusion.stable_diffusion.layers import keras_name
from keras_diffusion.stable_diffusion.unet import Timesteps

CLASS_NAME = "SD3Transformer2DModel"
# The keys of diffusers' config, with diffusers' defaults: all of them change
# the function (`sample_size` the position table's scale).
DEFAULTS = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": [],
    "qk_norm": None,
}
QK_NORMS = (None, "rms_norm")
_EPSILON = 1e-6  # every norm of the model: adaptive, feed-forward, query / key
_TIME_CHANNELS = 256  # diffusers' CombinedTimestepTextProjEmbeddings fixes them


def _split_heads(x, heads):
    """`(B, N, heads * d)` -> `(B, N, heads, d)`, as `backend.attention` takes it."""
    return ops.reshape(x, (-1, ops.shape(x)[1], heads, x.shape[-1] // heads))


def _modulate(h, shift, scale):
    """adaLN's `h (1 + scale) + shift`, per example over the tokens."""
    return h * (1.0 + scale[:, None]) + shift[:, None]


def _plain_layer_norm(name):
    """The affine-free layer norm every block uses (its shift and scale come
    from the conditioning); no weights, so no module path."""
    return layers.LayerNormalization(epsilon=_EPSILON, center=False, scale=False, name=name)


def position_table(dim, grid, base_size):
    """diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size=...)`: a
    `(1, grid * grid, dim)` table, rows of the grid first; a position's
    first `dim / 2` channels are sines then cosines of its column, the rest
    of its row, both scaled by `base_size / grid` (Vaswani et al. 2017, sec.
    3.5, frequencies `10000^(-i / (dim / 4))`). Coordinates are float32 and
    the rest float64, as diffusers computes it."""
    coords = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    phases = np.outer(coords.astype(np.float64), frequencies)
    axis = np.concatenate([np.sin(phases), np.cos(phases)], axis=1).astype("float32")
    table = np.empty((grid, grid, dim), "float32")  # SD 3.5 medium's is 0.9 GB
    table[..., :dim // 2] = axis[None, :, :]
    table[..., dim // 2:] = axis[:, None, :]
    return table.reshape(1, grid * grid, dim)


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SD3RMSNormalization")
class RMSNormalization(_AtModulePath, layers.RMSNormalization):
    """Keras' `RMSNormalization` holding the `RMSNorm` at `module_path`
    (the query / key norm of SD 3.5's attention, over each head's width)."""

    def __init__(self, module_path, epsilon=_EPSILON, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        super().__init__(epsilon=epsilon, **kwargs)
        self._set_module_path(module_path)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3PatchEmbed")
class PatchEmbed(_Block):
    """diffusers' `PatchEmbed` with `pos_embed_max_size` (SD 3's): each
    `patch_size` square of the latents becomes a token (`proj`, a
    convolution of that kernel and stride), plus its position, read from the
    centre of the `max_size`-square table `pos_embed.pos_embed`.

    Args:
        dim: token width.
        patch_size: the patch's side.
        max_size: the table's side in patches; the latents' patch grid may
            be no larger.
        sample_size: the latent side the table is scaled to (diffusers'
            `base_size` is `sample_size // patch_size`); the table starts
            at the values diffusers computes, and a checkpoint's are loaded.
        module_path: where the layer sits in the reference state dict.

    Input shape: `(B, H, W, C)`, `H` and `W` multiples of `patch_size`.
    Output shape: `(B, H * W / patch_size**2, dim)`, rows first.
    """

    def __init__(self, dim, patch_size, max_size, sample_size, module_path="pos_embed", **kwargs):
        super().__init__(module_path, **kwargs)
        self.dim, self.patch_size = int(dim), int(patch_size)
        self.max_size, self.sample_size = int(max_size), int(sample_size)
        self.proj = Conv2D(dim, patch_size, self._sub("proj"), strides=patch_size,
                           padding="valid")

    def build(self, x_shape):
        self.proj.build(x_shape)
        self.table = self.add_weight(
            name="table", shape=(1, self.max_size**2, self.dim), trainable=False,
            initializer=weights.from_checkpoint(self._sub("pos_embed"), "same", self._initial))

    def _initial(self, shape, dtype=None):
        table = position_table(self.dim, self.max_size, self.sample_size // self.patch_size)
        return table.astype(weights.numpy_dtype(dtype or "float32"), copy=False)

    def checkpoint_weights(self):
        return [(self.table, self._sub("pos_embed"), "same")]

    def call(self, x):
        tokens = self.proj(x)
        rows, columns = ops.shape(tokens)[1], ops.shape(tokens)[2]
        top, left = (self.max_size - rows) // 2, (self.max_size - columns) // 2
        table = ops.reshape(self.table, (self.max_size, self.max_size, self.dim))
        positions = ops.slice(table, (top, left, 0), (rows, columns, self.dim))
        # Summed in float32 and rounded once, as diffusers adds its float32 table.
        tokens = ops.cast(ops.cast(tokens, "float32") + ops.cast(positions, "float32")[None],
                          tokens.dtype)
        return ops.reshape(tokens, (-1, rows * columns, self.dim))

    def compute_output_shape(self, x_shape):
        return (x_shape[0], None, self.dim)

    def get_config(self):
        return dict(super().get_config(), dim=self.dim, patch_size=self.patch_size,
                    max_size=self.max_size, sample_size=self.sample_size)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3TimeTextEmbedding")
class TimeTextEmbedding(_Block):
    """diffusers' `CombinedTimestepTextProjEmbeddings`: the timestep's
    256-channel sinusoidal embedding through `timestep_embedder` (linear,
    SiLU, linear), plus the pooled prompt through `text_embedder` (the
    same shape of MLP).

    Call arguments: `t` `(B,)` (the scheduler's timestep, `1000 sigma` for
    SD 3's flow matching), `pooled` `(B, pooled_dim)`. Output `(B, dim)`.
    """

    def __init__(self, dim, module_path="time_text_embed", **kwargs):
        super().__init__(module_path, **kwargs)
        self.dim = int(dim)
        self.time_proj = Timesteps(_TIME_CHANNELS, True, 0, name=keras_name(self._sub("time_proj")))
        self.mlps = {
            part: (Dense(dim, self._sub(f"{part}.linear_1"), activation="silu"),
                   Dense(dim, self._sub(f"{part}.linear_2")))
            for part in ("timestep_embedder", "text_embedder")}

    def build(self, t_shape, pooled_shape):
        self.time_proj.build(t_shape)
        for part, in_shape in (("timestep_embedder", (None, _TIME_CHANNELS)),
                               ("text_embedder", pooled_shape)):
            first, second = self.mlps[part]
            first.build(in_shape)
            second.build((None, self.dim))

    def call(self, t, pooled):
        time = self.mlps["timestep_embedder"]
        text = self.mlps["text_embedder"]
        return time[1](time[0](self.time_proj(t))) + text[1](text[0](pooled))

    def compute_output_shape(self, t_shape, pooled_shape):
        return (t_shape[0], self.dim)

    def get_config(self):
        return dict(super().get_config(), dim=self.dim)


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SD3AdaLayerNormContinuous")
class AdaLayerNormContinuous(_Block):
    """diffusers' `AdaLayerNormContinuous` (layer norm, no affine weights):
    `norm(x) (1 + scale) + shift`, `scale, shift = linear(silu(emb))`.

    Call arguments: `x` `(B, N, D)`, `emb` `(B, E)`. Output `(B, N, D)`.
    """

    def __init__(self, module_path, **kwargs):
        super().__init__(module_path, **kwargs)
        self.norm = _plain_layer_norm(keras_name(self._sub("norm")))

    def build(self, x_shape, emb_shape):
        self.linear = Dense(2 * int(x_shape[-1]), self._sub("linear"))
        self.linear.build(emb_shape)
        self.norm.build(x_shape)

    def call(self, x, emb):
        scale, shift = ops.split(self.linear(ops.silu(emb)), 2, axis=-1)
        return _modulate(self.norm(x), shift, scale)

    def compute_output_shape(self, x_shape, emb_shape):
        return x_shape


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3JointAttention")
class JointAttention(_Block):
    """diffusers' `Attention` with `JointAttnProcessor2_0`: the image
    tokens' queries, keys and values (`to_q`, `to_k`, `to_v`) and, when
    `joint`, the text tokens' (`add_q_proj`, ...), each head's queries and
    keys RMS-normalised when `qk_norm` is set (`norm_q`, `norm_added_q`,
    ...), one softmax attention over the tokens of both (float32 softmax,
    `backend.attention`), split back: the image part through `to_out.0`,
    the text part through `to_add_out` unless `context_output` is False
    (the last block's, whose text output is unused). Without `joint` it is
    self-attention over the image tokens alone (SD 3.5 medium's `attn2`).

    Call arguments: `x` `(B, N, D)` and, when `joint`, `context`
    `(B, L, D)`. Output: `(B, N, D)`, and the text part `(B, L, D)` when
    `joint` and `context_output`.
    """

    def __init__(self, heads, head_dim, module_path, joint=True, context_output=True,
                 qk_norm=None, **kwargs):
        super().__init__(module_path, **kwargs)
        self.heads, self.head_dim = int(heads), int(head_dim)
        self.joint, self.context_output = bool(joint), bool(joint and context_output)
        self.qk_norm = qk_norm

    def _projections(self, prefix, names):
        inner = self.heads * self.head_dim
        return [Dense(inner, self._sub(f"{prefix}{name}")) for name in names]

    def _norms(self, names):
        if self.qk_norm is None:
            return [None, None]
        return [RMSNormalization(self._sub(name)) for name in names]

    def build(self, x_shape, context_shape=None):
        dim = int(x_shape[-1])
        inner_shape = (None, None, self.heads * self.head_dim)
        head_shape = (None, None, self.heads, self.head_dim)
        self.image = self._projections("to_", "qkv")
        self.image_norms = self._norms(("norm_q", "norm_k"))
        self.to_out = Dense(dim, self._sub("to_out.0"))
        built = [(layer, x_shape) for layer in self.image] + [(self.to_out, inner_shape)]
        norms = list(self.image_norms)
        self.text, self.text_norms, self.to_add_out = [], [None, None], None
        if self.joint:
            self.text = self._projections("add_", ("q_proj", "k_proj", "v_proj"))
            self.text_norms = self._norms(("norm_added_q", "norm_added_k"))
            built += [(layer, context_shape) for layer in self.text]
            norms += self.text_norms
            if self.context_output:
                self.to_add_out = Dense(dim, self._sub("to_add_out"))
                built.append((self.to_add_out, inner_shape))
        built += [(norm, head_shape) for norm in norms if norm is not None]
        for layer, shape in built:
            layer.build(shape)

    def _heads(self, projections, norms, h):
        q, k, v = (_split_heads(projection(h), self.heads) for projection in projections)
        if norms[0] is not None:
            q, k = norms[0](q), norms[1](k)
        return q, k, v

    def call(self, x, context=None):
        q, k, v = self._heads(self.image, self.image_norms, x)
        if self.joint:
            text = self._heads(self.text, self.text_norms, context)
            q, k, v = (ops.concatenate([a, b], axis=1) for a, b in zip((q, k, v), text))
        h = backend.attention(q, k, v)
        h = ops.reshape(h, (-1, ops.shape(h)[1], self.heads * self.head_dim))
        if not self.joint:
            return self.to_out(h)
        image_tokens = ops.shape(x)[1]
        x_out = self.to_out(h[:, :image_tokens])
        if not self.context_output:
            return x_out
        return x_out, self.to_add_out(h[:, image_tokens:])

    def compute_output_shape(self, x_shape, context_shape=None):
        if self.context_output:
            return x_shape, context_shape
        return x_shape

    def get_config(self):
        return dict(super().get_config(), heads=self.heads, head_dim=self.head_dim,
                    joint=self.joint, context_output=self.context_output, qk_norm=self.qk_norm)


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SD3JointTransformerBlock")
class JointTransformerBlock(_Block):
    """diffusers' `JointTransformerBlock`, the MMDiT block (Esser et al.
    2024, fig. 2): the image and text streams, each modulated by the
    conditioning `temb` (adaLN-Zero: `norm1.linear` and
    `norm1_context.linear` give each stream's shifts, scales and gates),
    attend jointly (`attn`); each adds its gated attention output, then its
    gated feed-forward (`ff`, `ff_context`: linear, tanh GELU, linear, four
    times wider) of its modulated layer norm.

    With `dual_attention` (SD 3.5 medium's `SD35AdaLayerNormZeroX`), a
    second modulation of the image tokens' norm feeds a self-attention over
    them alone (`attn2`), gated and added after the joint one. With
    `context_pre_only` (the last block) the text stream is only read: its
    norm is an `AdaLayerNormContinuous` and it has no output, feed-forward
    or `to_add_out`.

    Args:
        heads: attention heads.
        head_dim: width of each head; `heads * head_dim` is the tokens'.
        module_path: where the block sits in the reference state dict.
        context_pre_only: the last block's text stream (see above).
        qk_norm: None, or `"rms_norm"` (SD 3.5) for each head's queries
            and keys.
        dual_attention: the second, image-only attention (see above).

    Call arguments: `x` `(B, N, D)`, `context` `(B, L, D)`, `temb` `(B, D)`.
    Output: `(x, context)` of the same shapes; `x` alone with
    `context_pre_only`. `gradient_checkpointing`, set by
    `SD3Transformer.enable_gradient_checkpointing`, runs the block under
    `keras.remat`.

    Example:

    >>> block = JointTransformerBlock(4, 8, "transformer_blocks.0", qk_norm="rms_norm")
    >>> x, context = block(np.zeros((1, 16, 32)), np.zeros((1, 7, 32)), np.zeros((1, 32)))
    >>> x.shape, context.shape
    ((1, 16, 32), (1, 7, 32))
    """

    def __init__(self, heads, head_dim, module_path, context_pre_only=False, qk_norm=None,
                 dual_attention=False, **kwargs):
        super().__init__(module_path, **kwargs)
        self.gradient_checkpointing = False
        self.heads, self.head_dim = int(heads), int(head_dim)
        self.context_pre_only, self.dual_attention = bool(context_pre_only), bool(dual_attention)
        self.qk_norm = qk_norm
        self.attn = JointAttention(heads, head_dim, self._sub("attn"),
                                   context_output=not context_pre_only, qk_norm=qk_norm)
        self.attn2 = (JointAttention(heads, head_dim, self._sub("attn2"), joint=False,
                                     qk_norm=qk_norm) if dual_attention else None)
        self.norm = _plain_layer_norm(keras_name(self._sub("norm")))
        self.norm1_context = (AdaLayerNormContinuous(self._sub("norm1_context"))
                              if context_pre_only else None)

    def _feed_forward(self, prefix, dim):
        return (Dense(4 * dim, self._sub(f"{prefix}.net.0.proj")),
                Dense(dim, self._sub(f"{prefix}.net.2")))

    def build(self, x_shape, context_shape, temb_shape):
        dim = int(x_shape[-1])
        self.norm1_linear = Dense((9 if self.dual_attention else 6) * dim,
                                  self._sub("norm1.linear"))
        self.norm1_linear.build(temb_shape)
        self.norm.build(x_shape)
        self.ff = self._feed_forward("ff", dim)
        self.ff_context = None
        if self.context_pre_only:
            self.norm1_context.build(context_shape, temb_shape)
            self.norm1_context_linear = None
        else:
            self.norm1_context_linear = Dense(6 * dim, self._sub("norm1_context.linear"))
            self.norm1_context_linear.build(temb_shape)
            self.ff_context = self._feed_forward("ff_context", dim)
        self.attn.build(x_shape, context_shape)
        if self.attn2 is not None:
            self.attn2.build(x_shape)
        for first, second in filter(None, (self.ff, self.ff_context)):
            first.build(x_shape)
            second.build((None, None, 4 * dim))

    def call(self, x, context, temb):
        if self.gradient_checkpointing:
            return keras.remat(self._forward)(x, context, temb)
        return self._forward(x, context, temb)

    def _mlp(self, layers_pair, h):
        first, second = layers_pair
        return second(ops.gelu(first(h), approximate=True))

    def _forward(self, x, context, temb):
        emb = ops.silu(temb)
        chunks = 9 if self.dual_attention else 6
        shift, scale, gate, ff_shift, ff_scale, ff_gate, *second = ops.split(
            self.norm1_linear(emb), chunks, axis=-1)
        normed = self.norm(x)
        h = _modulate(normed, shift, scale)
        if self.context_pre_only:
            x_attn = self.attn(h, self.norm1_context(context, temb))
        else:
            c_shift, c_scale, c_gate, c_ff_shift, c_ff_scale, c_ff_gate = ops.split(
                self.norm1_context_linear(emb), 6, axis=-1)
            x_attn, c_attn = self.attn(h, _modulate(self.norm(context), c_shift, c_scale))
        x = x + gate[:, None] * x_attn
        if self.attn2 is not None:
            shift2, scale2, gate2 = second
            x = x + gate2[:, None] * self.attn2(_modulate(normed, shift2, scale2))
        x = x + ff_gate[:, None] * self._mlp(self.ff, _modulate(self.norm(x), ff_shift, ff_scale))
        if self.context_pre_only:
            return x
        context = context + c_gate[:, None] * c_attn
        h = _modulate(self.norm(context), c_ff_shift, c_ff_scale)
        return x, context + c_ff_gate[:, None] * self._mlp(self.ff_context, h)

    def compute_output_shape(self, x_shape, context_shape, temb_shape):
        return x_shape if self.context_pre_only else (x_shape, context_shape)

    def get_config(self):
        return dict(super().get_config(), heads=self.heads, head_dim=self.head_dim,
                    context_pre_only=self.context_pre_only, qk_norm=self.qk_norm,
                    dual_attention=self.dual_attention)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3Unpatchify")
class Unpatchify(layers.Layer):
    """Tokens of `patch_size**2 * channels` values back to the latent grid:
    each token's values are its patch, rows, then columns, then channels
    (diffusers' `einsum("nhwpqc->nchpwq")`, here NHWC).

    Call arguments: `tokens` `(B, H * W / patch_size**2, patch_size**2 *
    channels)`, `latents` `(B, H, W, C_in)` (for `H` and `W`). Output
    `(B, H, W, channels)`.
    """

    def __init__(self, patch_size, channels, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.channels = int(patch_size), int(channels)

    def call(self, tokens, latents):
        p = self.patch_size
        height, width = ops.shape(latents)[1], ops.shape(latents)[2]
        h = ops.reshape(tokens, (-1, height // p, width // p, p, p, self.channels))
        h = ops.transpose(h, (0, 1, 3, 2, 4, 5))
        return ops.reshape(h, (-1, height, width, self.channels))

    def compute_output_shape(self, tokens_shape, latents_shape):
        return tuple(latents_shape[:3]) + (self.channels,)

    def get_config(self):
        return dict(super().get_config(), patch_size=self.patch_size, channels=self.channels)


# ---------------------------------------------------------------- the config
def _is_int(value, low=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_config(config):
    """A complete, checked copy of a config holding `DEFAULTS`' keys
    (`dual_attention_layers` a sorted list, `out_channels` resolved)."""
    config = dict(config)
    if config["out_channels"] is None:  # diffusers: the input's channels
        config["out_channels"] = config["in_channels"]
    if config["pos_embed_max_size"] is None:
        raise ValueError("the SD3 transformer does not support pos_embed_max_size=None (a "
                         "position table recomputed for each size); SD 3 / 3.5 set it.")
    for key in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim", "out_channels", "pos_embed_max_size"):
        if not _is_int(config[key]):
            raise ValueError(f"{key} must be a positive integer; got {config[key]!r}.")
    if config["qk_norm"] not in QK_NORMS:
        raise ValueError(f"the SD3 transformer does not support qk_norm={config['qk_norm']!r}; "
                         "supported: None (SD 3) and 'rms_norm' (SD 3.5).")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if config["caption_projection_dim"] != inner:
        raise ValueError(
            f"caption_projection_dim ({config['caption_projection_dim']}) must equal "
            f"num_attention_heads * attention_head_dim ({inner}): the text tokens join the "
            "image tokens' attention at that width.")
    if inner % 4:
        raise ValueError(f"num_attention_heads * attention_head_dim must be a multiple of 4 "
                         f"(the 2-D sinusoidal positions' sines and cosines); got {inner}.")
    if config["sample_size"] < config["patch_size"]:
        raise ValueError(f"sample_size must be at least patch_size ({config['patch_size']}); "
                         f"got {config['sample_size']}.")
    dual = config["dual_attention_layers"]
    layers_count = config["num_layers"]
    if not isinstance(dual, (list, tuple)) or not all(
            _is_int(i, 0) and i < layers_count for i in dual):
        raise ValueError(f"dual_attention_layers must list block indices below num_layers "
                         f"({layers_count}); got {dual!r}.")
    config["dual_attention_layers"] = sorted(set(dual))
    return config


def _parts(config):
    """The model's layers, by role (`blocks` in order)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    patch, last = config["patch_size"], config["num_layers"] - 1
    return types.SimpleNamespace(
        pos_embed=PatchEmbed(inner, patch, config["pos_embed_max_size"], config["sample_size"]),
        time_text_embed=TimeTextEmbedding(inner),
        context_embedder=Dense(config["caption_projection_dim"], "context_embedder"),
        blocks=[JointTransformerBlock(config["num_attention_heads"],
                                      config["attention_head_dim"], f"transformer_blocks.{i}",
                                      context_pre_only=i == last, qk_norm=config["qk_norm"],
                                      dual_attention=i in config["dual_attention_layers"])
                for i in range(config["num_layers"])],
        norm_out=AdaLayerNormContinuous("norm_out"),
        proj_out=float32_output(Dense, patch * patch * config["out_channels"], "proj_out"),
        # float32, so the output stays float32 under a mixed or half policy.
        unpatchify=Unpatchify(patch, config["out_channels"], name="unpatchify", dtype="float32"),
    )


def _forward(parts, inputs, skip=()):
    """The transformer on `[x_t, t, context, pooled]`, the blocks whose
    indices are in `skip` left out (their inputs passed on): called on
    Keras inputs it builds the functional graph, on tensors it runs."""
    x_t, t, context, pooled = inputs
    x = parts.pos_embed(x_t)
    temb = parts.time_text_embed(t, pooled)
    context = parts.context_embedder(context)
    for index, block in enumerate(parts.blocks):
        if index in skip:
            continue
        if block.context_pre_only:
            x = block(x, context, temb)
        else:
            x, context = block(x, context, temb)
    x = parts.norm_out(x, temb)
    return parts.unpatchify(parts.proj_out(x), x_t)


# ------------------------------------------------------------- the transformer
@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3Transformer")
class SD3Transformer(ReferenceConfigured, keras.Model):
    """The MMDiT of Stable Diffusion 3 / 3.5: diffusers'
    `SD3Transformer2DModel`, as a functional Keras model.

    The keyword arguments are the keys of diffusers' `config.json`, with
    diffusers' defaults (`DEFAULTS`); build from a checkpoint's config with
    `from_reference_config`. SD 3 medium: 24 blocks of 24 heads of 64,
    `pos_embed_max_size=192`; SD 3.5 large: 38 blocks of 38 heads, 192,
    `qk_norm="rms_norm"`; SD 3.5 medium: 24 blocks of 24 heads, 384,
    `"rms_norm"`, `dual_attention_layers` 0 to 12.

    Inputs: `[x_t, t, context, pooled_projections]`: `x_t` `(B, H, W,
        in_channels)` float, `H` and `W` multiples of `patch_size` with at
        most `pos_embed_max_size` patches a side; `t` `(B,)` float32, the
        scheduler's timestep (`1000 sigma`); `context` `(B, L,
        joint_attention_dim)` (the prompt's CLIP and T5 features), any `L`;
        `pooled_projections` `(B, pooled_projection_dim)`.
    Output: `(B, H, W, out_channels)` float32 (the flow's velocity), also
        under a mixed-precision policy.

    Calling it with `skip_layers=[i, ...]` leaves those blocks out, as
    diffusers' `skip_layers` (skip-layer guidance); each set traces anew
    where the call is compiled.

    Attributes:
        config: the reference config dict, complete (`DEFAULTS`' keys).
        context_dim: `joint_attention_dim`.
        pooled_dim: `pooled_projection_dim`.
        patch_size: what `H` and `W` must be multiples of.
        downsampling_factor: `patch_size`, under the name the latent model
            and the pipeline read (as the UNet's).

    Example:

    >>> model = SD3Transformer(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
    ...     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
    ...     caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
    >>> model([np.zeros((1, 16, 24, 4)), np.array([500.0]), np.zeros((1, 7, 32)),
    ...        np.zeros((1, 64))]).shape
    (1, 16, 24, 4)
    """

    def __init__(self, name="transformer", **options):
        model_kwargs = {k: options.pop(k) for k in ("trainable", "dtype") if k in options}
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"SD3Transformer got unknown options {unknown}; it takes the keys "
                             f"of diffusers' SD3Transformer2DModel config: {sorted(DEFAULTS)}.")
        config = _check_config({**DEFAULTS, **options})
        inputs = [keras.Input((None, None, config["in_channels"]), name="x_t"),
                  keras.Input((), dtype="float32", name="t"),
                  keras.Input((None, config["joint_attention_dim"]), name="context"),
                  keras.Input((config["pooled_projection_dim"],), name="pooled_projections")]
        parts = _parts(config)
        super().__init__(inputs=inputs, outputs=_forward(parts, inputs), name=name,
                         **model_kwargs)
        # A plain namespace: Keras tracks the layers through the graph already.
        self._parts = parts
        self.weights_dtype = half_weights_policy()
        # JSON text: Keras would track a dict attribute.
        self._reference_config = json.dumps(config)
        self.context_dim = config["joint_attention_dim"]
        self.pooled_dim = config["pooled_projection_dim"]
        self.patch_size = config["patch_size"]
        self.downsampling_factor = self.patch_size  # what the pipeline's image sizes divide by
        self.max_patches = config["pos_embed_max_size"]


    def _check_latents(self, x_t):
        height, width = x_t.shape[1], x_t.shape[2]
        for side, size in (("height", height), ("width", width)):
            if not isinstance(size, int):
                continue
            if size % self.patch_size:
                raise ValueError(f"the latents' {side} ({size}) must be a multiple of the "
                                 f"transformer's patch_size ({self.patch_size}).")
            if size // self.patch_size > self.max_patches:
                raise ValueError(
                    f"the latents' {side} ({size}) is more than the transformer's "
                    f"{self.max_patches} patches of {self.patch_size} (pos_embed_max_size).")

    def call(self, inputs, training=None, mask=None, skip_layers=None):
        self._check_latents(inputs[0])
        if not skip_layers:
            return super().call(inputs, training=training, mask=mask)
        skip = set(skip_layers)
        if not all(_is_int(i, 0) and i < len(self._parts.blocks) for i in skip):
            raise ValueError(f"skip_layers must list block indices below num_layers "
                             f"({len(self._parts.blocks)}); got {skip_layers!r}.")
        tensors = [ops.convert_to_tensor(value, dtype=spec.dtype)
                   for value, spec in zip(inputs, self.inputs)]
        return _forward(self._parts, tensors, skip)

    def compute_output_spec(self, inputs, training=None, mask=None, skip_layers=None):
        return super().compute_output_spec(inputs, training=training, mask=mask)

    @classmethod
    def from_reference_config(cls, config, **kwargs):
        """The transformer of a diffusers `transformer/config.json` dict.

        Keys outside `DEFAULTS` (`_class_name`, `_diffusers_version`) are
        ignored, as diffusers ignores keys it does not know; an option this
        class does not implement raises one `ValueError` naming it.
        `kwargs` go to the constructor (e.g. `name`)."""
        if not isinstance(config, dict):
            raise ValueError(f"from_reference_config takes a config dict; got "
                             f"{type(config).__name__}.")
        class_name = config.get("_class_name", CLASS_NAME)
        if class_name != CLASS_NAME:
            raise ValueError(f"the SD3 transformer reads an {CLASS_NAME} config; got "
                             f"_class_name={class_name!r}.")
        return cls(**{key: config[key] for key in DEFAULTS if key in config}, **kwargs)

    def enable_gradient_checkpointing(self, enabled=True):
        """Run every block under `keras.remat` (or not), as diffusers'
        `enable_gradient_checkpointing`: the same gradients, each block's
        activations recomputed in the backward pass instead of kept. A
        runtime setting, not saved."""
        for block in self._parts.blocks:
            block.gradient_checkpointing = bool(enabled)

