"""`StableDiffusionVAE`: the KL autoencoder of Stable Diffusion 1.x / 2.x,
the same function as diffusers' `AutoencoderKL`, in the `autoencoder` slot
of a `LatentDiffusionModel`.

The encoder halves the image `len(block_out_channels) - 1` times through
residual blocks, then a mid block (resnet, single-head self-attention,
resnet) and a 3x3 convolution to the mean and log-variance of the latents,
mixed by the 1x1 `quant_conv`. The decoder runs `post_quant_conv`, a mid
block, and up blocks of `layers_per_block + 1` resnets each followed by a
nearest-neighbour doubling and a convolution (Rombach et al. 2022,
appendix G). Every layer holding weights knows its module path in
diffusers' state dict (`encoder.down_blocks.0.resnets.0.conv1`; its Keras
name is that path with `_` for `.`), so `weights.load_state_dict` assigns a
diffusers checkpoint directly.

It offers `Autoencoder`'s protocol (`encoder`, `decoder`, `posterior`,
`encode`, `decode`, `scaling_factor`, `factor`, `pad`, `latent_shape`), with
any image size the encoder divides.
"""

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_diffusion import backend
from keras_diffusion import pipeline
from keras_diffusion.autoencoder import _split_moments
from keras_diffusion.autoencoder import sample_posterior
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.data import check_images
from keras_diffusion.stable_diffusion.layers import Conv2D
from keras_diffusion.stable_diffusion.layers import Dense
from keras_diffusion.stable_diffusion.layers import GroupNormalization
from keras_diffusion.stable_diffusion.layers import LayerChain
from keras_diffusion.stable_diffusion.layers import _Block
from keras_diffusion.stable_diffusion.layers import float32_output
from keras_diffusion.stable_diffusion.layers import from_weights_dtype
from keras_diffusion.stable_diffusion.layers import half_weights_policy
from keras_diffusion.stable_diffusion.layers import keras_name
from keras_diffusion.stable_diffusion.layers import with_weights_dtype

_EPSILON = 1e-6  # diffusers' VAE: every group norm, resnets and attention alike
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")  # the same function under two names

