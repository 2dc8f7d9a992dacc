"""`LatentDiffusionModel`: diffusion in the latent space of a trained
`Autoencoder` (Rombach et al. 2022).

It is a `DiffusionModel` whose samples are the autoencoder's latents times
its `scaling_factor`: `fit` takes images and encodes each batch inside the
train step (a fresh posterior sample every epoch, as LDM trains), and the
sampling pipeline (`keras_diffusion.pipeline`) decodes what the samplers
return. Everything else, the loss, EMA, guidance, samplers and
applications, is `DiffusionModel`'s. The autoencoder is frozen.
"""

import keras
from keras import ops

from keras_diffusion import pipeline
from keras_diffusion.autoencoder import Autoencoder
from keras_diffusion.autoencoder import sample_posterior
from keras_diffusion.model import DiffusionModel


def check_latent_parts(autoencoder, network):
    """An `Autoencoder` and a network that runs on its latents."""
    if not isinstance(autoencoder, Autoencoder):
        raise ValueError(
            f"autoencoder must be a keras_diffusion Autoencoder; got {type(autoencoder).__name__}."
        )
    network_shape = tuple(network.inputs[0].shape[1:])
    if network_shape != autoencoder.latent_shape:
        raise ValueError(
            f"the network takes {network_shape} inputs but the autoencoder makes "
            f"{autoencoder.latent_shape} latents; build the UNet with "
            f"image_shape={autoencoder.latent_shape}."
        )


@keras.saving.register_keras_serializable(package="keras_diffusion", name="LatentDiffusionModel")
class LatentDiffusionModel(DiffusionModel):
    """A diffusion model over the latents of a trained `Autoencoder`.

    Args:
        autoencoder: a trained `Autoencoder` (its `scaling_factor`
            measured); frozen here.
        network: a UNet over the latents: `image_shape` equal to the
            autoencoder's `latent_shape`.
        schedule, prediction, ema_decay, min_snr_gamma, label_dropout,
            class_names, seed: as in `DiffusionModel`.

    `fit`, `generate`, `inpaint`, `img2img` and `interpolate` take and
    return images, as `DiffusionModel`'s do; the latents stay inside.
    The samplers do not clip latents to [-1, 1]. `denoise` raises: it
    needs a pixel-space model. `export` writes `generate` (decoding inside),
    `generate_conditional` and `predict_noise` (on latents).

    Example:

    >>> model = LatentDiffusionModel(ae, UNet(ae.latent_shape, widths=(64, 128)),
    ...                              DiffusionSchedule("cosine"), prediction="v")
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    >>> model.fit(x_train, batch_size=64, epochs=10)
    >>> images = model.generate(16, sampler="dpmpp_2m", steps=20, seed=0)
    """

    def __init__(self, autoencoder, network, schedule=None, **kwargs):
        check_latent_parts(autoencoder, network)
        super().__init__(network, schedule, **kwargs)
        autoencoder.trainable = False
        self.autoencoder = autoencoder
        self.image_shape = autoencoder.image_shape

    def fit(self, x=None, y=None, *args, **kwargs):
        """`DiffusionModel.fit` on images; the autoencoder must be trained."""
        self.autoencoder.check_measured()
        return super().fit(x, y, *args, **kwargs)

    def diffusion_inputs(self, images):
        """A posterior sample of the images' latents, times the scaling
        factor, with no gradient into the frozen autoencoder."""
        mean, logvar = self.autoencoder.posterior(pipeline.to_model_range(images), training=False)
        latents = ops.stop_gradient(sample_posterior(mean, logvar, self.seed_generator))
        return latents * ops.cast(self.autoencoder.scaling_factor, "float32")

    def get_config(self):
        return dict(super().get_config(),
                    autoencoder=keras.saving.serialize_keras_object(self.autoencoder))

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["autoencoder"] = keras.saving.deserialize_keras_object(config["autoencoder"])
        return super().from_config(config)

