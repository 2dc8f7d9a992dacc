"""Stable Diffusion checkpoints -> a `LatentDiffusionModel` holding our parts.

Two layouts are read:

- a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`,
  `text_encoder/`, `tokenizer/`, `scheduler/`), as `save_pretrained` writes
  it and the Hub serves it; weights in `*.safetensors` (sharded or not), or
  in PyTorch's `*.bin` where they can be read without running code;
- one original (CompVis / Stability) file, whose keys `single_file` renames
  to diffusers' and whose configurations come from a diffusers folder given
  as `config`, or from the shipped SD 1.5 / SD 2.1 ones.

The scheduler's config sets the model's `DiffusionSchedule`: its betas and
prediction type, and the sampling defaults diffusers derives from it
(`timestep_spacing` per scheduler class, `steps_offset`,
`set_alpha_to_one`), so `sampler="ddim"` runs `DDIMScheduler` and
`"dpmpp_2m"` `DPMSolverMultistepScheduler` as a diffusers pipeline built
from that config would.
"""

import json
import os
from pathlib import Path

import keras

from keras_diffusion import precision as precisions
from keras_diffusion import backend
from keras_diffusion import checkpoint_files
from keras_diffusion.schedule import DiffusionSchedule
from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
from keras_diffusion.stable_diffusion.clip import text_model_state_dict
from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer
from keras_diffusion.stable_diffusion.unet import StableDiffusionUNet
from keras_diffusion.stable_diffusion.vae import StableDiffusionVAE

XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                       *XL_PIPELINES, *SD3_PIPELINES)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")

# diffusers' scheduler config -> our names.
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# The timestep spacing of diffusers' scheduler class for each sampler of
# ours, where the config names none. diffusers' `Other.from_config(config)`
# (how its users pick a sampler) carries only the keys the file sets, so
# without one each scheduler keeps its own default: SD 1.5's file has none,
# and its DDIM runs "leading", its DPM-Solver++ "linspace".
_DEFAULT_SPACINGS = {"ddim": "leading", "ddpm": "leading", "euler": "linspace",
                     "heun": "linspace", "dpmpp_2m": "linspace", "dpmpp_2m_sde": "linspace"}
_SOLVERS = ("dpmpp_2m", "dpmpp_2m_sde")


# ------------------------------------------------------------- reading files
def is_pipeline_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def is_single_file(path):
    return os.path.isfile(path) and str(path).lower().endswith(SINGLE_FILE_SUFFIXES)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None


def _variants(half):
    """The weight-file variants to look for, in order: a half-precision
    model reads diffusers' `fp16` files first (half the bytes, no float32
    detour); either takes them where they are all there is."""
    return (".fp16", "") if half else ("", ".fp16")


def component_weights(folder, half=False):
    """The state dict of one component folder (`unet/`, `vae/`, ...): its
    safetensors file (or diffusers' `variant="fp16"` one), its shards, or
    a PyTorch `.bin`. Values keep the dtype of the file."""
    folder = Path(folder)
    for variant in _variants(half):
        for stem in ("diffusion_pytorch_model", "model"):
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if index.is_file():
                shards = sorted(set(read_json(index)["weight_map"].values()))
                return checkpoint_files.read_safetensors([folder / shard for shard in shards],
                                                    lazy=True, upcast_bfloat16=False)
            if (folder / f"{stem}{variant}.safetensors").is_file():
                return checkpoint_files.read_safetensors(folder / f"{stem}{variant}.safetensors",
                                                    lazy=True, upcast_bfloat16=False)
    for variant in _variants(half):
        for stem in ("diffusion_pytorch_model", "pytorch_model"):
            if (folder / f"{stem}{variant}.bin").is_file():
                return checkpoint_files.read_weights(folder / f"{stem}{variant}.bin",
                                                upcast_bfloat16=False)
    raise FileNotFoundError(
        f"{folder} holds no weights: expected diffusion_pytorch_model.safetensors or "
        "model.safetensors (or their fp16 variant, a sharded index, or a PyTorch .bin)."
    )


