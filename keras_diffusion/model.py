"""`DiffusionModel`: the Keras model a user trains with `fit` and samples from.

It owns training (the loss, shared by the backends' train steps in
`keras_diffusion.backend`, and the EMA of the weights) and serialisation.
Sampling goes through `keras_diffusion.pipeline`, for which the model offers
the pipeline's protocol (`network`, `schedule`, `prediction`,
`sampling_weights`, `num_classes`, `class_names`, `image_shape`,
`sample_shape`, and the text parts of a prompted model); `denoise`,
`inpaint`, `img2img`, `interpolate` and `export` are thin wrappers over
`keras_diffusion.applications` and `keras_diffusion.export`. What labels,
captions and the text encoder add to training and saving lives in
`keras_diffusion.conditioning`.
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion import applications
from keras_diffusion import backend
from keras_diffusion import conditioning
from keras_diffusion import pipeline
from keras_diffusion.data import check_training_images
from keras_diffusion.export import export_model
from keras_diffusion.schedule import DiffusionSchedule
from keras_diffusion.schedule import FLOW_PREDICTION
from keras_diffusion.schedule import check_flow_prediction
from keras_diffusion.schedule import check_prediction


@keras.saving.register_keras_serializable(package="keras_diffusion", name="DiffusionModel")
class DiffusionModel(keras.Model):
    """A denoising diffusion model: a network, a noise schedule and an
    exponential moving average (EMA) of the network's weights.

    `fit` trains the network to predict `prediction` from noised images
    (Ho 2020, algorithm 1); `generate` runs a sampler with the EMA weights.

    Args:
        network: a Keras model called as `network([x_t, t])`, or
            `network([x_t, t, labels])` when it is class-conditional (it then
            has a `num_classes` attribute; label `num_classes` is "no label").
        schedule: a `DiffusionSchedule` (default: cosine, 1000 steps), or a
            `FlowMatchSchedule` for flow matching: the network learns the
            velocity `noise - x0`, called with `t = sigma * timesteps`.
        prediction: the network's target: `"epsilon"`, `"v"` or `"x0"` on
            a DDPM schedule (None: `"epsilon"`); `"flow"` (the velocity) on
            a flow schedule, where None means it.
        ema_decay: EMA decay for the sampling weights, or `None`/0 to sample
            with the raw weights.
        min_snr_gamma: gamma for min-SNR loss weighting (Hang 2023), or None.
        label_dropout: probability of replacing a label with the null class
            during training (classifier-free guidance, Ho & Salimans 2022).
        class_names: optional names of the classes, so labels may be given
            by name.
        seed: seed for the timesteps and noise drawn in training.
        text_encoder: for a prompted model, a Keras model mapping token ids
            `(B, L)` to features `(B, L, D)` (a `TextEncoder`, or KerasHub's
            `CLIPTextEncoder`) that a network with `context_dim=D` attends to.
        tokenizer: texts to `(N, L)` int token ids; by default the text
            encoder's `tokenizer`. Saved with the model if Keras-serialisable.
        train_text_encoder: train the text encoder with the network (a
            `TextEncoder` from scratch) or keep it frozen (a pretrained one).
        prompt_dropout: probability of replacing a caption with the empty
            prompt in training, which teaches the unconditional direction.

    Images passed to `fit` are NHWC, float in [0, 1] or uint8; `y` holds
    labels (conditional networks) or captions (prompted models), one per
    image, whose rules are `keras_diffusion.conditioning`'s.

    Example:

    >>> model = DiffusionModel(UNet((28, 28, 1)), DiffusionSchedule("cosine"))
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    >>> model.fit(x_train, batch_size=128, epochs=10)
    >>> images = model.generate(16, steps=50, sampler="ddim", seed=0)

    A prompted model:

    >>> tokenizer = WordTokenizer.from_texts(captions, max_length=12)
    >>> model = DiffusionModel(UNet((28, 28, 1), context_dim=64),
    ...                        text_encoder=TextEncoder(tokenizer, dim=64))
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    >>> model.fit(x_train, captions, batch_size=128, epochs=10)
    >>> images = model.generate(8, prompts="a handwritten seven", guidance_scale=3,
    ...                         sampler="dpmpp_2m", steps=20)
    """

    def __init__(self, network, schedule=None, prediction=None, ema_decay=0.999,
                 min_snr_gamma=None, label_dropout=0.1, class_names=None, seed=None,
                 text_encoder=None, tokenizer=None, train_text_encoder=True, prompt_dropout=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        schedule = schedule if schedule is not None else DiffusionSchedule()
        prediction = prediction or default_prediction(schedule)
        check_model_arguments(prediction=prediction, ema_decay=ema_decay,
                              min_snr_gamma=min_snr_gamma, label_dropout=label_dropout,
                              prompt_dropout=prompt_dropout, train_text_encoder=train_text_encoder,
                              flow=schedule.flow)
        check_float_time(network, schedule)
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.ema_decay = float(ema_decay) if ema_decay else None
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = float(label_dropout)
        self.seed = seed
        self.sample_shape = tuple(network.inputs[0].shape[1:])
        self.image_shape = self.sample_shape
        self.num_classes = getattr(network, "num_classes", None) if len(network.inputs) > 2 else None
        self.class_names = conditioning.check_class_names(class_names, self.num_classes)
        self.prompt_dropout = float(prompt_dropout)
        self.train_text_encoder = bool(train_text_encoder)
        conditioning.attach_text_parts(self, text_encoder, tokenizer)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._backend = backend.current()
        if self.ema_decay:
            # Copies made through NumPy: JAX must not see one buffer in two
            # variables, and "zeros" would compile a kernel per shape (1.6 s).
            self.ema_weights = [
                self.add_weight(shape=v.shape, initializer=_copy_of(v), dtype="float32",
                                trainable=False, name=f"ema_{i}")
                for i, v in enumerate(self._averaged_variables())
            ]
            self.ema_updates = self.add_weight(
                shape=(), initializer="zeros", dtype="float32", trainable=False, name="ema_updates"
            )
        self.built = True

    def _averaged_variables(self):
        """The variables the EMA follows: the network's trainable ones, then
        the text encoder's when it trains too."""
        return list(self.network.trainable_variables) + conditioning.trained_text_variables(self)

    @property
    def conditional(self):
        return self.num_classes is not None

    @property
    def prompted(self):
        return self.text_encoder is not None

    @property
    def guided(self):
        """Whether the model takes a condition (labels or prompts), and so
        classifier-free guidance applies to it."""
        return self.conditional or self.prompted

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=False):
        """One network evaluation: `[x_t, t(, labels)] -> prediction`."""
        return self.network(inputs, training=training)

    # ------------------------------------------------------------ training
    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, which first checks numpy inputs as a whole, so
        that a wrong shape, range, NaN or label fails at once with a message
        saying what is accepted, not after compiling or deep into an epoch.

        Images are NHWC, uint8 or float in [0, 1], of a size
        `pipeline.training_image_shape` takes; `y` is labels or captions, as
        `keras_diffusion.conditioning.check_fit_condition` takes them.
        Datasets and generators pass unchecked: they yield `(images,
        labels)` or, for a prompted model, `(images, token_ids)` batches.
        """
        if isinstance(x, np.ndarray):
            x = check_training_images(x, pipeline.training_image_shape(self, x))
            y = conditioning.check_fit_condition(self, y, len(x))
        backend.before_fit(self)
        return super().fit(x, y, *args, **kwargs)

    def train_step(self, *args):
        return self._backend.train_step(self, *args)

    def test_step(self, *args):
        return self._backend.test_step(self, *args)

    def tokenize_captions(self, captions, num_images=None):
        """Captions as the int32 token ids `fit` trains on, `(N, L)` or, with
        K captions per image, `(N, K, L)`: `keras_diffusion.conditioning`."""
        return conditioning.tokenize_captions(self, captions, num_images)

    def unpack_batch(self, data):
        """`(images, labels, sample_weight)` of a batch (see `keras_diffusion.backend`)."""
        return conditioning.unpack_batch(self, data)

    def compute_diffusion_loss(self, images, labels=None, training=True, sample_weight=None):
        """The diffusion objective, shared by every backend's train step:
        noise the batch at levels the schedule draws (uniform timesteps, a
        flow schedule's sigmas) and regress the prediction target with MSE,
        weighted per example by min-SNR or the flow schedule's `weighting`,
        and by `sample_weight` (DreamBooth's prior preservation) when given."""
        x0 = self.diffusion_inputs(images)
        batch = ops.shape(x0)[0]
        t = self.schedule.draw_levels(batch, seed=self.seed_generator)
        noise = keras.random.normal(ops.shape(x0), dtype="float32", seed=self.seed_generator)
        inputs = [self.schedule.add_noise(x0, noise, t), self.schedule.network_time(t)]
        condition = conditioning.network_condition(self, labels, batch, training=training)
        if condition is not None:
            inputs.append(condition)
        output = ops.cast(self.network(inputs, training=training), "float32")
        target = self.schedule.target(x0, noise, t, self.prediction)
        per_example = ops.mean(ops.square(output - target), axis=(1, 2, 3))
        weights = self.schedule.loss_weight(t, self.prediction, self.min_snr_gamma)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        return ops.mean(weights * per_example)

    def encode_prompts(self, token_ids, training=True):
        """Text features of token ids `(B, L)` or `(B, K, L)`, with prompt
        dropout in training: `keras_diffusion.conditioning.encode_prompts`."""
        return conditioning.encode_prompts(self, token_ids, training=training)

    def diffusion_inputs(self, images):
        """A batch of images as the clean samples x0 the model diffuses:
        [-1, 1] pixels here; a latent model's scaled latents."""
        return pipeline.to_model_range(images)

    def compute_losses(self, batch, training=True):
        """The losses of one batch for the backends' train and test steps."""
        images, labels, sample_weight = batch
        return {"loss": self.compute_diffusion_loss(images, labels, training=training,
                                                    sample_weight=sample_weight)}

    def after_train_step(self):
        """EMA of the weights with the warm-up decay min(decay, (1+n)/(10+n))
        that diffusers' EMAModel uses, so early samples are not dominated by
        the random initialisation."""
        if not self.ema_decay:
            return
        n = self.ema_updates
        decay = ops.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))
        for ema, weight in zip(self.ema_weights, self._averaged_variables()):
            ema.assign(decay * ema + (1.0 - decay) * ops.cast(weight, "float32"))
        self.ema_updates.assign(n + 1.0)

    def update_metrics(self, losses):
        self.loss_tracker.update_state(losses["loss"])
        return {"loss": self.loss_tracker.result()}

    # ------------------------------------------------------------ sampling
    def generate(self, num_images, steps=50, sampler="ddim", seed=None, labels=None,
                 guidance_scale=1.0, eta=0.0, timestep_spacing=None, batch_size=None,
                 use_karras_sigmas=None, prompts=None, negative_prompts=None, noise=None,
                 image_size=None):
        """Sample `num_images` images with the EMA weights.

        `sampler` is one of `keras_diffusion.SAMPLERS`; `use_karras_sigmas`
        and the other sampling arguments mean what they do in
        `keras_diffusion.sample`. `"dpmpp_2m"` gives good images in 10-20 steps.
        `labels` (conditional models): one label for all images or one per
        image, as indices or class names; `guidance_scale` weighs
        classifier-free guidance (1: plain conditional, 0: unconditional).
        `prompts` (prompted models): one string for all images or one per
        image; `negative_prompts` likewise, the direction guidance steers
        away from (default: the empty prompt). `timestep_spacing` None is the
        schedule's default (`"linspace"` unless its scheduler config says
        otherwise). `noise`: the starting noise `(num_images, h, w, C)`, NHWC,
        shaped like the samples (a latent model's latents), instead of one
        drawn from `seed`. `image_size`: `(H, W)` for a model whose network
        takes any size it divides (a Stable Diffusion UNet); None for the
        model's own.

        Returns a numpy array `(num_images, H, W, C)`, float32 in [0, 1].
        The same `seed` gives the same images on the same backend.
        """
        x0 = pipeline.sample(
            self, num_images, steps=steps, sampler=sampler, seed=seed, labels=labels,
            prompts=prompts, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
            eta=eta, timestep_spacing=timestep_spacing, batch_size=batch_size,
            use_karras_sigmas=use_karras_sigmas, noise=noise, image_size=image_size,
        )
        return pipeline.decode(self, x0, batch_size=batch_size)

    @property
    def sampling_weights(self):
        """The network weights sampling uses: the EMA weights when EMA is on."""
        if not self.ema_decay:
            return self.network.trainable_variables
        return self.ema_weights[:len(self.network.trainable_variables)]

    @property
    def text_sampling_weights(self):
        """The text encoder's weights sampling uses (EMA when it trains)."""
        return conditioning.text_sampling_weights(self)

    # ------------------------------------------- restoration and editing
    # Thin entry points; `keras_diffusion.applications` turns the requests
    # into pipeline runs and documents their arguments and results.
    def denoise(self, images, sigma=None, steps=10, labels=None, guidance_scale=1.0, batch_size=None,
                prompts=None, negative_prompts=None):
        """Remove Gaussian noise of std `sigma`: `keras_diffusion.applications.denoise`."""
        return applications.denoise(self, images, sigma=sigma, steps=steps, labels=labels,
                                    prompts=prompts, negative_prompts=negative_prompts,
                                    guidance_scale=guidance_scale, batch_size=batch_size)

    def inpaint(self, images, mask, steps=50, jump_length=5, resamples=4, eta=1.0, seed=None,
                labels=None, guidance_scale=1.0, batch_size=None, prompts=None,
                negative_prompts=None):
        """Fill in where `mask` is 0 (RePaint): `keras_diffusion.applications.inpaint`."""
        return applications.inpaint(
            self, images, mask, steps=steps, jump_length=jump_length, resamples=resamples,
            eta=eta, seed=seed, labels=labels, prompts=prompts, negative_prompts=negative_prompts,
            guidance_scale=guidance_scale, batch_size=batch_size,
        )

    def img2img(self, images, strength=0.5, steps=50, eta=0.0, seed=None, labels=None,
                guidance_scale=1.0, batch_size=None, prompts=None, negative_prompts=None):
        """Image-to-image by SDEdit: `keras_diffusion.applications.img2img`."""
        return applications.img2img(
            self, images, strength=strength, steps=steps, eta=eta, seed=seed, labels=labels,
            prompts=prompts, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
            batch_size=batch_size,
        )

    def interpolate(self, a, b, num=8, steps=50, labels=None, guidance_scale=1.0, batch_size=None,
                    prompts=None, negative_prompts=None):
        """Images between two noises: `keras_diffusion.applications.interpolate`."""
        return applications.interpolate(self, a, b, num=num, steps=steps, labels=labels,
                                        prompts=prompts, negative_prompts=negative_prompts,
                                        guidance_scale=guidance_scale, batch_size=batch_size)

    # --------------------------------------------------------------- export
    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               **kwargs):
        """Export for serving: `format="tf_saved_model"` writes a SavedModel
        with the endpoints `keras_diffusion.export` lists, served without
        keras_diffusion; `steps`, `sampler`, `eta`, `timestep_spacing` and
        `denoise_steps` fix its sampling loop. `format="onnx"` writes
        `predict_noise` only. Example: `model.export("exported", steps=25)`.
        """
        return export_model(self, filepath, format=format, verbose=verbose,
                            input_signature=input_signature, **kwargs)

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
            **conditioning.text_config(self),
        }

    def compile_from_config(self, config):
        """Compile a loaded model as it was saved, except `jit_compile`.

        Keras saves `jit_compile` as the saving backend resolved "auto"
        (False on TensorFlow's CPU and PyTorch, True on JAX); kept, a
        TensorFlow file would train op by op under JAX (740 small XLA
        compilations, 48 s, for a tiny UNet's first step). The loading
        backend resolves "auto" again."""
        super().compile_from_config(dict(config, jit_compile="auto"))

    @classmethod
    def from_preset(cls, preset, precision=None):
        """A trained model by preset name, as KerasHub's `from_preset`:
        `DiffusionModel.from_preset("mnist_conditional")`. Takes whatever
        `load_model` takes but checkpoints (an `hf://` path, a `.keras` file) and checks the
        model is a `cls`; `keras-diffusion presets` lists the names."""
        model = load_keras_model(preset, precision=precision)
        if not isinstance(model, cls):
            raise ValueError(f"{preset} holds a {type(model).__name__}, not a {cls.__name__}.")
        return model

    @classmethod
    def from_config(cls, config):
        config = conditioning.text_parts_from_config(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def _copy_of(variable):
    """An initializer that returns a float32 NumPy copy of `variable`."""
    return lambda shape, dtype=None: ops.convert_to_numpy(variable).astype("float32")


def default_prediction(schedule):
    """What a network predicts when the model names nothing: the velocity
    on a flow schedule, the noise on a DDPM one."""
    return FLOW_PREDICTION if getattr(schedule, "flow", False) else "epsilon"


def check_float_time(network, schedule):
    """A flow schedule calls the network at float times `sigma * timesteps`;
    a network whose `t` input is int32 (a UNet saved before it took floats)
    would round them away."""
    if getattr(schedule, "flow", False) and "int" in str(network.inputs[1].dtype):
        raise ValueError(f"a flow-matching schedule calls the network with float times (sigma * "
                         f"timesteps), but {network.name}'s t input is {network.inputs[1].dtype}; "
                         "build the network anew (a UNet takes float32 t).")


def check_model_arguments(*, prediction, ema_decay, min_snr_gamma, label_dropout,
                          prompt_dropout=0.1, train_text_encoder=True, flow=False):
    """The rules of `DiffusionModel`'s training arguments (the config's
    `model` section is checked by them too); `flow`: on a flow schedule."""
    if flow:
        check_flow_prediction(prediction)
        if min_snr_gamma is not None:
            raise ValueError("min_snr_gamma weighs DDPM timesteps; a flow-matching schedule "
                             "weighs by its own weighting= ('none', 'sigma_sqrt', 'cosmap').")
    elif prediction == FLOW_PREDICTION:
        raise ValueError("prediction='flow' (the velocity) needs a flow-matching schedule: pass "
                         "schedule=FlowMatchSchedule(...).")
    else:
        check_prediction(prediction)
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) or None; got {ema_decay!r}.")
    if not 0 <= label_dropout < 1:
        raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout!r}.")
    if not 0 <= prompt_dropout < 1:
        raise ValueError(f"prompt_dropout must be in [0, 1); got {prompt_dropout!r}.")
    if not isinstance(train_text_encoder, bool):
        raise ValueError(f"train_text_encoder must be True or False; got {train_text_encoder!r}.")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None; got {min_snr_gamma!r}.")


