"""`DiffusionModel`: the Keras model a user trains with `fit` and samples from."""

import keras
import numpy as np
from keras import ops

from keras_diffusion import samplers
from keras_diffusion.schedule import PREDICTION_TYPES
from keras_diffusion.schedule import DiffusionSchedule
from keras_diffusion.trainers import backend_module


@keras.saving.register_keras_serializable(package="keras_diffusion")
class DiffusionModel(keras.Model):
    """A denoising diffusion model: a network, a noise schedule and an
    exponential moving average (EMA) of the network's weights.

    `fit` trains the network to predict `prediction` from noised images
    (Ho 2020, algorithm 1); `generate` runs a sampler with the EMA weights.

    Args:
        network: a Keras model called as `network([x_t, t])`, or
            `network([x_t, t, labels])` when it is class-conditional (it then
            has a `num_classes` attribute; label `num_classes` is "no label").
        schedule: a `DiffusionSchedule` (default: cosine, 1000 steps).
        prediction: the network's target: `"epsilon"`, `"v"` or `"x0"`.
        ema_decay: EMA decay for the sampling weights, or `None`/0 to sample
            with the raw weights.
        min_snr_gamma: gamma for min-SNR loss weighting (Hang 2023), or None.
        label_dropout: probability of replacing a label with the null class
            during training (classifier-free guidance, Ho & Salimans 2022).
        class_names: optional names of the classes, so labels may be given
            by name.
        seed: seed for the timesteps and noise drawn in training.

    Images passed to `fit` are NHWC, float in [0, 1] or uint8; labels (for
    conditional networks) are integers passed as `y`.

    Example:

    >>> model = DiffusionModel(UNet((28, 28, 1)), DiffusionSchedule("cosine"))
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    >>> model.fit(x_train, batch_size=128, epochs=10)
    >>> images = model.generate(16, steps=50, sampler="ddim", seed=0)
    """

    def __init__(
        self,
        network,
        schedule=None,
        prediction="epsilon",
        ema_decay=0.999,
        min_snr_gamma=None,
        label_dropout=0.1,
        class_names=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction must be one of {', '.join(PREDICTION_TYPES)}; got {prediction!r}."
            )
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or None; got {ema_decay!r}.")
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout!r}.")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None; got {min_snr_gamma!r}.")
        self.network = network
        self.schedule = schedule if schedule is not None else DiffusionSchedule()
        self.prediction = prediction
        self.ema_decay = float(ema_decay) if ema_decay else None
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = float(label_dropout)
        self.seed = seed
        self.image_shape = tuple(network.inputs[0].shape[1:])
        self.num_classes = getattr(network, "num_classes", None) if len(network.inputs) > 2 else None
        if class_names is not None and (
            self.num_classes is None or len(class_names) != self.num_classes
        ):
            raise ValueError(
                f"class_names must list one name per class of the network "
                f"(num_classes={self.num_classes}); got {len(class_names)} names."
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._backend = backend_module()
        self._compiled_samplers = {}
        if self.ema_decay:
            self.ema_weights = [
                self.add_weight(
                    shape=v.shape, initializer="zeros", dtype="float32",
                    trainable=False, name=f"ema_{i}",
                )
                for i, v in enumerate(network.trainable_variables)
            ]
            for ema, v in zip(self.ema_weights, network.trainable_variables):
                # Copy through numpy: JAX must not see one buffer in two variables.
                ema.assign(ops.convert_to_numpy(v).astype("float32"))
            self.ema_updates = self.add_weight(
                shape=(), initializer="zeros", dtype="float32", trainable=False, name="ema_updates"
            )
        self.built = True

    @property
    def conditional(self):
        return self.num_classes is not None

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=False):
        """One network evaluation: `[x_t, t(, labels)] -> prediction`."""
        return self.network(inputs, training=training)

    # ------------------------------------------------------------ training
    def train_step(self, *args):
        return self._backend.train_step(self, *args)

    def test_step(self, *args):
        return self._backend.test_step(self, *args)

    def unpack_batch(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.conditional and labels is None:
            raise ValueError(
                f"The network is class-conditional (num_classes={self.num_classes}), "
                "so fit needs labels: pass them as y, or as (images, labels) batches."
            )
        if not self.conditional and labels is not None:
            raise ValueError(
                "Labels were passed, but the network is unconditional (num_classes=None); "
                "build the UNet with num_classes to train a class-conditional model."
            )
        return images, labels

    def compute_diffusion_loss(self, images, labels=None, training=True):
        """The diffusion objective, shared by every backend's train step:
        noise the batch at uniformly drawn timesteps and regress the
        prediction target with (optionally min-SNR weighted) MSE."""
        x0 = to_model_range(images)
        batch = ops.shape(x0)[0]
        t = keras.random.randint(
            (batch,), 0, self.schedule.timesteps, dtype="int32", seed=self.seed_generator
        )
        noise = keras.random.normal(ops.shape(x0), dtype="float32", seed=self.seed_generator)
        inputs = [self.schedule.add_noise(x0, noise, t), t]
        if self.conditional:
            labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
            if training and self.label_dropout > 0:
                drop = keras.random.uniform((batch,), seed=self.seed_generator) < self.label_dropout
                labels = ops.where(drop, self.num_classes, labels)
            inputs.append(labels)
        output = ops.cast(self.network(inputs, training=training), "float32")
        target = self.schedule.target(x0, noise, t, self.prediction)
        per_example = ops.mean(ops.square(output - target), axis=(1, 2, 3))
        weights = self.schedule.loss_weight(t, self.prediction, self.min_snr_gamma)
        return ops.mean(weights * per_example)

    def update_ema(self):
        """EMA of the weights with the warm-up decay min(decay, (1+n)/(10+n))
        that diffusers' EMAModel uses, so early samples are not dominated by
        the random initialisation."""
        if not self.ema_decay:
            return
        n = self.ema_updates
        decay = ops.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))
        for ema, weight in zip(self.ema_weights, self.network.trainable_variables):
            ema.assign(decay * ema + (1.0 - decay) * ops.cast(weight, "float32"))
        self.ema_updates.assign(n + 1.0)

    def update_loss_metric(self, loss):
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    # ------------------------------------------------------------ sampling
    def generate(
        self,
        num_images,
        steps=50,
        sampler="ddim",
        seed=None,
        labels=None,
        guidance_scale=1.0,
        eta=0.0,
        timestep_spacing="leading",
        batch_size=None,
    ):
        """Sample `num_images` images with the EMA weights.

        Returns a numpy array `(num_images, H, W, C)`, float32 in [0, 1].
        The same `seed` gives the same images on the same backend.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer; got {num_images!r}.")
        labels = self._check_labels(labels, num_images, guidance_scale)
        timesteps = samplers.plan_timesteps(self.schedule, sampler, steps, eta, timestep_spacing)
        noise = keras.random.normal((num_images,) + self.image_shape, seed=seed)
        step_seed = None if seed is None else seed + 1
        step_noise = samplers.draw_step_noise(noise.shape, sampler, len(timesteps), eta, step_seed)
        x0 = self.run_sampler(
            noise, timesteps, sampler, eta, labels, guidance_scale, step_noise, batch_size
        )
        return from_model_range(x0)

    def run_sampler(
        self, x, timesteps, sampler, eta=0.0, labels=None, guidance_scale=1.0,
        step_noise=None, batch_size=None, clip_x0=True,
    ):
        """Run a compiled sampling loop from `x` (at `timesteps[0]`) over
        `timesteps` with the EMA weights, in batches of `batch_size`.
        Returns x0 in [-1, 1] as a tensor."""
        key = (sampler, tuple(int(t) for t in timesteps), float(eta),
               float(guidance_scale), labels is None, clip_x0)
        if key not in self._compiled_samplers:
            self._compiled_samplers[key] = self._backend.compile_function(
                self._sampling_function(timesteps, sampler, eta, guidance_scale, clip_x0)
            )
        fn = self._compiled_samplers[key]
        weights = [v.value for v in self.sampling_weights]
        state = [v.value for v in self.network.non_trainable_variables]
        n = x.shape[0]
        batch_size = batch_size or n
        outputs = []
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            outputs.append(fn(
                weights, state, x[part],
                None if step_noise is None else step_noise[:, part],
                None if labels is None else labels[part],
            ))
        return outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=0)

    @property
    def sampling_weights(self):
        """The weights sampling uses: the EMA weights when EMA is on."""
        return self.ema_weights if self.ema_decay else self.network.trainable_variables

    def _sampling_function(self, timesteps, sampler, eta, guidance_scale, clip_x0):
        def sample_batch(weights, state, x, step_noise, labels):
            def network(inputs):
                return self.network.stateless_call(weights, state, inputs, training=False)[0]

            denoiser = self._denoiser(network, labels, guidance_scale)
            return samplers.run_sampler(
                denoiser, self.schedule, x, timesteps, sampler, self.prediction,
                eta, clip_x0, step_noise,
            )

        return sample_batch

    def _denoiser(self, network, labels, guidance_scale):
        """Wrap the network as a `(x_t, t) -> output` denoiser, applying
        classifier-free guidance: uncond + w (cond - uncond) (Ho & Salimans
        2022 eq. 6, written so w = 0 is unconditional and w = 1 conditional)."""
        if not self.conditional:
            return lambda x, t: network([x, t])

        def null_labels(x):
            return ops.full((ops.shape(x)[0],), self.num_classes, dtype="int32")

        if labels is None or guidance_scale == 0:
            return lambda x, t: network([x, t, null_labels(x)])
        if guidance_scale == 1:
            return lambda x, t: network([x, t, labels])

        def guided(x, t):
            both = network([
                ops.concatenate([x, x], axis=0),
                ops.concatenate([t, t], axis=0),
                ops.concatenate([labels, null_labels(x)], axis=0),
            ])
            cond, uncond = ops.split(ops.cast(both, "float32"), 2, axis=0)
            return uncond + guidance_scale * (cond - uncond)

        return guided

    def _check_labels(self, labels, num_images, guidance_scale):
        if not self.conditional:
            if labels is not None:
                raise ValueError(
                    "labels were given, but this model is unconditional (its network has no "
                    "num_classes); generate without labels."
                )
            if guidance_scale != 1.0:
                raise ValueError(
                    f"guidance_scale={guidance_scale!r} needs a class-conditional model; "
                    "this model is unconditional, so leave guidance_scale at 1.0."
                )
            return None
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale!r}.")
        if labels is None:
            return None
        if isinstance(labels, (int, np.integer, str)):
            labels = [labels] * num_images
        labels = [self._label_index(label) for label in labels]
        if len(labels) != num_images:
            raise ValueError(
                f"labels must have one entry per image ({num_images}); got {len(labels)}."
            )
        return ops.convert_to_tensor(np.asarray(labels, dtype="int32"))

    def _label_index(self, label):
        if isinstance(label, str) and not label.isdigit():
            names = [name.lower() for name in (self.class_names or [])]
            if label.lower() not in names:
                accepted = ", ".join(self.class_names) if self.class_names else "integers only"
                raise ValueError(f"unknown class name {label!r}; accepted: {accepted}.")
            return names.index(label.lower())
        index = int(label)
        if not 0 <= index < self.num_classes:
            raise ValueError(
                f"label {label!r} is out of range; accepted: 0 to {self.num_classes - 1}."
            )
        return index

    # -------------------------------------------------------- serialisation
    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.network),
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "prediction": self.prediction,
            "ema_decay": self.ema_decay,
            "min_snr_gamma": self.min_snr_gamma,
            "label_dropout": self.label_dropout,
            "class_names": self.class_names,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def to_model_range(images):
    """[0, 1] floats or uint8 at the API boundary -> float32 in [-1, 1]."""
    images = ops.convert_to_tensor(images)
    if "int" in str(images.dtype):
        images = ops.cast(images, "float32") / 255.0
    return ops.cast(images, "float32") * 2.0 - 1.0


def from_model_range(x):
    """float32 in [-1, 1] -> numpy float32 in [0, 1]."""
    return np.clip((keras.ops.convert_to_numpy(x) + 1.0) / 2.0, 0.0, 1.0).astype("float32")


def load_model(path):
    """Load a `.keras` file saved from a `DiffusionModel`, on any backend.

    Raises `FileNotFoundError` for a missing file and `ValueError` for a file
    that is not a readable Keras archive or holds another kind of model.
    """
    import os
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a Keras model archive; expected a .keras file written by "
            "model.save or keras-diffusion train."
        )
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # a truncated or foreign archive fails in many ways
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load {path} as a Keras model ({first_line}).") from error
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a keras_diffusion DiffusionModel.")
    return model
