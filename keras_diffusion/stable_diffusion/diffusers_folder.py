"""A `StableDiffusion` model written back as a diffusers pipeline folder,
which `StableDiffusionPipeline.from_pretrained` loads to the same images (an
SDXL model as a `StableDiffusionXLPipeline`, its refiner as a
`StableDiffusionXLImg2ImgPipeline`, each text encoder whole, as SDXL's
pipelines read their penultimate layers themselves). A family with a
pipeline of its own writes its folder with the helpers here (SD 3:
`sd3.write_folder`), through the same `save_diffusers`.

The folder is what diffusers' `save_pretrained` writes: `model_index.json`,
and per component a config and float32 safetensors weights in the reference
layout (`weights.checkpoint_table`, the table the loader reads through):
the UNet's and VAE's configs are their reference configs, the text
encoder's a transformers `CLIPTextConfig`, the tokenizer's files
`CLIPTokenizer.save_folder` writes, and a `DDIMScheduler` config whose
`checkpoints.schedule_from_config` is the model's schedule. LoRA layers
are written merged into their kernels (the weights the model computes
with). Everything is written to a temporary folder beside the target and
renamed into place, so a failure leaves nothing half-written.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from keras_diffusion.stable_diffusion import checkpoints
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.clip import PREFIX as TEXT_PREFIX

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
# Our beta schedules -> diffusers' names (checkpoints reads the other way).
_BETA_SCHEDULES = {ours: theirs for theirs, ours in checkpoints._BETA_SCHEDULES.items()}
_PREDICTIONS = {ours: theirs for theirs, ours in checkpoints._PREDICTIONS.items()}


# A part's weights as the reference state dict (float32), LoRA layers merged.
state_dict = weights.state_dict


# ---------------------------------------------------------------- configs
def unet_config(model):
    side = model.image_shape[0] // model.autoencoder.factor
    return {"_class_name": "UNet2DConditionModel", **model.network.config, "sample_size": side}


def vae_config(model):
    config = model.autoencoder.get_config()
    config.pop("name", None)
    config.pop("weights_dtype", None)  # ours: diffusers keeps the dtype in the weights
    return {"_class_name": "AutoencoderKL", **config, "sample_size": model.image_shape[0]}


def _text_encoders(model):
    """`{folder: (encoder, tokenizer)}` of the model's text encoders, as
    the pipeline folder names them."""
    encoder, tokenizer = model.text_encoder, model.tokenizer
    if not _is_xl(model):
        return {"text_encoder": (encoder, tokenizer)}
    parts = {"text_encoder_2": (encoder.second, tokenizer.second)}
    if encoder.first is not None:
        parts["text_encoder"] = (encoder.first, tokenizer.first)
    return parts


def _is_xl(model):
    return hasattr(model, "added_conditions")


def text_encoder_config(encoder, tokenizer, whole=False):
    """transformers' `CLIPTextConfig` of a text encoder. One that skips its
    last `k` layers (diffusers' `clip_skip`) is the same function as one
    `k` layers shorter: that is the one written, unless `whole` (SDXL's,
    whose pipelines skip the layer themselves). With a projection, a
    `CLIPTextModelWithProjection`'s."""
    projection = encoder.projection_dim
    return {
        "architectures": ["CLIPTextModel" if projection is None
                          else "CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": encoder.vocab_size,
        "hidden_size": encoder.hidden_size,
        "intermediate_size": encoder.intermediate_size,
        "num_hidden_layers": encoder.num_hidden_layers - (0 if whole else encoder.skip_layers),
        "num_attention_heads": encoder.num_attention_heads,
        "max_position_embeddings": encoder.max_position_embeddings,
        "hidden_act": encoder.hidden_act,
        "layer_norm_eps": encoder.layer_norm_eps,
        "bos_token_id": int(tokenizer.bos_id),
        "eos_token_id": int(tokenizer.eos_id),
        "pad_token_id": int(tokenizer.pad_id),
        "projection_dim": encoder.hidden_size if projection is None else projection,
        "dtype": "float32",
    }


def text_encoder_state_dict(encoder, whole=False):
    """A text encoder's transformers state dict (keys under `text_model.`,
    as the Hub's files and every transformers version read them), the
    layers a `clip_skip` leaves unused left out unless `whole`."""
    used = encoder.num_hidden_layers - (0 if whole else encoder.skip_layers)
    unused = tuple(f"{TEXT_PREFIX}.encoder.layers.{index}."
                   for index in range(used, encoder.num_hidden_layers))
    return {key: value for key, value in state_dict(encoder).items()
            if not key.startswith(unused)}


def scheduler_config(model):
    """A `DDIMScheduler` config that `checkpoints.schedule_from_config`
    reads back to the model's schedule: the betas, prediction type and
    sampling defaults, and the timestep spacing only where the schedule's
    per-sampler spacings are not what a config without one gives."""
    schedule = model.schedule
    if schedule.beta_schedule not in _BETA_SCHEDULES:
        raise ValueError(
            f"the model's {schedule.beta_schedule!r} beta schedule has no diffusers equivalent; "
            f"save_diffusers writes {', '.join(_BETA_SCHEDULES)} schedules."
        )
    config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": schedule.timesteps,
        "beta_schedule": _BETA_SCHEDULES[schedule.beta_schedule],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "prediction_type": _PREDICTIONS[model.prediction],
        "steps_offset": schedule.steps_offset,
        "set_alpha_to_one": schedule.set_alpha_to_one,
        "clip_sample": False,  # DDIMScheduler's default clips x0 to [-1, 1]; latents are not
        "thresholding": False,
    }
    if schedule.use_karras_sigmas:
        config["use_karras_sigmas"] = True
    for spacing in (None, "linspace", "leading", "trailing"):
        candidate = dict(config, timestep_spacing=spacing) if spacing else config
        if checkpoints.schedule_from_config(candidate)[0].timestep_spacing == \
                schedule.timestep_spacing:
            return candidate
    raise ValueError(
        f"the model's timestep spacings {schedule.timestep_spacing!r} are not what one diffusers "
        "scheduler config gives; set one spacing for every sampler (timestep_spacing='leading', "
        "'linspace' or 'trailing') to save it as a diffusers folder."
    )


# ---------------------------------------------------------------- writing
def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(path, tensors):
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_component(folder, part, config, tensors, weight_file=WEIGHT_FILES["unet"]):
    """A pipeline component's `config.json` and safetensors weights in
    `folder / part`."""
    write_json(folder / part / "config.json", config)
    _write_weights(folder / part / weight_file, tensors)


def write_text_encoder(folder, part, encoder, tokenizer, whole):
    """A text encoder's transformers config and weights (`text_encoder_config`,
    `text_encoder_state_dict`) in `folder / part`, its tokenizer's files in
    the matching `tokenizer*/`."""
    write_component(folder, part, text_encoder_config(encoder, tokenizer, whole),
                    text_encoder_state_dict(encoder, whole), WEIGHT_FILES["text_encoder"])
    tokenizer.save_folder(folder / part.replace("text_encoder", "tokenizer"))


def model_index(model):
    """model_index.json: SD's, or SDXL's with its second encoder and
    tokenizer, its options, and (refiner) no first encoder."""
    if not _is_xl(model):
        return MODEL_INDEX
    refiner = model.requires_aesthetics_score
    index = {**MODEL_INDEX,
             "_class_name": ("StableDiffusionXLImg2ImgPipeline" if refiner
                             else "StableDiffusionXLPipeline"),
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt}
    for key in ("requires_safety_checker", "safety_checker"):
        del index[key]
    if refiner:
        index.update(requires_aesthetics_score=True, text_encoder=[None, None],
                     tokenizer=[None, None])
    return index


def write_folder(model, folder):
    """Write the pipeline's files into the existing, empty `folder`."""
    folder = Path(folder)
    write_json(folder / "model_index.json", model_index(model))
    write_component(folder, "unet", unet_config(model), state_dict(model.network))
    write_component(folder, "vae", vae_config(model), state_dict(model.autoencoder))
    for part, (encoder, tokenizer) in _text_encoders(model).items():
        write_text_encoder(folder, part, encoder, tokenizer, whole=_is_xl(model))
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(model))


def save_diffusers(model, path, overwrite=False, write=write_folder):
    """Write `model` as a diffusers `StableDiffusionPipeline` folder at
    `path` (or what `write(model, folder)` writes: a family's own pipeline
    folder), through a temporary folder beside it renamed into place. An
    existing `path` raises `FileExistsError` unless `overwrite`, which
    replaces it only once the new folder is complete. Returns the path."""
    path = Path(os.fspath(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save_diffusers writes a folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(model, temporary)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old",
                                        dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path
