"""`DiffusionModel`: the Keras model a user trains with `fit` and samples from.

It owns training (the loss, shared by the backends' train steps in
`keras_diffusion.backend`, and the EMA of the weights) and serialisation.
Sampling goes through `keras_diffusion.pipeline`, for which the model offers
the pipeline's protocol (`network`, `schedule`, `prediction`,
`sampling_weights`, `num_classes`, `class_names`, `image_shape`,
`sample_shape`); `denoise`,
`inpaint`, `img2img`, `interpolate` and `export` are thin wrappers over
`keras_diffusion.applications` and `keras_diffusion.export`, imported when
called.
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion import backend
from keras_diffusion import pipeline
from keras_diffusion.data import check_training_images
from keras_diffusion.data import check_training_labels
from keras_diffusion.schedule import DiffusionSchedule
from keras_diffusion.schedule import check_prediction
from keras_diffusion import text
from keras_diffusion.text import check_texts


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
        text_encoder: for a prompted model, a Keras model mapping token ids
            `(B, L)` to features `(B, L, D)` (a `TextEncoder`, or e.g.
            KerasHub's `CLIPTextEncoder`) that a network built with
            `context_dim=D` cross-attends to.
        tokenizer: texts to `(N, L)` int token ids; by default the text
            encoder's `tokenizer`. Saved with the model when it is
            Keras-serialisable.
        train_text_encoder: train the text encoder with the network (True,
            the right choice for a `TextEncoder` trained from scratch) or
            keep it frozen (a pretrained encoder).
        prompt_dropout: probability of replacing a caption with the empty
            prompt in training, so that the model also learns the
            unconditional direction that guidance needs.

    Images passed to `fit` are NHWC, float in [0, 1] or uint8; labels (for
    conditional networks) are integers passed as `y`, captions (for
    prompted models) strings passed as `y`, one per image.

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
        text_encoder=None,
        tokenizer=None,
        train_text_encoder=True,
        prompt_dropout=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_model_arguments(prediction=prediction, ema_decay=ema_decay,
                              min_snr_gamma=min_snr_gamma, label_dropout=label_dropout,
                              prompt_dropout=prompt_dropout, train_text_encoder=train_text_encoder)
        self.network = network
        self.schedule = schedule if schedule is not None else DiffusionSchedule()
        self.prediction = prediction
        self.ema_decay = float(ema_decay) if ema_decay else None
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = float(label_dropout)
        self.seed = seed
        self.sample_shape = tuple(network.inputs[0].shape[1:])
        self.image_shape = self.sample_shape
        self.num_classes = getattr(network, "num_classes", None) if len(network.inputs) > 2 else None
        if class_names is not None and (
            self.num_classes is None or len(class_names) != self.num_classes
        ):
            raise ValueError(
                f"class_names must list one name per class of the network "
                f"(num_classes={self.num_classes}); got {len(class_names)} names."
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.prompt_dropout = float(prompt_dropout)
        self.train_text_encoder = bool(train_text_encoder)
        self._set_text_encoder(network, text_encoder, tokenizer)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._backend = backend.current()
        if self.ema_decay:
            # Each starts as a copy of its weight, made through NumPy: JAX must
            # not see one buffer in two variables, and a "zeros" initializer
            # would compile a kernel per weight shape under JAX (1.6 s for the
            # MNIST UNet).
            self.ema_weights = [
                self.add_weight(
                    shape=v.shape, initializer=_copy_of(v), dtype="float32",
                    trainable=False, name=f"ema_{i}",
                )
                for i, v in enumerate(self._averaged_variables())
            ]
            self.ema_updates = self.add_weight(
                shape=(), initializer="zeros", dtype="float32", trainable=False, name="ema_updates"
            )
        self.built = True

    def _set_text_encoder(self, network, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = text.check_prompted_parts(network, text_encoder, tokenizer,
                                                   self.num_classes)
        if text_encoder is not None:
            self._own_tokenizer = self.tokenizer is not getattr(text_encoder, "tokenizer", None)
            text_encoder.trainable = self.train_text_encoder
            self.empty_prompt_ids = text.tokenize(self.tokenizer, [""])[0]

    def _averaged_variables(self):
        """The variables the EMA follows: the network's trainable ones, then
        the text encoder's when it trains too."""
        variables = list(self.network.trainable_variables)
        if self.text_encoder is not None and self.train_text_encoder:
            variables += list(self.text_encoder.trainable_variables)
        return variables

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

        Images are NHWC, uint8 or float in [0, 1] (3-D `(N, H, W)` arrays
        get a channel axis); labels, for a class-conditional network, are
        integers 0 to `num_classes - 1`, one per image; captions, for a
        prompted model, are strings, one per image, tokenised here (or
        token ids from `tokenize_captions`). Datasets and generators are
        passed through unchecked: they yield `(images, token_ids)` batches
        for a prompted model.
        """
        if isinstance(x, np.ndarray):
            x = check_training_images(x, self.image_shape)
            if self.prompted and y is not None:
                y = self.tokenize_captions(y, len(x))
            y = None if y is None else np.asarray(y)
            self.unpack_batch((x,) if y is None else (x, y))
            if y is not None and not self.prompted:
                y = check_training_labels(y, len(x), self.num_classes)
        backend.before_fit(self)
        return super().fit(x, y, *args, **kwargs)

    def train_step(self, *args):
        return self._backend.train_step(self, *args)

    def test_step(self, *args):
        return self._backend.test_step(self, *args)

    def tokenize_captions(self, captions, num_images=None):
        """Captions as the int32 token ids `fit` trains on: one string per
        image gives `(N, L)`; a list of strings per image gives `(N, K, L)`,
        and each training step draws one of an image's K captions (shorter
        lists are cycled to the longest). Ids already tokenised pass
        through. Run it in your input pipeline to feed `fit` a dataset."""
        if isinstance(captions, np.ndarray) and np.issubdtype(captions.dtype, np.integer):
            if captions.ndim not in (2, 3):
                raise TypeError(
                    f"captions must be strings, one per image, or (N, length) token ids; got "
                    f"integers of shape {captions.shape}. A prompted model takes captions, not "
                    "labels: e.g. keras_diffusion.class_captions(labels, 'mnist')."
                )
            ids = captions
        elif (isinstance(captions, (list, tuple)) and captions
              and isinstance(captions[0], (list, tuple, np.ndarray))):
            sets = [check_texts(texts, f"captions[{index}]") for index, texts in enumerate(captions)]
            most = max(len(texts) for texts in sets)
            flat = [texts[k % len(texts)] for texts in sets for k in range(most)]
            ids = pipeline.tokenize(self, flat).reshape(len(sets), most, -1)
        else:
            if isinstance(captions, (list, tuple, np.ndarray)) and len(captions) == 0:
                raise ValueError("captions are empty; expected one caption (a string) per image.")
            ids = pipeline.tokenize(self, check_texts(captions, "captions"))
        if num_images is not None and len(ids) != num_images:
            raise ValueError(
                f"captions must be one per image: got {len(ids)} captions for {num_images} images."
            )
        return ids

    def unpack_batch(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.prompted:
            if labels is None:
                raise ValueError(
                    "The model is prompted (it has a text encoder), so fit needs captions: pass "
                    "one string per image as y, or (images, token_ids) batches."
                )
            return images, labels
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
        x0 = self.diffusion_inputs(images)
        batch = ops.shape(x0)[0]
        t = keras.random.randint(
            (batch,), 0, self.schedule.timesteps, dtype="int32", seed=self.seed_generator
        )
        noise = keras.random.normal(ops.shape(x0), dtype="float32", seed=self.seed_generator)
        inputs = [self.schedule.add_noise(x0, noise, t), t]
        if self.prompted:
            inputs.append(self.encode_prompts(labels, training=training))
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

    def encode_prompts(self, token_ids, training=True):
        """Text features of a batch of token ids, with prompt dropout in
        training: a caption is replaced by the empty prompt with probability
        `prompt_dropout`. Ids `(B, K, L)` hold K captions per image, of
        which one is drawn."""
        ids = ops.cast(token_ids, "int32")
        if len(ids.shape) == 3:
            choice = keras.random.randint((ops.shape(ids)[0], 1, 1), 0, ids.shape[1],
                                          dtype="int32", seed=self.seed_generator)
            ids = ops.take_along_axis(ids, choice, axis=1)[:, 0]
        if training and self.prompt_dropout > 0:
            drop = keras.random.uniform((ops.shape(ids)[0], 1), seed=self.seed_generator)
            ids = ops.where(drop < self.prompt_dropout,
                            ops.convert_to_tensor(self.empty_prompt_ids[np.newaxis]), ids)
        output = self.text_encoder(text.encoder_inputs(self.text_encoder, ids),
                                   training=training and self.train_text_encoder)
        return text.encoder_features(output)

    def diffusion_inputs(self, images):
        """A batch of images as the clean samples x0 the model diffuses:
        [-1, 1] pixels here; a latent model's scaled latents."""
        return pipeline.to_model_range(images)

    def compute_losses(self, batch, training=True):
        """The losses of one batch for the backends' train and test steps."""
        images, labels = batch
        return {"loss": self.compute_diffusion_loss(images, labels, training=training)}

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
    def generate(
        self,
        num_images,
        steps=50,
        sampler="ddim",
        seed=None,
        labels=None,
        guidance_scale=1.0,
        eta=0.0,
        timestep_spacing=None,
        batch_size=None,
        use_karras_sigmas=None,
        prompts=None,
        negative_prompts=None,
        noise=None,
        image_size=None,
    ):
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
        if not self.ema_decay or not self.train_text_encoder:
            return self.text_encoder.trainable_variables
        return self.ema_weights[len(self.network.trainable_variables):]

    # ------------------------------------------- restoration and editing
    # Thin entry points; `keras_diffusion.applications` turns the requests
    # into pipeline runs.
    def denoise(self, images, sigma=None, steps=10, labels=None, guidance_scale=1.0, batch_size=None,
                prompts=None, negative_prompts=None):
        """Remove additive Gaussian noise of std `sigma` from `images`.

        Arguments, return value and details: `keras_diffusion.applications.denoise`.
        """
        from keras_diffusion import applications

        return applications.denoise(self, images, sigma=sigma, steps=steps, labels=labels,
                                    prompts=prompts, negative_prompts=negative_prompts,
                                    guidance_scale=guidance_scale, batch_size=batch_size)

    def inpaint(self, images, mask, steps=50, jump_length=5, resamples=4, eta=1.0, seed=None,
                labels=None, guidance_scale=1.0, batch_size=None, prompts=None,
                negative_prompts=None):
        """Fill in the pixels of `images` where `mask` is 0, by RePaint
        (Lugmayr 2022): sampling with the known pixels renoised from the
        image at every step, and `resamples - 1` jumps back of `jump_length`
        steps after every `jump_length` steps to harmonise the two regions.

        Arguments, return value and details: `keras_diffusion.applications.inpaint`.
        """
        from keras_diffusion import applications

        return applications.inpaint(
            self, images, mask, steps=steps, jump_length=jump_length, resamples=resamples,
            eta=eta, seed=seed, labels=labels, prompts=prompts, negative_prompts=negative_prompts,
            guidance_scale=guidance_scale, batch_size=batch_size,
        )

    def img2img(self, images, strength=0.5, steps=50, eta=0.0, seed=None, labels=None,
                guidance_scale=1.0, batch_size=None, prompts=None, negative_prompts=None):
        """Image-to-image translation by SDEdit (Meng 2022): noise `images`
        to timestep `round(strength * (T - 1))`, then run DDIM back to t = 0.

        Arguments, return value and details: `keras_diffusion.applications.img2img`.
        """
        from keras_diffusion import applications

        return applications.img2img(
            self, images, strength=strength, steps=steps, eta=eta, seed=seed, labels=labels,
            prompts=prompts, negative_prompts=negative_prompts, guidance_scale=guidance_scale,
            batch_size=batch_size,
        )

    def interpolate(self, a, b, num=8, steps=50, labels=None, guidance_scale=1.0, batch_size=None,
                    prompts=None, negative_prompts=None):
        """`num` images along a spherical interpolation between two noises,
        each decoded by deterministic DDIM.

        Arguments, return value and details: `keras_diffusion.applications.interpolate`.
        """
        from keras_diffusion import applications

        return applications.interpolate(self, a, b, num=num, steps=steps, labels=labels,
                                        prompts=prompts, negative_prompts=negative_prompts,
                                        guidance_scale=guidance_scale, batch_size=batch_size)

    # --------------------------------------------------------------- export
    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               **kwargs):
        """Export for serving (see `keras_diffusion.export`).

        `format="tf_saved_model"` writes a TensorFlow SavedModel with the
        endpoints `generate(noise)`, `denoise(images, sigma)` and
        `predict_noise(x_t, t)` (and `generate_conditional(noise, labels,
        guidance)` for a class-conditional model), which
        `tf.saved_model.load` serves without keras_diffusion. Keyword
        arguments `steps`, `sampler`, `eta`, `timestep_spacing` and
        `denoise_steps` fix the sampling loop. Under PyTorch the export runs
        in a subprocess with the TensorFlow backend. `format="onnx"` writes
        `predict_noise` only.

        Example:

        >>> model.export("exported", steps=25)
        >>> images = tf.saved_model.load("exported").generate(tf.random.normal((4, 28, 28, 1)))
        """
        from keras_diffusion.export import export_model

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
            **(self._text_config() if self.prompted else {}),
        }

    def _text_config(self):
        config = {
            "text_encoder": keras.saving.serialize_keras_object(self.text_encoder),
            "train_text_encoder": self.train_text_encoder,
            "prompt_dropout": self.prompt_dropout,
        }
        if self._own_tokenizer:
            if not hasattr(self.tokenizer, "get_config"):
                raise ValueError(
                    f"the model's tokenizer ({type(self.tokenizer).__name__}) cannot be saved: it "
                    "is not Keras-serialisable. Save the weights with save_weights and rebuild the "
                    "model with the same tokenizer to load them, or use a WordTokenizer."
                )
            config["tokenizer"] = keras.saving.serialize_keras_object(self.tokenizer)
        return config

    def compile_from_config(self, config):
        """Compile a loaded model as it was saved, except `jit_compile`.

        Keras saves `jit_compile` as the saving backend resolved "auto":
        False on TensorFlow's CPU and on PyTorch, True on JAX. Kept, a model
        saved under TensorFlow would train op by op under JAX (one small XLA
        compilation per operation: 740 of them, 48 s, for the first step of
        a tiny UNet), and a JAX file would start `torch.compile` under
        PyTorch. Whether to compile is the loading backend's choice, so
        it resolves "auto" again."""
        super().compile_from_config(dict(config, jit_compile="auto"))

    @classmethod
    def from_preset(cls, preset, precision=None):
        """A trained model by preset name, as KerasHub's `from_preset`:
        `DiffusionModel.from_preset("mnist_conditional")`. Takes whatever
        `load_model` takes (an `hf://` path, a `.keras` file) and checks the
        model is a `cls`; `keras-diffusion presets` lists the names."""
        model = load_model(preset, precision=precision)
        if not isinstance(model, cls):
            raise ValueError(f"{preset} holds a {type(model).__name__}, not a {cls.__name__}.")
        return model

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        for name in ("text_encoder", "tokenizer"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def _copy_of(variable):
    """An initializer that returns a float32 NumPy copy of `variable`."""
    return lambda shape, dtype=None: ops.convert_to_numpy(variable).astype("float32")


def check_model_arguments(*, prediction, ema_decay, min_snr_gamma, label_dropout,
                          prompt_dropout=0.1, train_text_encoder=True):
    """The rules of `DiffusionModel`'s training arguments (the config's
    `model` section is checked by them too)."""
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


def load_model(source, precision=None, config=None):
    """Load a trained `DiffusionModel`, on any backend, from `source`:

    - a `.keras` file written by `model.save` or `keras-diffusion train`;
    - the name of a preset shipped with the package (`keras-diffusion
      presets` lists them), e.g. "mnist_conditional";
    - `hf://OWNER/NAME`, a Hugging Face Hub repository written by
      `keras-diffusion push` (needs `huggingface_hub`; cached after the
      first download);
    - a folder holding an unzipped Keras model (what a Hub repository is);
    - a Stable Diffusion 1.x / 2.x checkpoint: a diffusers pipeline folder
      (`model_index.json`), an `hf://` repository holding one, or one
      original-layout file (`.safetensors`; `.ckpt` only where it can be
      read without running code), which `config` (a diffusers folder of
      the same model, weights not needed) describes; None takes the
      shipped SD 1.5 / 2.1 configuration of the file's family.

    The network computes in the global dtype policy (float32 unless set),
    whatever precision it was trained in: its weights are float32 either
    way. `precision` ("auto", "float32", "mixed_bfloat16",
    "mixed_float16") sets the policy for this model instead; "auto" is
    `mixed_bfloat16` on an accelerator with native bfloat16 and float32
    elsewhere (`keras_diffusion.precision.resolve`).

    Raises `FileNotFoundError` for a missing file, `OSError` when the Hub
    cannot be reached, and `ValueError` for a file that is not a readable
    Keras archive, holds another kind of model, or for an unknown
    `precision`.
    """
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
    checkpoint_file = os.path.isfile(path) and path.lower().endswith(
        (".safetensors", ".ckpt", ".bin", ".pt", ".pth"))
    if checkpoint_file or (os.path.isdir(path)
                           and not os.path.isfile(os.path.join(path, "config.json"))):
        # Not a Keras model: a Stable Diffusion checkpoint, or a clear error.
        from keras_diffusion.stable_diffusion import checkpoints

        policy = None if precision is None else precisions.resolve(precision, sampling=True)
        with precisions.policy_scope(policy):
            return checkpoints.load(path, config=config)
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