def check_pipeline_class(index, path):
    name = index.get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        unet_note = ""
        if name == "StableDiffusionInpaintPipeline":
            unet_note = " (an inpainting UNet with 9 input channels; inpaint with a plain SD model)"
        raise ValueError(
            f"{path} holds a {name}{unet_note}, which keras_diffusion does not load; supported: "
            f"{', '.join(SUPPORTED_PIPELINES)} (Stable Diffusion 1.x and 2.x; SDXL base and "
            "refiner; SD 3 / 3.5)."
        )


# ----------------------------------------------------------------- schedule
def schedule_from_config(config):
    """`(DiffusionSchedule, prediction)` from a diffusers scheduler config."""
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in _BETA_SCHEDULES:
        raise ValueError(f"scheduler beta_schedule {beta_schedule!r} is not supported; supported: "
                         f"{', '.join(_BETA_SCHEDULES)}.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not supported; supported: "
                         f"{', '.join(_PREDICTIONS)}.")
    for option, off in (("trained_betas", None), ("rescale_betas_zero_snr", False),
                        ("thresholding", False)):
        if config.get(option, off) not in (off, [], False):
            raise ValueError(f"scheduler option {option}={config[option]!r} is not supported.")
    spacing = config.get("timestep_spacing")
    if spacing not in (None, "linspace", "leading", "trailing"):
        raise ValueError(f"scheduler timestep_spacing {spacing!r} is not supported; supported: "
                         "linspace, leading, trailing.")
    spacings = {}
    for sampler, default in _DEFAULT_SPACINGS.items():
        chosen = spacing or default
        # The multistep solvers plan one step more and drop its end (see
        # keras_diffusion.schedule.TIMESTEP_SPACINGS).
        if sampler in _SOLVERS and chosen != "trailing":
            chosen = f"{chosen}_exclusive"
        spacings[sampler] = chosen
    schedule = DiffusionSchedule(
        _BETA_SCHEDULES[beta_schedule],
        timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        steps_offset=int(config.get("steps_offset", 0)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        timestep_spacing=spacings,
        use_karras_sigmas=bool(config.get("use_karras_sigmas", False)),
    )
    return schedule, _PREDICTIONS[prediction]


# ----------------------------------------------------------------- assembly
def check_dtype(dtype):
    if dtype is not None and dtype not in precisions.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(precisions.DTYPES)} or None "
                         f"(float32); got {dtype!r}.")
    return dtype or "float32"


def _part_dtype(part, dtype, config):
    """The dtype a part is built in: the model's, except a float16 VAE whose
    config asks for float32 (diffusers' `force_upcast`, on by default: SD's
    VAE overflows float16's range in its decoder)."""
    if part == "vae" and dtype == "float16" and config.get("force_upcast", True):
        return "float32"
    return dtype


def _build(parts_config, states, tokenizer, name, dtype="float32"):
    """The model from the components' reference configs and state dicts,
    its weights in `dtype` (Keras' dtype policy of that name: variables and
    computation in it; the timestep features, the last convolutions and the
    VAE's latent statistics stay float32)."""
    # By its registered name, not an import: the model class's module
    # imports this one's neighbours. Importing keras_diffusion registers
    # every class.
    latent_model = keras.saving.get_registered_object("keras_diffusion>StableDiffusion")
    in_channels = parts_config["unet"].get("in_channels", 4)
    if isinstance(in_channels, int) and in_channels != 4:
        raise ValueError(
            f"the UNet takes {in_channels} input channels (an inpainting UNet); "
            "supported: Stable Diffusion 1.x and 2.x text-to-image UNets with 4."
        )
    unet, vae = (build_part(part, cls, what, states[part], parts_config[part], dtype)
                 for part, cls, what in (("unet", StableDiffusionUNet, "UNet"),
                                         ("vae", StableDiffusionVAE, "VAE")))
    xl = "text_encoder_2" in parts_config
    text = {"skip_layers": 1, "final_layer_norm": False} if xl else {}
    text_encoder = None  # the SDXL refiner has only the second
    if "text_encoder" in parts_config:
        text_encoder = build_part("text_encoder", CLIPTextTransformer, "text encoder",
                             text_model_state_dict(states["text_encoder"]),
                             parts_config["text_encoder"], dtype, **text)
    options = {}
    if xl:
        from keras_diffusion.stable_diffusion import xl as sdxl

        second = build_part("text_encoder_2", CLIPTextTransformer, "second text encoder",
                       text_model_state_dict(states["text_encoder_2"]),
                       parts_config["text_encoder_2"], dtype, **text)
        text_encoder = sdxl.SDXLTextEncoders(text_encoder, second, name="text_encoders")
        tokenizer = sdxl.SDXLTokenizer(*tokenizer)
        latent_model = keras.saving.get_registered_object("keras_diffusion>StableDiffusionXL")
        options = {key: parts_config["pipeline"][key] for key in sdxl.CONFIG_OPTIONS
                   if key in parts_config["pipeline"]}
    schedule, prediction = schedule_from_config(parts_config["scheduler"])
    side = int(parts_config["unet"].get("sample_size", 64)) * vae.factor
    return latent_model(
        vae, unet, schedule, prediction=prediction, ema_decay=None, text_encoder=text_encoder,
        tokenizer=tokenizer, train_text_encoder=False, image_size=(side, side), name=name,
        **options,
    )