def load_keras_model(source, precision=None):
    """A `DiffusionModel` from a `.keras` file, a preset name, an
    `hf://OWNER/NAME` repository or an unzipped model folder (what
    `keras_diffusion.load_model` takes, checkpoints aside); the arguments and
    errors are `load_model`'s."""
    import os
    import zipfile

    from keras_diffusion import hub
    from keras_diffusion import precision as precisions
    from keras_diffusion import presets

    if precision is not None:
        precisions.check_precision(precision)
    name = path = os.fspath(source)
    if hub.is_hub_path(path):
        path = hub.download(path)
    if presets.is_preset(path):
        path = os.fspath(presets.preset_file(path))
    elif os.path.isdir(path):
        pass  # an unzipped model, as a Hub repository holds it
    elif not os.path.isfile(path):
        known = f" (nor a preset: {', '.join(presets.presets()) or 'none'})" if "." not in path else ""
        raise FileNotFoundError(f"model file not found: {path}{known}")
    elif not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a Keras model archive; expected a .keras file written by "
            "model.save or keras-diffusion train (or a Stable Diffusion checkpoint: a diffusers "
            "folder or a .safetensors file)."
        )
    policy = None if precision is None else precisions.resolve(precision, sampling=True)
    try:
        with precisions.policy_scope(policy):
            model = keras.saving.load_model(path)
    except Exception as error:  # a truncated or foreign archive fails in many ways
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load {name} as a Keras model ({first_line}).") from error
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"{name} holds a {type(model).__name__}, not a keras_diffusion DiffusionModel.")
    return model