# AutoencoderKL's options this class implements, with diffusers' defaults.
DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (DOWN_BLOCK,),
    "up_block_types": (UP_BLOCK,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys of a diffusers config.json that do not change the function (besides
# diffusers' own bookkeeping, every key starting with "_"): `force_upcast`
# asks for float32 under float16 pipelines, a choice of precision.
_IGNORED = ("sample_size", "force_upcast")
# Keys accepted only at the value that leaves the function unchanged.
_NEUTRAL = {"latents_mean": (None,), "latents_std": (None,)}


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDVAEResnetBlock")
class ResnetBlock(_Block):
    """diffusers' `ResnetBlock2D` without a timestep input: GroupNorm, SiLU,
    3x3 convolution, twice, plus the input (through the 1x1 `conv_shortcut`
    when the channels change).

    Input shape `(B, H, W, C_in)`, output shape `(B, H, W, channels)`.
    """

    def __init__(self, channels, module_path, groups=32, **kwargs):
        super().__init__(module_path, **kwargs)
        self.channels = int(channels)
        self.groups = int(groups)
        self.norm1 = GroupNormalization(groups, self._sub("norm1"))
        self.conv1 = Conv2D(channels, 3, self._sub("conv1"))
        self.norm2 = GroupNormalization(groups, self._sub("norm2"))
        self.conv2 = Conv2D(channels, 3, self._sub("conv2"))
        self.conv_shortcut = None

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            self.conv_shortcut = Conv2D(self.channels, 1, self._sub("conv_shortcut"))
            self.conv_shortcut.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.channels,)
        self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        self.norm2.build(hidden_shape)
        self.conv2.build(hidden_shape)

    def call(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        return dict(super().get_config(), channels=self.channels, groups=self.groups)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDVAEAttention")
class Attention(_Block):
    """The VAE's mid-block attention (diffusers' `Attention` with one head,
    a group norm and a residual connection): `x + to_out.0(softmax(q k^T /
    sqrt(C)) v)` over the H*W positions, `q, k, v` linear maps of
    `group_norm(x)`.

    Input shape `(B, H, W, C)`; output shape the same.
    """

    def __init__(self, module_path, groups=32, **kwargs):
        super().__init__(module_path, **kwargs)
        self.groups = int(groups)
        self.group_norm = GroupNormalization(groups, self._sub("group_norm"))

    def build(self, input_shape):
        channels = input_shape[-1]
        self.to_q, self.to_k, self.to_v, self.to_out = (
            Dense(channels, self._sub(part)) for part in ("to_q", "to_k", "to_v", "to_out.0"))
        self.group_norm.build(input_shape)
        for dense in (self.to_q, self.to_k, self.to_v, self.to_out):
            dense.build(input_shape)

    def call(self, x):
        shape = ops.shape(x)
        h = ops.reshape(self.group_norm(x), (shape[0], -1, 1, shape[-1]))
        h = backend.attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + ops.reshape(self.to_out(h), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), groups=self.groups)


def check_vae_arguments(*, in_channels, out_channels, down_block_types, up_block_types,
                        block_out_channels, layers_per_block, act_fn, latent_channels,
                        norm_num_groups, scaling_factor):
    """The rules of `StableDiffusionVAE`'s arguments (diffusers' names)."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("layers_per_block", layers_per_block),
                        ("latent_channels", latent_channels), ("norm_num_groups", norm_num_groups)):
        check_integer(name, value)
    if in_channels != out_channels:
        raise ValueError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be equal: an "
            "autoencoder of a latent diffusion model makes images like those it reads."
        )
    if not block_out_channels:
        raise ValueError("block_out_channels is empty; give the channels of each level.")
    for channels in block_out_channels:
        check_integer("each of block_out_channels", channels)
        if channels % norm_num_groups:
            raise ValueError(
                f"block_out_channels must be divisible by norm_num_groups={norm_num_groups}; "
                f"got {list(block_out_channels)}."
            )
    for name, types, supported in (("down_block_types", down_block_types, DOWN_BLOCK),
                                   ("up_block_types", up_block_types, UP_BLOCK)):
        if len(types) != len(block_out_channels) or any(t != supported for t in types):
            raise ValueError(
                f"{name} must be {supported!r} once per level of block_out_channels "
                f"({len(block_out_channels)}); got {list(types)}."
            )
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"act_fn must be one of {', '.join(ACTIVATIONS)}; got {act_fn!r}.")
    if not is_number(scaling_factor) or not scaling_factor > 0:
        raise ValueError(f"scaling_factor must be a number > 0; got {scaling_factor!r}.")


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusionVAE")
class StableDiffusionVAE(keras.Model):
    """Stable Diffusion's variational autoencoder (diffusers'
    `AutoencoderKL`), for the `autoencoder` slot of `LatentDiffusionModel`.

    Args (diffusers' names and defaults; SD 1.x / 2.x use
    `block_out_channels=(128, 256, 512, 512)`, `layers_per_block=2`):
        in_channels, out_channels: image channels (equal).
        down_block_types, up_block_types: `"DownEncoderBlock2D"` /
            `"UpDecoderBlock2D"` once per level.
        block_out_channels: channels of each level; the latents are
            `2 ** (len(block_out_channels) - 1)` times smaller.
        layers_per_block: resnets per encoder level (decoder: one more).
        act_fn: `"silu"` (or its other name, `"swish"`).
        latent_channels: channels of the latents.
        norm_num_groups: groups of every group norm.
        scaling_factor: what a latent model multiplies the latents by.
        use_quant_conv, use_post_quant_conv: whether the 1x1 convolutions
            after the encoder and before the decoder exist.
        mid_block_add_attention: whether the mid blocks have attention.
        shift_factor: what a latent model subtracts from the latents before
            scaling them (SD 3's VAE: 0.0609; None or 0 for SD 1.x / 2.x /
            SDXL's).

    `encoder` maps images in [-1, 1] `(B, H, W, in_channels)` to the
    posterior's moments `(B, H / f, W / f, 2 * latent_channels)` (mean,
    then log-variance), `quant_conv` included; `decoder` maps unscaled
    latents to images in [-1, 1], `post_quant_conv` first. H and W may be
    any multiple of `factor`.

    Example:

    >>> vae = StableDiffusionVAE.from_reference_config(json.load(open("vae/config.json")))
    >>> weights.load_state_dict(vae, safetensors.numpy.load_file(
    ...     "vae/diffusion_pytorch_model.safetensors"))
    >>> latents = vae.encode(images)   # (N, H / 8, W / 8, 4), unscaled
    >>> vae.decode(latents).shape      # (N, H, W, 3) in [0, 1]
    """

    def __init__(self, in_channels=3, out_channels=3, down_block_types=(DOWN_BLOCK,),
                 up_block_types=(UP_BLOCK,), block_out_channels=(64,), layers_per_block=1,
                 act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
                 use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                 shift_factor=None, **kwargs):
        block_out_channels = tuple(block_out_channels)
        down_block_types, up_block_types = tuple(down_block_types), tuple(up_block_types)
        check_vae_arguments(
            in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
            up_block_types=up_block_types, block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, scaling_factor=scaling_factor,
        )
        super().__init__(**kwargs)
        self.weights_dtype = half_weights_policy()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.down_block_types, self.up_block_types = down_block_types, up_block_types
        self.block_out_channels = tuple(int(c) for c in block_out_channels)
        self.layers_per_block = int(layers_per_block)
        self.act_fn = act_fn
        self.latent_channels = int(latent_channels)
        self.norm_num_groups = int(norm_num_groups)
        self.use_quant_conv = bool(use_quant_conv)
        self.use_post_quant_conv = bool(use_post_quant_conv)
        self.mid_block_add_attention = bool(mid_block_add_attention)
        if shift_factor is not None and not is_number(shift_factor):
            raise ValueError(f"shift_factor must be a number or None; got {shift_factor!r}.")
        self.shift_factor = float(shift_factor or 0.0)
        self.factor = 2 ** (len(self.block_out_channels) - 1)
        self.pad = 0
        self.image_shape = (None, None, self.in_channels)
        self.latent_shape = (None, None, self.latent_channels)
        self.encoder = self._build_encoder()
        self.decoder = self._build_decoder()
        self.scaling_factor = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(float(scaling_factor)),
            dtype="float32", trainable=False, name="scaling_factor",
        )
        self.built = True

    # ------------------------------------------------------------ the network
    def _mid_block(self, h, prefix):
        channels = self.block_out_channels[-1]
        h = ResnetBlock(channels, f"{prefix}.resnets.0", self.norm_num_groups)(h)
        if self.mid_block_add_attention:
            h = Attention(f"{prefix}.attentions.0", self.norm_num_groups)(h)
        return ResnetBlock(channels, f"{prefix}.resnets.1", self.norm_num_groups)(h)

    def _head(self, h, channels, prefix):
        h = GroupNormalization(self.norm_num_groups, f"{prefix}.conv_norm_out")(h)
        h = layers.Activation("silu", name=keras_name(f"{prefix}.conv_act"))(h)
        return float32_output(Conv2D, channels, 3, f"{prefix}.conv_out")(h)

    def _build_encoder(self):
        images = keras.Input((None, None, self.in_channels), name="images")
        h = Conv2D(self.block_out_channels[0], 3, "encoder.conv_in")(images)
        last = len(self.block_out_channels) - 1
        for level, channels in enumerate(self.block_out_channels):
            prefix = f"encoder.down_blocks.{level}"
            for index in range(self.layers_per_block):
                h = ResnetBlock(channels, f"{prefix}.resnets.{index}", self.norm_num_groups)(h)
            if level < last:
                # diffusers pads right and bottom only, then convolves unpadded.
                h = layers.ZeroPadding2D(((0, 1), (0, 1)),
                                         name=keras_name(f"{prefix}.downsamplers.0.pad"))(h)
                h = Conv2D(channels, 3, f"{prefix}.downsamplers.0.conv", strides=2,
                           padding="valid")(h)
        h = self._mid_block(h, "encoder.mid_block")
        moments = self._head(h, 2 * self.latent_channels, "encoder")
        if self.use_quant_conv:
            moments = float32_output(Conv2D, 2 * self.latent_channels, 1, "quant_conv")(moments)
        return LayerChain(images, moments, name="encoder")

    def _build_decoder(self):
        latents = keras.Input((None, None, self.latent_channels), name="latents")
        h = latents
        if self.use_post_quant_conv:
            h = Conv2D(self.latent_channels, 1, "post_quant_conv")(h)
        h = Conv2D(self.block_out_channels[-1], 3, "decoder.conv_in")(h)
        h = self._mid_block(h, "decoder.mid_block")
        last = len(self.block_out_channels) - 1
        for level, channels in enumerate(reversed(self.block_out_channels)):
            prefix = f"decoder.up_blocks.{level}"
            for index in range(self.layers_per_block + 1):
                h = ResnetBlock(channels, f"{prefix}.resnets.{index}", self.norm_num_groups)(h)
            if level < last:
                h = layers.UpSampling2D(2, interpolation="nearest",
                                        name=keras_name(f"{prefix}.upsamplers.0.upsample"))(h)
                h = Conv2D(channels, 3, f"{prefix}.upsamplers.0.conv")(h)
        images = self._head(h, self.out_channels, "decoder")
        return LayerChain(latents, images, name="decoder")

    def call(self, images, training=False):
        """Images in [-1, 1] -> their reconstruction from the posterior mean."""
        mean, _ = self.posterior(images, training=training)
        return self.decoder(mean, training=training)

    def posterior(self, x, training=False):
        """`(mean, log_variance)` of the latents of `x` (in [-1, 1]), the
        log-variance clamped to [-30, 20] as diffusers does."""
        return _split_moments(self.encoder(x, training=training))

    # ------------------------------------------------- the autoencoder protocol
    @property
    def measured(self):
        """Always true: the scaling factor comes with the checkpoint."""
        return True

    def check_measured(self):
        """Nothing to check: the scaling factor comes with the checkpoint."""

    def _check_size(self, height, width, what):
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"{what} of {height}x{width} pixels cannot be encoded: this VAE halves height "
                f"and width {len(self.block_out_channels) - 1} times, so both must be "
                f"multiples of {self.factor}."
            )

    def encode(self, images, sample=False, seed=None, batch_size=None):
        """Latents of `images` (NHWC, [0, 1] floats or uint8, height and
        width multiples of `factor`): the posterior mean, or a sample of the
        posterior with `sample=True`. Unscaled: a `LatentDiffusionModel`
        multiplies them by `scaling_factor`.

        Returns float32 numpy `(N, H / factor, W / factor, latent_channels)`."""
        images = check_images(images, self.image_shape)
        self._check_size(images.shape[1], images.shape[2], "images")
        moments = pipeline.call_network(self, self.encoder, pipeline.to_model_range(images),
                                        batch_size=batch_size)
        mean, logvar = _split_moments(moments)
        return ops.convert_to_numpy(sample_posterior(mean, logvar, seed) if sample else mean)

    def decode(self, latents, batch_size=None):
        """Images of unscaled `latents` `(N, h, w, latent_channels)`: float32
        numpy `(N, h * factor, w * factor, out_channels)` in [0, 1]."""
        latents = np.asarray(latents, dtype="float32")
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels or 0 in latents.shape:
            raise ValueError(
                f"latents must have shape (N, height, width, {self.latent_channels}) for this "
                f"VAE; got {latents.shape}."
            )
        x = pipeline.call_network(self, self.decoder, latents, batch_size=batch_size)
        return pipeline.from_model_range(x)

    # -------------------------------------------------------- serialisation
    def get_config(self):
        return with_weights_dtype({
            "name": self.name,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": self.act_fn,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": float(ops.convert_to_numpy(self.scaling_factor)),
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
            "shift_factor": self.shift_factor,
        }, self)

    @classmethod
    def from_config(cls, config):
        return from_weights_dtype(cls, config)

    @classmethod
    def from_reference_config(cls, config, **kwargs):
        """The VAE a diffusers `AutoencoderKL` `config.json` (as a dict)
        describes, its weights unset. Keys that do not change the function
        (`_class_name` and other keys starting with `_`, `sample_size`,
        `force_upcast`) are ignored;
        `shift_factor`, `latents_mean` and `latents_std` are accepted only
        unset, and any other key raises."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json); got "
                            f"{type(config).__name__}.")
        unknown = sorted(key for key in config if not key.startswith("_")
                         and key not in DEFAULTS and key not in _IGNORED and key not in _NEUTRAL)
        if unknown:
            raise ValueError(
                f"the VAE config has options this AutoencoderKL does not support: "
                f"{', '.join(unknown)}; supported: {', '.join(DEFAULTS)}."
            )
        for key, neutral in _NEUTRAL.items():
            if key in config and config[key] not in neutral:
                raise ValueError(
                    f"the VAE config sets {key}={config[key]!r}, which Stable Diffusion 1.x / "
                    f"2.x VAEs do not use; supported: {key} unset (null)."
                )
        arguments = {key: config[key] for key in DEFAULTS if key in config}
        return cls(**arguments, **kwargs)