def build_part(name, cls, what, state, config, dtype, **options):
    """One part, built with its weights (`weights.building_from`), then
    checked, and what was not taken assigned."""
    dtype = _part_dtype(name, dtype, config)
    with weights.building_from(state, dtype) as taken, precisions.policy_scope(dtype):
        with backend.variables_made_after():
            part = cls.from_reference_config(config, **options)
    weights.load_state_dict(part, state, what, taken=taken)
    return part


def listed(pipeline, part):
    """Whether model_index.json has the component `part`: diffusers writes
    `[null, null]` for one the pipeline goes without (the SDXL refiner's
    first text encoder and tokenizer)."""
    entry = pipeline.get(part, ())
    return not (isinstance(entry, list) and all(item is None for item in entry))


def _component_configs(folder):
    """Each component's config (`text_encoder` absent where the pipeline
    has none), and model_index.json's as `"pipeline"`."""
    folder = Path(folder)
    index = folder / "model_index.json"
    pipeline = read_json(index) if index.is_file() else {}
    xl = pipeline.get("_class_name") in XL_PIPELINES
    parts = {"unet": ("unet", "config.json"), "vae": ("vae", "config.json"),
             "text_encoder": ("text_encoder", "config.json"),
             "scheduler": ("scheduler", "scheduler_config.json")}
    if xl:
        parts["text_encoder_2"] = ("text_encoder_2", "config.json")
        if not listed(pipeline, "text_encoder"):
            del parts["text_encoder"]
    configs = {part: read_json(folder.joinpath(*path)) for part, path in parts.items()}
    configs["pipeline"] = pipeline
    return configs


def load_pipeline_folder(path, dtype=None):
    """A `LatentDiffusionModel` from a diffusers Stable Diffusion folder,
    its weights in `dtype` (None: float32)."""
    dtype = check_dtype(dtype)
    folder = Path(path)
    check_pipeline_class(read_json(folder / "model_index.json"), path)
    configs = _component_configs(folder)
    xl = "text_encoder_2" in configs
    parts = [part for part in ("unet", "vae", "text_encoder", "text_encoder_2")
             if part in configs]
    states = {part: component_weights(folder / part, half=dtype != "float32") for part in parts}
    tokenizer = (CLIPTokenizer.from_folder(folder / "tokenizer")
                 if "text_encoder" in configs else None)
    if xl:
        tokenizer = (tokenizer, CLIPTokenizer.from_folder(folder / "tokenizer_2"))
    return _build(configs, states, tokenizer, name="stable_diffusion_xl" if xl
                  else "stable_diffusion", dtype=dtype)


