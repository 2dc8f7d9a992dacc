"""`Autoencoder`: the KL-regularised autoencoder of latent diffusion
(Rombach et al. 2022, section 3 and appendix G), trained with `fit`.

The encoder maps an image to the mean and log-variance of a Gaussian over
latents `2 ** len(widths)` times smaller in height and width; the decoder
maps a latent back to an image. Training minimises the reconstruction error
of a sample of that Gaussian (the reparameterisation trick, Kingma & Welling
2014) plus `kl_weight` times its KL divergence from N(0, I), which keeps the
latents near unit scale without limiting what they can hold.

After training, `fit` measures the latent scaling factor, 1 / std of the
latents over the training images (diffusers' `scaling_factor`), and keeps it
as a weight so it is saved with the model: a `LatentDiffusionModel`
multiplies the latents by it, so the diffusion model sees unit variance.
"""

import keras
import numpy as np
from keras import layers, ops

from keras_diffusion import backend
from keras_diffusion import pipeline
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.data import check_images
from keras_diffusion.data import check_training_images
from keras_diffusion.network import _NORM_EPSILON
from keras_diffusion.network import _Conv2D
from keras_diffusion.network import _GroupNormalization
from keras_diffusion.network import check_image_shape
from keras_diffusion.network import check_widths

RECONSTRUCTION_LOSSES = ("l1", "mse")
# LDM clamps the log-variance to this range, so exp() cannot overflow early in training.
_LOGVAR_RANGE = (-30.0, 20.0)
_SCALING_IMAGES = 4096  # training images the scaling factor is measured on, at most


