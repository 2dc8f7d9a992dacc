"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): what the family adds to the
Stable Diffusion parts.

- Three text encoders (`SD3TextEncoders`): CLIP ViT-L and OpenCLIP ViT-bigG,
  both `CLIPTextModelWithProjection`s read at their penultimate layer
  without the final layer norm, their features side by side (768 + 1280)
  and zero-padded to T5's width (4096); then T5 v1.1 XXL's last hidden
  states after them along the sequence (77 + 256 tokens), or, without T5,
  zeros of its shape, as diffusers' pipeline does. The pooled prompt is
  the two CLIP encoders' projected pooled outputs side by side (2048).
- Three tokenizers (`SD3Tokenizer`): each text's CLIP-L ids, CLIP-G ids and
  (with T5) T5 ids in one row, so a prompt stays one row of ids through the
  sampling pipeline.
- The MMDiT (`keras_diffusion.stable_diffusion.mmdit`) takes the pooled
  prompt after the context (`StableDiffusion3.added_conditions`); the VAE
  has 16 latent channels and a `shift_factor`; the schedule is a
  `FlowMatchSchedule` (shift 3.0), whose sampler names keep their meaning.
"""

import warnings
from pathlib import Path

import keras
from keras import ops

from keras_diffusion import conditioning
from keras_diffusion.model import check_model_arguments
from keras_diffusion.schedule import WEIGHTING_SCHEMES
from keras_diffusion.schedule import FlowMatchSchedule
from keras_diffusion.stable_diffusion import checkpoints
from keras_diffusion.stable_diffusion import diffusers_folder
from keras_diffusion.stable_diffusion import lora
from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
from keras_diffusion.stable_diffusion.clip import text_model_state_dict
from keras_diffusion.stable_diffusion.mmdit import SD3Transformer
from keras_diffusion.stable_diffusion.model import StableDiffusion
from keras_diffusion.stable_diffusion.t5 import DEFAULTS as T5_DEFAULTS
from keras_diffusion.stable_diffusion.t5 import T5Encoder
from keras_diffusion.stable_diffusion.t5 import T5Tokenizer
from keras_diffusion.stable_diffusion.t5 import t5_encoder_state_dict
from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer
from keras_diffusion.stable_diffusion.vae import StableDiffusionVAE

# Each text encoder of an SD 3 folder, by what it is.
ENCODERS = {"text_encoder": "CLIP ViT-L with projection",
            "text_encoder_2": "OpenCLIP ViT-bigG with projection",
            "text_encoder_3": "T5 v1.1 XXL"}
T5_LENGTH = 256  # diffusers' max_sequence_length

# FlowMatchEulerDiscreteScheduler's config keys -> FlowMatchSchedule's.
_SCHEDULER_KEYS = {"num_train_timesteps": "timesteps", "shift": "shift",
                   "use_dynamic_shifting": "use_dynamic_shifting", "base_shift": "base_shift",
                   "max_shift": "max_shift", "base_image_seq_len": "base_image_seq_len",
                   "max_image_seq_len": "max_image_seq_len", "time_shift_type": "time_shift_type",
                   "shift_terminal": "shift_terminal",
                   "stochastic_sampling": "stochastic_sampling"}
# Options that change the sigmas in ways FlowMatchSchedule does not, and the
# value that leaves them alone.
_SCHEDULER_NEUTRAL = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                      "use_beta_sigmas": False, "invert_sigmas": False}
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# How diffusers' SD 3 training scripts train unless told otherwise
# (`--weighting_scheme logit_normal`, `--precondition_outputs 1`): the
# schedule an SD 3 folder makes trains so.
TRAINING_DEFAULTS = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                     "mode_scale": 1.29, "precondition_outputs": True}


def schedule_from_config(config):
    """A `FlowMatchSchedule` from a diffusers flow-matching scheduler config
    (`scheduler/scheduler_config.json` of an SD 3 folder), training as
    diffusers' SD 3 scripts do by default (`TRAINING_DEFAULTS`)."""
    name = config.get("_class_name", SCHEDULERS[0])
    if name not in SCHEDULERS:
        raise ValueError(f"an SD 3 scheduler must be one of {', '.join(SCHEDULERS)}; got "
                         f"{name!r}.")
    for key, neutral in _SCHEDULER_NEUTRAL.items():
        if config.get(key, neutral) not in (neutral, None):
            raise ValueError(f"scheduler option {key}={config[key]!r} is not supported; "
                             f"supported: {key}={neutral}.")
    schedule = FlowMatchSchedule(**{ours: config[key] for key, ours in _SCHEDULER_KEYS.items()
                                    if config.get(key) is not None})
    schedule.set_training(**training_settings(**TRAINING_DEFAULTS))
    return schedule


