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

from pathlib import Path

import keras
from keras import ops

from keras_diffusion import conditioning
from keras_diffusion.schedule import FlowMatchSchedule
from keras_diffusion.stable_diffusion import checkpoints
from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
from keras_diffusion.stable_diffusion.clip import text_model_state_dict
from keras_diffusion.stable_diffusion.mmdit import SD3Transformer
from keras_diffusion.stable_diffusion.model import StableDiffusion
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


def schedule_from_config(config):
    """A `FlowMatchSchedule` from a diffusers flow-matching scheduler config
    (`scheduler/scheduler_config.json` of an SD 3 folder)."""
    name = config.get("_class_name", SCHEDULERS[0])
    if name not in SCHEDULERS:
        raise ValueError(f"an SD 3 scheduler must be one of {', '.join(SCHEDULERS)}; got "
                         f"{name!r}.")
    for key, neutral in _SCHEDULER_NEUTRAL.items():
        if config.get(key, neutral) not in (neutral, None):
            raise ValueError(f"scheduler option {key}={config[key]!r} is not supported; "
                             f"supported: {key}={neutral}.")
    return FlowMatchSchedule(**{ours: config[key] for key, ours in _SCHEDULER_KEYS.items()
                                if config.get(key) is not None})


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
    """

    def added_conditions(self, x, pooled, negative=False):
        """The MMDiT's input after the context: the pooled prompt."""
        return [pooled]

    def training_conditions(self, labels, x0, training=True):
        """The MMDiT's inputs after `[x_t, t]` in a training step: the
        captions' features and pooled output (with prompt dropout)."""
        features, pooled = conditioning.encode_prompts(self, labels, training=training,
                                                       pooled=True)
        return [features, pooled]


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
    transformer = checkpoints.build_part("transformer", SD3Transformer, "transformer",
                                         states["transformer"], configs["transformer"], dtype)
    vae = checkpoints.build_part("vae", StableDiffusionVAE, "VAE", states["vae"],
                                 configs["vae"], dtype)
    clip = [checkpoints.build_part(part, CLIPTextTransformer, ENCODERS[part],
                                   text_model_state_dict(states[part]), configs[part], dtype,
                                   skip_layers=1, final_layer_norm=False)
            for part in ("text_encoder", "text_encoder_2")]
    tokenizers = [CLIPTokenizer.from_folder(folder / name) for name in ("tokenizer", "tokenizer_2")]
    t5 = None
    if "text_encoder_3" in parts:
        t5 = checkpoints.build_part("text_encoder_3", T5Encoder, ENCODERS["text_encoder_3"],
                                    t5_encoder_state_dict(states["text_encoder_3"]),
                                    configs["text_encoder_3"], dtype)
        tokenizers.append(T5Tokenizer.from_folder(folder / "tokenizer_3", max_length=T5_LENGTH))
    encoders = SD3TextEncoders(*clip, t5, joint_dim=transformer.context_dim, t5_length=T5_LENGTH,
                               name="text_encoders")
    schedule = schedule_from_config(
        checkpoints.read_json(folder / "scheduler" / "scheduler_config.json"))
    side = int(configs["transformer"].get("sample_size", 128)) * vae.factor
    return StableDiffusion3(
        vae, transformer, schedule, prediction="flow", ema_decay=None, text_encoder=encoders,
        tokenizer=SD3Tokenizer(*tokenizers), train_text_encoder=False, image_size=(side, side),
        name="stable_diffusion_3")