@keras.saving.register_keras_serializable(package="keras_diffusion", name="AutoencoderBlock")
class AutoencoderBlock(layers.Layer):
    """A residual block without a timestep input: GroupNorm, SiLU, 3x3
    convolution, twice, plus the input (through a 1x1 convolution when the
    channels change); the block of LDM's autoencoder.

    Input shape `(B, H, W, C_in)`, output shape `(B, H, W, channels)`.
    """

    def __init__(self, channels, groups=8, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.groups = int(groups)
        self.norm_1 = _GroupNormalization(groups, epsilon=_NORM_EPSILON, name="norm_1")
        self.conv_1 = _Conv2D(channels, 3, padding="same", name="conv_1")
        self.norm_2 = _GroupNormalization(groups, epsilon=_NORM_EPSILON, name="norm_2")
        self.conv_2 = _Conv2D(channels, 3, padding="same", name="conv_2")
        self.skip = None

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            self.skip = _Conv2D(self.channels, 1, name="skip")
            self.skip.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.channels,)
        self.norm_1.build(input_shape)
        self.conv_1.build(input_shape)
        self.norm_2.build(hidden_shape)
        self.conv_2.build(hidden_shape)

    def call(self, x):
        h = self.conv_1(ops.silu(self.norm_1(x)))
        h = self.conv_2(ops.silu(self.norm_2(h)))
        return h + (x if self.skip is None else self.skip(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self):
        return dict(super().get_config(), channels=self.channels, groups=self.groups)


def check_autoencoder_arguments(*, image_shape, widths, latent_channels, blocks_per_level, groups,
                                pad, reconstruction, kl_weight):
    """The rules of `Autoencoder`'s arguments; `image_shape` None skips
    the rules about it."""
    check_widths(widths, groups)
    check_integer("latent_channels", latent_channels)
    check_integer("blocks_per_level", blocks_per_level)
    check_integer("pad", pad, low=0)
    if reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(
            f"reconstruction must be one of {', '.join(RECONSTRUCTION_LOSSES)}; "
            f"got {reconstruction!r}."
        )
    if not is_number(kl_weight) or kl_weight < 0:
        raise ValueError(f"kl_weight must be a number >= 0; got {kl_weight!r}.")
    if image_shape is not None:
        factor = 2 ** len(widths)
        height, width, channels = image_shape if len(image_shape) == 3 else (0, 0, 0)
        padded = (height + 2 * pad, width + 2 * pad, channels) if pad else tuple(image_shape)
        check_image_shape(
            padded, factor, "2 ** len(widths), one halving per level" + (
                f", after padding by {pad}" if pad else ""),
            f" Set pad so that the padded size is a multiple of {factor} (pad=2 takes 28x28 to "
            "32x32), or use fewer levels.",
        )


def _split_moments(moments):
    """The encoder's output -> `(mean, log_variance)`, float32, the latter
    clamped."""
    mean, logvar = ops.split(ops.cast(moments, "float32"), 2, axis=-1)
    return mean, ops.clip(logvar, *_LOGVAR_RANGE)


def sample_posterior(mean, logvar, seed):
    """A sample of N(mean, exp(logvar)) by the reparameterisation trick:
    differentiable in `mean` and `logvar`. `seed`: an int, None or a
    `SeedGenerator`."""
    noise = keras.random.normal(ops.shape(mean), dtype="float32", seed=seed)
    return mean + ops.exp(0.5 * logvar) * noise


@keras.saving.register_keras_serializable(package="keras_diffusion", name="Autoencoder")
class Autoencoder(keras.Model):
    """A variational autoencoder for latent diffusion, trained with `fit`.

    Args:
        image_shape: `(H, W, C)` of the images; H and W divisible by
            `2 ** len(widths)`.
        widths: channels of each level; every level ends in a halving, so
            the latents are `2 ** len(widths)` times smaller in height and
            width (the default: 4, 32x32 -> 8x8).
        latent_channels: channels of the latents.
        blocks_per_level: residual blocks per level, in each half.
        groups: groups of the group normalisations.
        pad: pixels of zeros added on each side before encoding, and cropped
            after decoding, so that a size that does not halve evenly still
            fits: `pad=2` gives MNIST's 28x28 an 8x8 latent grid at factor 4.
        reconstruction: `"l1"` (LDM's choice; sharper) or `"mse"`.
        kl_weight: weight of the KL term. Both terms are averaged over the
            pixels, so the ratio is that of LDM's sums: 1e-6, their value,
            keeps the latents near unit scale and barely constrains them.
        seed: seed for the posterior samples drawn in training.

    `fit` takes images (NHWC, uint8 or float in [0, 1]); labels, if any,
    are ignored. It logs `loss`, `reconstruction` and `kl`, and at the end
    measures `scaling_factor` on the training images.

    Example:

    >>> ae = Autoencoder((32, 32, 3), widths=(64, 128), latent_channels=4)
    >>> ae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    >>> ae.fit(x_train, batch_size=64, epochs=5)
    >>> latents = ae.encode(x_test[:8])          # (8, 8, 8, 4)
    >>> images = ae.decode(latents)              # (8, 32, 32, 3) in [0, 1]
    """

    def __init__(self, image_shape, widths=(64, 128), latent_channels=4, blocks_per_level=1,
                 groups=8, pad=0, reconstruction="l1", kl_weight=1e-6, seed=None, **kwargs):
        image_shape = tuple(image_shape)
        widths = tuple(widths)
        check_autoencoder_arguments(
            image_shape=image_shape, widths=widths, latent_channels=latent_channels,
            blocks_per_level=blocks_per_level, groups=groups, pad=pad,
            reconstruction=reconstruction, kl_weight=kl_weight,
        )
        super().__init__(**kwargs)
        self.image_shape = image_shape
        self.widths = widths
        self.latent_channels = int(latent_channels)
        self.blocks_per_level = int(blocks_per_level)
        self.groups = int(groups)
        self.pad = int(pad)
        self.reconstruction = reconstruction
        self.kl_weight = float(kl_weight)
        self.seed = seed
        self.factor = 2 ** len(widths)
        self.latent_shape = ((image_shape[0] + 2 * self.pad) // self.factor,
                             (image_shape[1] + 2 * self.pad) // self.factor, self.latent_channels)
        self.encoder = self._build_encoder()
        self.decoder = self._build_decoder()
        # 0 until measured: a LatentDiffusionModel refuses an autoencoder without it.
        self.scaling_factor = self.add_weight(
            shape=(), initializer="zeros", dtype="float32", trainable=False, name="scaling_factor"
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in ("loss", "reconstruction", "kl")}
        self.built = True

    def _blocks(self, h, channels, prefix):
        for block in range(self.blocks_per_level):
            h = AutoencoderBlock(channels, self.groups, name=f"{prefix}_res_{block}")(h)
        return h

    def _head(self, h, channels, name):
        h = _GroupNormalization(self.groups, epsilon=_NORM_EPSILON, name=f"{name}_norm")(h)
        h = layers.Activation("silu", name=f"{name}_silu")(h)
        return _Conv2D(channels, 3, padding="same", dtype="float32", name=name)(h)

    def _build_encoder(self):
        images = keras.Input(self.image_shape, name="images")
        h = layers.ZeroPadding2D(self.pad, name="pad")(images) if self.pad else images
        h = _Conv2D(self.widths[0], 3, padding="same", name="conv_in")(h)
        for level, channels in enumerate(self.widths):
            h = self._blocks(h, channels, f"down_{level}")
            h = _Conv2D(channels, 3, strides=2, padding="same", name=f"down_{level}_downsample")(h)
        h = self._blocks(h, self.widths[-1], "mid")
        moments = self._head(h, 2 * self.latent_channels, "moments")
        return keras.Model(images, moments, name="encoder")

    def _build_decoder(self):
        latents = keras.Input(self.latent_shape, name="latents")
        h = _Conv2D(self.widths[-1], 3, padding="same", name="conv_in")(latents)
        h = self._blocks(h, self.widths[-1], "mid")
        for level in reversed(range(len(self.widths))):
            h = self._blocks(h, self.widths[level], f"up_{level}")
            h = layers.UpSampling2D(2, name=f"up_{level}_upsample")(h)
            h = _Conv2D(self.widths[level], 3, padding="same", name=f"up_{level}_upsample_conv")(h)
        outputs = self._head(h, self.image_shape[-1], "conv_out")
        if self.pad:
            outputs = layers.Cropping2D(self.pad, name="crop")(outputs)
        return keras.Model(latents, outputs, name="decoder")

    # ------------------------------------------------------------ training
    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        """Images in [-1, 1] -> their reconstruction from the posterior mean."""
        mean, _ = self.posterior(images, training=training)
        return self.decoder(mean, training=training)

    def posterior(self, x, training=False):
        """`(mean, log_variance)` of the latents of `x` (in [-1, 1])."""
        return _split_moments(self.encoder(x, training=training))

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit` on images, which first checks numpy images as a
        whole (shape, range, NaN), then measures `scaling_factor` on them.
        For datasets and generators, call `measure_scaling_factor` on a
        sample of the images after training."""
        if isinstance(x, np.ndarray):
            x = check_training_images(x, self.image_shape)
        backend.before_fit(self)
        history = super().fit(x, y, *args, **kwargs)
        if isinstance(x, np.ndarray):
            self.measure_scaling_factor(x[:_SCALING_IMAGES])
        return history

    def train_step(self, *args):
        return backend.current().train_step(self, *args)

    def test_step(self, *args):
        return backend.current().test_step(self, *args)

    def unpack_batch(self, data):
        images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return (images,)

    def compute_losses(self, batch, training=True):
        """Reconstruction of a posterior sample plus `kl_weight` times the KL
        divergence KL(N(mean, var) || N(0, I)), each averaged over pixels."""
        (images,) = batch
        x = pipeline.to_model_range(images)
        mean, logvar = self.posterior(x, training=training)
        z = sample_posterior(mean, logvar, self.seed_generator)
        error = ops.cast(self.decoder(z, training=training), "float32") - x
        per_pixel = ops.abs(error) if self.reconstruction == "l1" else ops.square(error)
        reconstruction = ops.mean(per_pixel)
        kl_sum = 0.5 * ops.sum(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = ops.mean(kl_sum) / float(np.prod(self.image_shape))
        return {"loss": reconstruction + self.kl_weight * kl, "reconstruction": reconstruction,
                "kl": kl}

    def after_train_step(self):
        pass

    def update_metrics(self, losses):
        for name, tracker in self.trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    # ------------------------------------------------------------ encoding
    def measure_scaling_factor(self, images, batch_size=256):
        """Set `scaling_factor` to 1 / std of the sampled latents of
        `images` (Rombach 2022, section 4.3.2) and return it."""
        images = check_images(images, self.image_shape)
        latents = self.encode(images, sample=True, seed=0, batch_size=batch_size)
        std = float(np.std(latents))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"the latents of these images have std {std}; cannot scale them.")
        self.scaling_factor.assign(1.0 / std)
        return 1.0 / std

    @property
    def measured(self):
        """Whether `scaling_factor` has been measured (by `fit` or
        `measure_scaling_factor`)."""
        return float(ops.convert_to_numpy(self.scaling_factor)) > 0

    def check_measured(self):
        """Raise unless `scaling_factor` has been measured: a latent model
        needs a trained autoencoder."""
        if not self.measured:
            raise ValueError(
                "the autoencoder's latent scaling factor is not measured: train it with "
                "autoencoder.fit(images) (which measures it), or call "
                "autoencoder.measure_scaling_factor(images), before the latent model."
            )

    def encode(self, images, sample=False, seed=None, batch_size=None):
        """Latents of `images` (NHWC, [0, 1] floats or uint8): the posterior
        mean, or a sample of the posterior with `sample=True`. Unscaled: a
        `LatentDiffusionModel` multiplies them by `scaling_factor`.

        Returns float32 numpy `(N, H / f, W / f, latent_channels)`."""
        images = check_images(images, self.image_shape)
        moments = pipeline.call_network(self, self.encoder, pipeline.to_model_range(images),
                                        batch_size=batch_size)
        mean, logvar = _split_moments(moments)
        return ops.convert_to_numpy(sample_posterior(mean, logvar, seed) if sample else mean)

    def decode(self, latents, batch_size=None):
        """Images of unscaled `latents` `(N, H / f, W / f, C)`: float32 numpy
        `(N, H, W, C)` in [0, 1]."""
        latents = np.asarray(latents, dtype="float32")
        if latents.ndim != 4 or latents.shape[1:] != self.latent_shape:
            raise ValueError(
                f"latents must have shape (N, {', '.join(map(str, self.latent_shape))}) for this "
                f"autoencoder; got {latents.shape}."
            )
        x = pipeline.call_network(self, self.decoder, latents, batch_size=batch_size)
        return pipeline.from_model_range(x)

    def reconstruct(self, images, batch_size=None):
        """`decode(encode(images))`: float32 numpy in [0, 1]."""
        return self.decode(self.encode(images, batch_size=batch_size), batch_size=batch_size)

    def psnr(self, images, batch_size=None):
        """The reconstruction PSNR of `images` in dB (peak 1.0, per image,
        then averaged), the measure of an autoencoder's quality."""
        from keras_diffusion.metrics import psnr

        images = check_images(images, self.image_shape)
        return float(psnr(self.reconstruct(images, batch_size=batch_size), images).mean())

    # -------------------------------------------------------- serialisation
    def get_config(self):
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "widths": list(self.widths),
            "latent_channels": self.latent_channels,
            "blocks_per_level": self.blocks_per_level,
            "groups": self.groups,
            "pad": self.pad,
            "reconstruction": self.reconstruction,
            "kl_weight": self.kl_weight,
            "seed": self.seed,
        }

    def compile_from_config(self, config):
        """As `DiffusionModel.compile_from_config`: the loading backend
        decides `jit_compile`."""
        super().compile_from_config(dict(config, jit_compile="auto"))