# The tokenizer folder of each text encoder, and the shipped tokenizer
# (`CLIPTokenizer.shipped`'s family: CLIP's BPE, padded with
# `<|endoftext|>` or `!`) that a file's text encoder takes where the config
# folder has none: SDXL's CLIP ViT-L pads as SD 1.x's, its OpenCLIP
# ViT-bigG as SD 2.x's OpenCLIP ViT-H.
_TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_SHIPPED_TOKENIZERS = {"sd1": {"text_encoder": "sd1"}, "sd2": {"text_encoder": "sd2"},
                       "sdxl": {"text_encoder": "sd1", "text_encoder_2": "sd2"},
                       "sdxl_refiner": {"text_encoder_2": "sd2"}}


def _single_file_tokenizer(family, folder):
    """The tokenizer `_build` takes for a file of `family` with the
    config folder `folder`: one `CLIPTokenizer`, or SDXL's pair `(first,
    second)` (`first` None for the refiner)."""
    tokenizers = {}
    for part, shipped in _SHIPPED_TOKENIZERS[family].items():
        path = Path(folder) / _TOKENIZER_FOLDERS[part]
        tokenizers[part] = (CLIPTokenizer.from_folder(path) if path.is_dir()
                            else CLIPTokenizer.shipped(shipped))
    if "text_encoder_2" not in tokenizers:
        return tokenizers["text_encoder"]
    return tokenizers.get("text_encoder"), tokenizers["text_encoder_2"]


def read_single_file(path, config=None):
    """`(state, family, config)` of one original-layout checkpoint file:
    its `{key: array}` (dtypes as stored), its family (`single_file`
    tells which: SD 1.x / 2.x, SDXL base or refiner, SD 3 Medium, SD 3.5
    Medium or Large) and the diffusers folder that describes it: `config`
    (no weights needed: its component configs, scheduler and tokenizers),
    or for None the shipped configuration of the family."""
    state = checkpoint_files.read_weights(path, upcast_bfloat16=False)
    family = single_file.detect_family(state.keys())
    single_file.check_parts(family, state)
    if config is None:
        config = _shipped_config(family)
    elif not is_pipeline_folder(config):
        raise FileNotFoundError(f"config {config} is not a diffusers folder (no model_index.json).")
    return state, family, config


def load_single_file(state, family, config, dtype=None):
    """A `LatentDiffusionModel` of SD 1.x / 2.x or SDXL from a file's state
    and family, as `read_single_file` gives them, its weights in `dtype`
    (None: float32)."""
    dtype = check_dtype(dtype)
    configs = _component_configs(config)
    _check_config_family(family, configs, config)
    parts = single_file.to_diffusers(
        state, unet_config=configs["unet"], vae_config=configs["vae"],
        text_config=configs.get("text_encoder"), text_2_config=configs.get("text_encoder_2"))
    xl = "text_encoder_2" in configs
    return _build(configs, parts, _single_file_tokenizer(family, config),
                  name="stable_diffusion_xl" if xl else "stable_diffusion", dtype=dtype)


def _check_config_family(family, configs, config):
    """The config folder must have the text encoders the file has."""
    entry = single_file.FAMILIES[family]
    wanted = [part for part in single_file.TEXT_PARTS if part in entry["parts"]]
    found = [part for part in single_file.TEXT_PARTS if part in configs]
    if wanted != found:
        described = configs["pipeline"].get("_class_name") or "pipeline"
        raise ValueError(
            f"the file is a {entry['name']} checkpoint (text encoders: {', '.join(wanted)}), but "
            f"config {config} describes a {described} with {', '.join(found)}; pass the config "
            f"folder of the same model, or none for the shipped {family} configuration."
        )


def _shipped_config(family):
    """The configuration folder that ships for `family`: SD 1.5, SD 2.1,
    SDXL base 1.0, SDXL refiner 1.0, SD 3 Medium, SD 3.5 Medium or SD 3.5
    Large (configs only: no weights, and of the tokenizers CLIP's alone)."""
    folder = Path(__file__).parent / "configs" / family
    if not is_pipeline_folder(folder):
        raise ValueError(
            f"no configuration ships for a {family} single file; pass config=<a diffusers folder "
            "of the same model> (its configs and tokenizer; weights are not needed)."
        )
    return folder


def is_checkpoint(path):
    """Whether `path` names something `loader.load` reads."""
    path = os.fspath(path)
    return is_pipeline_folder(path) or is_single_file(path)