def training_settings(weighting_scheme, logit_mean, logit_std, mode_scale, precondition_outputs):
    """`FlowMatchSchedule.set_training`'s arguments for the options of
    diffusers' SD 3 scripts (`WEIGHTING_SCHEMES`: one scheme is a density
    or a loss weighting)."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}; got "
                         f"{weighting_scheme!r}.")
    density, weighting = WEIGHTING_SCHEMES[weighting_scheme]
    return dict(density=density, weighting=weighting, logit_mean=logit_mean, logit_std=logit_std,
                mode_scale=mode_scale, precondition_outputs=precondition_outputs)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3Tokenizer")
class SD3Tokenizer:
    """Texts to int32 ids `(N, L1 + L2 [+ L3])`: each text's ids by the
    CLIP-L tokenizer, the CLIP-G tokenizer, and (when there is one) the T5
    tokenizer, side by side.

    Args:
        first, second: `CLIPTokenizer`s (77 ids each).
        third: the T5 tokenizer (`max_length` ids, 256 in SD 3's pipeline),
            or None for a model without T5.
    """

    def __init__(self, first, second, third=None):
        self.first, self.second, self.third = first, second, third
        self.lengths = tuple(t.max_length for t in self.tokenizers)
        self.max_length = sum(self.lengths)

    @property
    def tokenizers(self):
        return [t for t in (self.first, self.second, self.third) if t is not None]

    def __call__(self, texts):
        import numpy as np

        return np.concatenate([np.asarray(t(texts)) for t in self.tokenizers],
                              axis=1).astype("int32")

    def get_config(self):
        return {key: None if value is None else keras.saving.serialize_keras_object(value)
                for key, value in (("first", self.first), ("second", self.second),
                                   ("third", self.third))}

    @classmethod
    def from_config(cls, config):
        return cls(*(None if config.get(key) is None
                     else keras.saving.deserialize_keras_object(config[key])
                     for key in ("first", "second", "third")))


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SD3TextEncoders")
class SD3TextEncoders(keras.Model):
    """SD 3's text encoders as one: ids (`SD3Tokenizer`'s) to
    `{"sequence_output": (B, 77 + t5_length, joint_dim), "pooled_output":
    (B, P1 + P2)}`.

    Args:
        first, second: `CLIPTextTransformer`s with a projection, read at
            their penultimate layer (`skip_layers=1, final_layer_norm=False`);
            each returns `(features, pooled)`.
        third: T5's encoder (ids `(B, t5_length)` to `(B, t5_length,
            joint_dim)`), or None: zeros of that shape stand for it.
        joint_dim: the width of the context (the MMDiT's
            `joint_attention_dim`, T5's `d_model`: 4096); the CLIP features
            are zero-padded to it.
        t5_length: T5's number of tokens (diffusers' `max_sequence_length`).
    """

    def __init__(self, first, second, third=None, joint_dim=4096, t5_length=256, **kwargs):
        super().__init__(**kwargs)
        for name, encoder in (("first", first), ("second", second)):
            if encoder.projection_dim is None:
                raise ValueError(f"SD 3's {name} CLIP text encoder must have a projection "
                                 "(CLIPTextModelWithProjection); it has none.")
        clip_width = first.hidden_size + second.hidden_size
        if clip_width > joint_dim:
            raise ValueError(f"the CLIP features ({clip_width} wide) are wider than the joint "
                             f"context ({joint_dim}); SD 3 pads them up to T5's width.")
        self.first, self.second, self.third = first, second, third
        self.joint_dim, self.t5_length = int(joint_dim), int(t5_length)
        self.clip_length = first.max_length
        self.max_length = self.clip_length
        self.tokenizer = None

    @property
    def output_dim(self):
        return self.joint_dim

    def call(self, ids, training=False):
        length = self.clip_length
        features_l, pooled_l = self.first(ids[:, :length])
        features_g, pooled_g = self.second(ids[:, length:2 * length])
        clip = ops.concatenate([ops.cast(features_l, "float32"),
                                ops.cast(features_g, "float32")], axis=-1)
        clip = ops.pad(clip, [[0, 0], [0, 0], [0, self.joint_dim - clip.shape[-1]]])
        if self.third is None:
            t5 = ops.zeros((ops.shape(ids)[0], self.t5_length, self.joint_dim), "float32")
        else:
            t5 = ops.cast(self.third(ids[:, 2 * length:]), "float32")
        pooled = ops.concatenate([ops.cast(pooled_l, "float32"), ops.cast(pooled_g, "float32")],
                                 axis=-1)
        return {"sequence_output": ops.concatenate([clip, t5], axis=1), "pooled_output": pooled}

    def get_config(self):
        return {"name": self.name, "joint_dim": self.joint_dim, "t5_length": self.t5_length,
                **{key: None if part is None else keras.saving.serialize_keras_object(part)
                   for key, part in (("first", self.first), ("second", self.second),
                                     ("third", self.third))}}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        parts = [None if config.get(key) is None
                 else keras.saving.deserialize_keras_object(config[key])
                 for key in ("first", "second", "third")]
        for key in ("first", "second", "third"):
            config.pop(key, None)
        return cls(*parts, **config)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="StableDiffusion3")
class StableDiffusion3(StableDiffusion):
    """A Stable Diffusion 3 / 3.5 model; build one with
    `keras_diffusion.load_model(folder)`.

    A `StableDiffusion` whose network is the MMDiT (`SD3Transformer`),
    whose schedule is a `FlowMatchSchedule` (the network predicts the
    flow's velocity) and whose text encoders are `SD3TextEncoders`:
    `generate`, guidance with negative prompts, the samplers (`"euler"` is
    diffusers' `FlowMatchEulerDiscreteScheduler`), `img2img` and `save` /
    `load_model` are the Stable Diffusion model's. The MMDiT takes the
    pooled prompt after the context (`added_conditions`), in sampling and
    in training.

    It fine-tunes with `fit` as diffusers' `train_dreambooth_sd3.py` and
    `train_dreambooth_lora_sd3.py` train: the flow objective with the
    sigmas drawn from the scheduler's shifted table, `configure_fine_tuning`
    for those scripts' options (by default theirs: logit-normal sigmas,
    preconditioned outputs); the whole transformer, or after `enable_lora`
    LoRA on its attention (and with `text_encoder=True` on both CLIP
    encoders; T5 stays frozen, as in the scripts). LoRA files name the
    parts `transformer`, `text_encoder`, `text_encoder_2`, as
    `StableDiffusion3Pipeline.save_lora_weights` writes them and
    `load_lora_weights` reads them; `save_diffusers` writes a
    `StableDiffusion3Pipeline` folder.

    >>> sd3.enable_lora(rank=8, text_encoder=True)
    >>> sd3.compile(optimizer=keras.optimizers.AdamW(1e-4, clipnorm=1.0))
    >>> sd3.fit(sd3.encode_latents(images), captions, batch_size=1, epochs=10)
    >>> sd3.save_lora_weights("my_lora/")
    """

    lora_family = "SD 3"  # named when a LoRA file does not fit

    def added_conditions(self, x, pooled, negative=False):
        """The MMDiT's input after the context: the pooled prompt."""
        return [pooled]

    @staticmethod
    def img2img_start(num_steps, strength):
        """Where `img2img` begins in a plan of `num_steps`, as diffusers' SD 3
        img2img pipeline counts: after `int(num_steps - num_steps *
        strength)` steps (SD's pipelines round the steps run down instead:
        at 5 steps and strength 0.55, SD 3 runs 3, SDXL 2)."""
        return int(max(num_steps - num_steps * strength, 0))

    def training_conditions(self, labels, x0, training=True):
        """The MMDiT's inputs after `[x_t, t]` in a training step: the
        captions' features and pooled output (with prompt dropout)."""
        features, pooled = conditioning.encode_prompts(self, labels, training=training,
                                                       pooled=True)
        return [features, pooled]

    def configure_fine_tuning(self, weighting_scheme="logit_normal", logit_mean=0.0,
                              logit_std=1.0, mode_scale=1.29, precondition_outputs=True,
                              prompt_dropout=0.0):
        """Set the training options of diffusers' SD 3 scripts, each call all
        of them (their defaults are the scripts'): `weighting_scheme`
        `"logit_normal"` (sigmas from a logit-normal of `logit_mean`,
        `logit_std`), `"mode"` (`mode_scale`) or `"uniform"`, each example
        weighted alike, or `"sigma_sqrt"` / `"cosmap"`, uniform sigmas and
        that loss weighting (`keras_diffusion.schedule.WEIGHTING_SCHEMES`);
        `precondition_outputs`, the output read as x0 = x_t - sigma v and
        regressed on x0 (see `FlowMatchSchedule`); `prompt_dropout`, the
        share of captions replaced by the empty prompt. A refused option
        changes nothing; a train function traced before is traced again."""
        settings = training_settings(weighting_scheme, logit_mean, logit_std, mode_scale,
                                     precondition_outputs)
        check_model_arguments(prediction=self.prediction, ema_decay=self.ema_decay,
                              min_snr_gamma=None, label_dropout=self.label_dropout,
                              prompt_dropout=prompt_dropout, flow=True)
        self.schedule.set_training(**settings)
        self.prompt_dropout = float(prompt_dropout)
        self.train_function = None

    # ------------------------------------------------------------------ LoRA
    def lora_parts(self):
        """The parts a LoRA file names, by its names for them: the MMDiT and
        the two CLIP encoders (diffusers loads no LoRA into T5)."""
        return {"transformer": self.network, "text_encoder": self.text_encoder.first,
                "text_encoder_2": self.text_encoder.second}

    def enable_lora(self, rank=8, alpha=None, targets=lora.SD3_TARGETS, text_encoder=False,
                    seed=None):
        """`StableDiffusion.enable_lora` on the MMDiT: by default on the
        joint attention's projections of the image and the context
        (`lora.SD3_TARGETS`, what `train_dreambooth_lora_sd3.py` trains;
        `lora.SD3_IMAGE_TARGETS` the image's alone, or any module-path
        suffixes, as its `--lora_layers`), and with `text_encoder=True` on
        both CLIP encoders' attention projections (its `--train_text_encoder`)."""
        lora.enable_lora(self, rank=rank, alpha=alpha, targets=targets,
                         text_encoder=text_encoder, seed=seed)

    # ------------------------------------------------------------- diffusers
    def save_diffusers(self, path, overwrite=False):
        """Write the model as a diffusers `StableDiffusion3Pipeline` folder
        (`write_folder`), which `from_pretrained` loads to the same images;
        LoRA layers are written merged. Nothing is left half-written on
        failure; an existing `path` is replaced only with `overwrite`.
        Returns the path."""
        return diffusers_folder.save_diffusers(self, path, overwrite=overwrite,
                                               write=write_folder)


# ------------------------------------------------------------------ loading
def _check_folder(folder, parts):
    for part in parts:
        if not (folder / part / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no {part}/ ({ENCODERS.get(part, part)}): an SD 3 folder holds "
                "transformer/, vae/, text_encoder/ and text_encoder_2/ (the CLIP encoders) and, "
                "optionally, text_encoder_3/ (T5), each with its config.json.")


def load_folder(folder, dtype="float32"):
    """A `StableDiffusion3` from a diffusers `StableDiffusion3Pipeline`
    folder, its weights in `dtype`. Without T5 (`text_encoder_3` null in
    `model_index.json`, as diffusers saves a pipeline loaded with
    `text_encoder_3=None`), zeros stand for its features."""
    folder = Path(folder)
    index = checkpoints.read_json(folder / "model_index.json")
    parts = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    if checkpoints.listed(index, "text_encoder_3"):
        parts.append("text_encoder_3")
    _check_folder(folder, parts)
    configs = {part: checkpoints.read_json(folder / part / "config.json") for part in parts}
    states = {part: checkpoints.component_weights(folder / part, half=dtype != "float32")
              for part in parts}
    tokenizers = [CLIPTokenizer.from_folder(folder / name) for name in ("tokenizer", "tokenizer_2")]
    if "text_encoder_3" in parts:
        tokenizers.append(T5Tokenizer.from_folder(folder / "tokenizer_3", max_length=T5_LENGTH))
    return _assemble(configs, states, tokenizers,
                     checkpoints.read_json(folder / "scheduler" / "scheduler_config.json"), dtype)


def _assemble(configs, states, tokenizers, scheduler_config, dtype):
    """A `StableDiffusion3` from its parts' configs and diffusers /
    transformers state dicts (`"transformer"`, `"vae"`, `"text_encoder"`,
    `"text_encoder_2"` and, for T5, `"text_encoder_3"`), its tokenizers
    (CLIP-L's, CLIP-G's and, with T5, T5's) and its scheduler config."""
    transformer = checkpoints.build_part("transformer", SD3Transformer, "transformer",
                                         states["transformer"], configs["transformer"], dtype)
    vae = checkpoints.build_part("vae", StableDiffusionVAE, "VAE", states["vae"],
                                 configs["vae"], dtype)
    clip = [checkpoints.build_part(part, CLIPTextTransformer, ENCODERS[part],
                                   text_model_state_dict(states[part]), configs[part], dtype,
                                   skip_layers=1, final_layer_norm=False)
            for part in ("text_encoder", "text_encoder_2")]
    t5 = None
    if "text_encoder_3" in states:
        t5 = checkpoints.build_part("text_encoder_3", T5Encoder, ENCODERS["text_encoder_3"],
                                    t5_encoder_state_dict(states["text_encoder_3"]),
                                    configs["text_encoder_3"], dtype)
    encoders = SD3TextEncoders(*clip, t5, joint_dim=transformer.context_dim, t5_length=T5_LENGTH,
                               name="text_encoders")
    side = int(configs["transformer"].get("sample_size", 128)) * vae.factor
    return StableDiffusion3(
        vae, transformer, schedule_from_config(scheduler_config), prediction="flow",
        ema_decay=None, text_encoder=encoders, tokenizer=SD3Tokenizer(*tokenizers),
        train_text_encoder=False, image_size=(side, side), name="stable_diffusion_3")


# ------------------------------------------------------------- single files
SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# CLIP's shipped tokenizers (`CLIPTokenizer.shipped`) for a config folder
# without tokenizer folders: CLIP-L pads with `<|endoftext|>`, CLIP-G with
# `!`, as SDXL's pair does.
SHIPPED_TOKENIZERS = {"text_encoder": ("tokenizer", "sd1"),
                      "text_encoder_2": ("tokenizer_2", "sd2")}


def load_single_file(state, family, folder, dtype="float32"):
    """A `StableDiffusion3` from one file in Stability's layout (`state`:
    its `{key: array}`, of the `single_file` family `family`), described by
    the diffusers SD 3 folder `folder` (given, or the shipped one).

    What the file lacks comes from the folder, as diffusers'
    `from_single_file` takes it from its config repository: a text encoder
    from the folder's weights, the tokenizers from `tokenizer*/` (CLIP's
    ship with the package; T5's does not). Without CLIP-L or CLIP-G
    weights in either, one `ValueError` names the encoder; T5 weights
    without `tokenizer_3/` raise one too. Without T5 weights in either, the
    model runs without T5 (zeros for its features, as diffusers' pipeline
    with `text_encoder_3=None`), with one warning where the folder
    describes a T5."""
    folder, entry = Path(folder), single_file.FAMILIES[family]
    index = checkpoints.read_json(folder / "model_index.json")
    if index.get("_class_name") not in checkpoints.SD3_PIPELINES:
        described = index.get("_class_name") or "pipeline"
        raise ValueError(f"the file is a {entry['name']} checkpoint, but config {folder} describes "
                         f"a {described}; pass the config folder of an SD 3 model, or none for "
                         f"the shipped {family} configuration.")
    held = single_file.parts_held(family, state)
    t5_listed = checkpoints.listed(index, "text_encoder_3")
    parts = list(SD3_PARTS) + (["text_encoder_3"] if t5_listed or "text_encoder_3" in held else [])
    _check_folder(folder, parts)
    configs = {part: checkpoints.read_json(folder / part / "config.json") for part in parts}
    states = {part: _folder_weights(folder, part, entry, t5_listed, dtype)
              for part in parts if part not in held}
    states = {part: state for part, state in states.items() if state is not None}
    tokenizers = [CLIPTokenizer.from_folder(folder / name) if (folder / name).is_dir()
                  else CLIPTokenizer.shipped(shipped)
                  for name, shipped in SHIPPED_TOKENIZERS.values()]
    if "text_encoder_3" in held or "text_encoder_3" in states:
        if not (folder / "tokenizer_3").is_dir():
            raise ValueError(
                f"the model has T5 weights but config {folder} no T5 tokenizer (tokenizer_3/), "
                "which does not ship with keras_diffusion: pass config=<a diffusers SD 3 folder "
                "with tokenizer_3/> (its configs and tokenizers; weights are not needed).")
        tokenizers.append(T5Tokenizer.from_folder(folder / "tokenizer_3", max_length=T5_LENGTH))
    states.update(single_file.to_diffusers(
        state, **{single_file.CONFIG_ARGUMENTS[part]: configs[part] for part in held}))
    configs = {part: configs[part] for part in states}
    return _assemble(configs, states, tokenizers,
                     checkpoints.read_json(folder / "scheduler" / "scheduler_config.json"), dtype)


def _folder_weights(folder, part, entry, t5_listed, dtype):
    """The weights of `part` in the config folder, for a file without it:
    one `ValueError` for a CLIP encoder found in neither; for T5, None
    (and a warning where the folder describes one)."""
    try:
        return checkpoints.component_weights(folder / part, half=dtype != "float32")
    except FileNotFoundError:
        prefix, name, architecture = entry["parts"][part]
        if part != "text_encoder_3":
            raise ValueError(
                f"the file has no {name} ({prefix}*, {architecture}) and config {folder} no "
                f"weights for it ({part}/): pass config=<a diffusers SD 3 folder holding the "
                "text encoders' weights>.") from None
        if t5_listed:
            warnings.warn(f"the file has no T5 ({prefix}*) and config {folder} no weights for it "
                          "(text_encoder_3/): the model runs without T5, zeros standing for its "
                          "features.", stacklevel=4)
        return None


# ------------------------------------------------------------------ writing
# model_index.json of a StableDiffusion3Pipeline: each component's library and class.
PIPELINE_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", SCHEDULERS[0]],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
}


def scheduler_config(schedule):
    """The `FlowMatchEulerDiscreteScheduler` config of `schedule`'s sampling
    sigmas, which `schedule_from_config` reads back (its training settings
    are ours alone: diffusers' scheduler has none)."""
    return {"_class_name": SCHEDULERS[0], **_SCHEDULER_NEUTRAL,
            **{key: getattr(schedule, ours) for key, ours in _SCHEDULER_KEYS.items()}}


def t5_config(encoder):
    """transformers' config of a `T5EncoderModel` computing as `encoder`."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5",
            **{key: getattr(encoder, key) for key in T5_DEFAULTS},
            "is_encoder_decoder": False, "use_cache": False, "dtype": "float32"}


def write_folder(model, folder):
    """Write the `StableDiffusion3` `model` into the existing, empty
    `folder` as diffusers saves a `StableDiffusion3Pipeline`: the
    transformer's and the VAE's (shift factor included) diffusers configs
    and float32 weights, both CLIP encoders whole with their projections
    (the pipeline reads their penultimate layers itself), T5 whole or
    `text_encoder_3` null without it, the three tokenizers, and the
    schedule's scheduler config."""
    folder = Path(folder)
    encoders, tokenizers = model.text_encoder, model.tokenizer
    index = dict(PIPELINE_INDEX)
    if encoders.third is None:
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    diffusers_folder.write_json(folder / "model_index.json", index)
    side = model.image_shape[0] // model.autoencoder.factor
    diffusers_folder.write_component(
        folder, "transformer",
        {"_class_name": index["transformer"][1], **model.network.config, "sample_size": side},
        diffusers_folder.state_dict(model.network))
    diffusers_folder.write_component(folder, "vae", diffusers_folder.vae_config(model),
                                     diffusers_folder.state_dict(model.autoencoder))
    for part, encoder, tokenizer in (("text_encoder", encoders.first, tokenizers.first),
                                     ("text_encoder_2", encoders.second, tokenizers.second)):
        diffusers_folder.write_text_encoder(folder, part, encoder, tokenizer, whole=True)
    if encoders.third is not None:
        diffusers_folder.write_component(folder, "text_encoder_3", t5_config(encoders.third),
                                         diffusers_folder.state_dict(encoders.third),
                                         diffusers_folder.WEIGHT_FILES["text_encoder"])
        tokenizers.third.save_folder(folder / "tokenizer_3")
    diffusers_folder.write_json(folder / "scheduler" / "scheduler_config.json",
                                scheduler_config(model.schedule))
