"""The original single-file layouts of Stable Diffusion checkpoints (CompVis /
Stability's for 1.x and 2.x, Stability's SGM one for SDXL), renamed to and
from the diffusers / transformers keys.

An original file holds the whole pipeline: `model.diffusion_model.*` (the
UNet), `first_stage_model.*` (the VAE) and the text encoders, whose place
tells the family (as diffusers' `infer_diffusers_model_type` tells them):

- SD 1.x: OpenAI CLIP ViT-L under `cond_stage_model.transformer.text_model.*`;
- SD 2.x: OpenCLIP ViT-H under `cond_stage_model.model.*`;
- SDXL base: CLIP ViT-L under `conditioner.embedders.0.transformer.text_model.*`
  and OpenCLIP ViT-bigG under `conditioner.embedders.1.model.*`;
- SDXL refiner: OpenCLIP ViT-bigG alone, under `conditioner.embedders.0.model.*`.

`to_diffusers` turns it into the state dicts a diffusers folder holds
(`unet`, `vae`, `text_encoder` and / or `text_encoder_2`), which the Keras
parts load by key (`weights.load_state_dict`); `to_original` is the inverse
and writes files that diffusers' own `from_single_file` reads.

The knowledge is data. A part is a list of blocks `(original prefix,
diffusers prefix, table)`, derived from the diffusers config (levels, layers
per level, which levels attend); a table lists a block's modules `(original
name, diffusers name, parameters, layout)`. A new checkpoint family is a new
`FAMILIES` entry (prefixes, text table, ignored keys), not new control flow.

Layouts (original -> diffusers):

- `"same"`: unchanged;
- `"conv1x1"`: the original VAE attention's 1x1 convolution `(out, in, 1, 1)`
  -> diffusers' `Linear` weight `(out, in)` (biases pass unchanged);
- `"split"`: OpenCLIP's fused attention input projection `(3 d, ...)` -> the
  query, key and value projections `(d, ...)` each;
- `"transpose"`: OpenCLIP's `text_projection` `(width, projection)`, applied as
  `pooled @ text_projection` -> transformers' `Linear` weight `(projection,
  width)`.

A `CLIPTextModel`'s keys are as transformers (>= 5.6) writes them, without
the `text_model.` level older versions nest them under; a
`CLIPTextModelWithProjection`'s (SDXL's OpenCLIP) are nested under it, its
`text_projection.weight` beside. `to_original` accepts either nesting.
"""


import numpy as np

from keras_diffusion.stable_diffusion import weights

# ---------------------------------------------------------------------------
# Tables: (original module, diffusers module, parameters, layout). Parameters
# are (original name, diffusers name) pairs; a module name "" means the
# parameter sits at the block's own level.

WEIGHT_BIAS = (("weight", "weight"), ("bias", "bias"))
WEIGHT = (("weight", "weight"),)


def _same(*names, params=WEIGHT_BIAS):
    """Modules named alike in both layouts."""
    return tuple((name, name, params, "same") for name in names)


MODULE = _same("")  # a block that is one convolution, norm or linear layer

UNET_TOP = (
    ("time_embed.0", "time_embedding.linear_1", WEIGHT_BIAS, "same"),
    ("time_embed.2", "time_embedding.linear_2", WEIGHT_BIAS, "same"),
    ("input_blocks.0.0", "conv_in", WEIGHT_BIAS, "same"),
    ("out.0", "conv_norm_out", WEIGHT_BIAS, "same"),
    ("out.2", "conv_out", WEIGHT_BIAS, "same"),
)

UNET_RESNET = (
    ("in_layers.0", "norm1", WEIGHT_BIAS, "same"),
    ("in_layers.2", "conv1", WEIGHT_BIAS, "same"),
    ("emb_layers.1", "time_emb_proj", WEIGHT_BIAS, "same"),
    ("out_layers.0", "norm2", WEIGHT_BIAS, "same"),
    ("out_layers.3", "conv2", WEIGHT_BIAS, "same"),
)
UNET_SHORTCUT = (("skip_connection", "conv_shortcut", WEIGHT_BIAS, "same"),)

# The original SpatialTransformer already uses diffusers' names (diffusers
# took them from it); `proj_in`/`proj_out` are 1x1 convolutions or linear
# layers (`use_linear_projection`) alike in both layouts.
TRANSFORMER_OUTER = _same("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK = (
    _same("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    + _same("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v",
            params=WEIGHT)
)

VAE_TOP = (
    ("encoder.conv_in", "encoder.conv_in", WEIGHT_BIAS, "same"),
    ("encoder.norm_out", "encoder.conv_norm_out", WEIGHT_BIAS, "same"),
    ("encoder.conv_out", "encoder.conv_out", WEIGHT_BIAS, "same"),
    ("decoder.conv_in", "decoder.conv_in", WEIGHT_BIAS, "same"),
    ("decoder.norm_out", "decoder.conv_norm_out", WEIGHT_BIAS, "same"),
    ("decoder.conv_out", "decoder.conv_out", WEIGHT_BIAS, "same"),
    ("quant_conv", "quant_conv", WEIGHT_BIAS, "same"),
    ("post_quant_conv", "post_quant_conv", WEIGHT_BIAS, "same"),
)
VAE_RESNET = _same("norm1", "conv1", "norm2", "conv2")
VAE_SHORTCUT = (("nin_shortcut", "conv_shortcut", WEIGHT_BIAS, "same"),)
VAE_ATTENTION = (
    ("norm", "group_norm", WEIGHT_BIAS, "same"),
    ("q", "to_q", WEIGHT_BIAS, "conv1x1"),
    ("k", "to_k", WEIGHT_BIAS, "conv1x1"),
    ("v", "to_v", WEIGHT_BIAS, "conv1x1"),
    ("proj_out", "to_out.0", WEIGHT_BIAS, "conv1x1"),
)

# A text table: the modules outside the layers, and one layer's modules with
# the original and diffusers layer prefixes (formatted with the layer index).
CLIP_TEXT = {
    "top": _same("embeddings.token_embedding", "embeddings.position_embedding", params=WEIGHT)
    + _same("final_layer_norm"),
    "layer": ("encoder.layers.{}", "encoder.layers.{}"),
    "layer_table": _same("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"),
    "dropped": 0,
}
OPENCLIP_TEXT = {
    "top": (
        ("token_embedding", "embeddings.token_embedding", WEIGHT, "same"),
        ("", "embeddings.position_embedding", (("positional_embedding", "weight"),), "same"),
        ("ln_final", "final_layer_norm", WEIGHT_BIAS, "same"),
    ),
    "layer": ("transformer.resblocks.{}", "encoder.layers.{}"),
    "layer_table": (
        ("attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         (("in_proj_weight", "weight"), ("in_proj_bias", "bias")), "split"),
        ("attn.out_proj", "self_attn.out_proj", WEIGHT_BIAS, "same"),
        ("ln_1", "layer_norm1", WEIGHT_BIAS, "same"),
        ("ln_2", "layer_norm2", WEIGHT_BIAS, "same"),
        ("mlp.c_fc", "mlp.fc1", WEIGHT_BIAS, "same"),
        ("mlp.c_proj", "mlp.fc2", WEIGHT_BIAS, "same"),
    ),
    "dropped": 0,
}
# A text table's other entries: "dropped", how many of the original's last
# layers diffusers' text encoder leaves out (SD 2.x conditions on OpenCLIP's
# penultimate layer, so its diffusers text encoder keeps 23 of 24 layers);
# optionally "nested", the level transformers puts the text model under,
# and "head", the modules beside it (CLIPTextModelWithProjection's).
SD2_TEXT = dict(OPENCLIP_TEXT, dropped=1)
OPENCLIP_PROJECTED_TEXT = dict(
    OPENCLIP_TEXT, nested="text_model",
    head=(("", "text_projection", (("text_projection", "weight"),), "transpose"),),
)

# The noise schedule that the original training code (ldm's DDPM) stores as
# buffers beside the weights. The schedule comes from the scheduler config
# instead, and diffusers reads none of these.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)

UNET_PART = ("model.diffusion_model.", "UNet", "")
VAE_PART = ("first_stage_model.", "VAE", "")

# Each family: the key prefixes that tell it (any one present), each part's
# original prefix, name and architecture, its text tables, the UNet options
# it sets (see UNET_FIXED), and what a file of it may hold that diffusers
# does not load (dropped, never an error):
# - `model_ema.*`: the EMA copy of the UNet some files carry besides the
#   weights; diffusers loads the non-EMA weights unless asked otherwise;
# - the schedule buffers above, and SGM's copy of them, `denoiser.sigmas`;
# - CLIP's `position_ids`, a constant `arange` buffer;
# - OpenCLIP's `logit_scale` (the contrastive head's temperature) and, for
#   SD 2.x, its `text_projection` too (`CLIPTextModel` has none; SDXL's
#   `CLIPTextModelWithProjection` loads it), the image tower `visual.*` of
#   a full OpenCLIP model, and the last resblocks a text table drops.
FAMILIES = {
    "sd1": {
        "name": "Stable Diffusion 1.x",
        "telltales": ("cond_stage_model.transformer.",),
        "parts": {"unet": UNET_PART, "vae": VAE_PART,
                  "text_encoder": ("cond_stage_model.transformer.text_model.", "text encoder",
                                   "CLIP ViT-L")},
        "texts": {"text_encoder": CLIP_TEXT},
        "ignored_keys": SCHEDULE_BUFFERS
        + ("cond_stage_model.transformer.text_model.embeddings.position_ids",),
        "ignored_prefixes": ("model_ema.",),
    },
    "sd2": {
        "name": "Stable Diffusion 2.x",
        "telltales": ("cond_stage_model.model.",),
        "parts": {"unet": UNET_PART, "vae": VAE_PART,
                  "text_encoder": ("cond_stage_model.model.", "text encoder", "OpenCLIP ViT-H")},
        "texts": {"text_encoder": SD2_TEXT},
        "ignored_keys": SCHEDULE_BUFFERS
        + ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"),
        "ignored_prefixes": ("model_ema.", "cond_stage_model.model.visual."),
    },
    "sdxl": {
        "name": "Stable Diffusion XL (base)",
        "telltales": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
        "parts": {"unet": UNET_PART, "vae": VAE_PART,
                  "text_encoder": ("conditioner.embedders.0.transformer.text_model.",
                                   "first text encoder", "CLIP ViT-L"),
                  "text_encoder_2": ("conditioner.embedders.1.model.", "second text encoder",
                                     "OpenCLIP ViT-bigG")},
        "texts": {"text_encoder": CLIP_TEXT, "text_encoder_2": OPENCLIP_PROJECTED_TEXT},
        "unet_options": {"addition_embed_type": "text_time"},
        "ignored_keys": SCHEDULE_BUFFERS
        + ("denoiser.sigmas", "conditioner.embedders.1.model.logit_scale",
           "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"),
        "ignored_prefixes": ("model_ema.",),
    },
    "sdxl_refiner": {
        "name": "Stable Diffusion XL refiner",
        "telltales": ("conditioner.embedders.0.model.",),
        "parts": {"unet": UNET_PART, "vae": VAE_PART,
                  "text_encoder_2": ("conditioner.embedders.0.model.", "text encoder",
                                     "OpenCLIP ViT-bigG")},
        "texts": {"text_encoder_2": OPENCLIP_PROJECTED_TEXT},
        "unet_options": {"addition_embed_type": "text_time"},
        "ignored_keys": SCHEDULE_BUFFERS
        + ("denoiser.sigmas", "conditioner.embedders.0.model.logit_scale"),
        "ignored_prefixes": ("model_ema.",),
    },
}
TEXT_PARTS = ("text_encoder", "text_encoder_2")

# Files that are something else: a key prefix that gives each away.
OTHER_LAYOUTS = (
    ("conditioner.embedders.",
     "a Stability (SGM) checkpoint whose conditioners are not SDXL's text encoders"),
    ("text_encoders.clip_", "a Stable Diffusion 3 / 3.5 checkpoint"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 / 3.5 checkpoint"),
    ("joint_blocks.", "a Stable Diffusion 3 / 3.5 transformer"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux transformer"),
    ("control_model.", "a ControlNet checkpoint"),
    ("lora_unet_", "a LoRA (kohya layout), not a full checkpoint"),
    ("lora_te_", "a LoRA (kohya layout), not a full checkpoint"),
    ("down_blocks.", "a diffusers-layout UNet (load its diffusers folder instead)"),
    ("encoder.down.", "a VAE on its own in the original layout, not a full checkpoint"),
    ("model.diffusion_model.",
     "an original-layout UNet without a text encoder (no cond_stage_model.* or "
     "conditioner.embedders.* keys)"),
)

# Config options that would add or rename keys, and the only value each takes
# here (the value SD 1.x and 2.x use, and diffusers' default: a missing
# option means that value); a family's "unet_options" replace some.
UNET_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "time_cond_proj_dim": None,
    "encoder_hid_dim": None, "time_embedding_type": "positional", "dual_cross_attention": False,
    "attention_type": "default", "reverse_transformer_layers_per_block": None,
}
# The modules an `addition_embed_type` adds: SDXL's `text_time` embeds the
# pooled prompt and the time ids with SGM's `label_emb` (its class
# embedding, `num_classes="sequential"`).
UNET_ADDED_EMBEDDINGS = {
    None: (),
    "text_time": (("label_emb.0.0", "add_embedding.linear_1", WEIGHT_BIAS, "same"),
                  ("label_emb.0.2", "add_embedding.linear_2", WEIGHT_BIAS, "same")),
}
UNET_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> attends
UNET_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
VAE_FIXED = {"mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True}
VAE_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


# ---------------------------------------------------------------------------
# Layouts: original array -> diffusers arrays, and back.


def _conv1x1_to_linear(value, count):
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        return [value.reshape(value.shape[:2])]
    return [value]


def _linear_to_conv1x1(values):
    value = values[0]
    return value.reshape(value.shape + (1, 1)) if value.ndim == 2 else value


def _split(value, count):
    if value.shape[0] % count:
        raise ValueError(f"a fused projection of shape {value.shape} does not split into {count} "
                         "equal parts along its first axis.")
    return np.split(value, count, axis=0)


LAYOUTS = {
    "same": (lambda value, count: [value], lambda values: values[0]),
    "transpose": (lambda value, count: [np.ascontiguousarray(value.T)],
                  lambda values: np.ascontiguousarray(values[0].T)),
    "conv1x1": (_conv1x1_to_linear, _linear_to_conv1x1),
    "split": (_split, lambda values: np.concatenate(values, axis=0)),
}


# ---------------------------------------------------------------------------
# Blocks derived from the configs.


def _join(*names):
    return ".".join(name for name in names if name)


def _per_level(value, levels, option):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"the config's {option} {value!r} names {len(values)} levels; "
                         f"block_out_channels names {levels}.")
    return [int(v) for v in values]


def _check_fixed(config, fixed, what, defaults=None):
    """Each option of `fixed` must have its value there; a missing option
    has its value in `defaults` (None: `fixed`)."""
    defaults = fixed if defaults is None else defaults
    for option, accepted in fixed.items():
        if config.get(option, defaults[option]) != accepted:
            raise ValueError(f"the {what} config option {option}={config.get(option)!r} is not "
                             f"supported by the single-file layout here (supported: {accepted!r}).")


def _block_types(config, option, accepted, levels, what):
    types = list(config.get(option, ()))
    unknown = [t for t in types if t not in accepted]
    if unknown or len(types) != levels:
        raise ValueError(f"the {what} config's {option} {types!r} is not supported: it needs one of "
                         f"{sorted(accepted)} per level of block_out_channels ({levels} levels).")
    return types


def _transformer(depth):
    blocks = [(f"transformer_blocks.{t}", f"transformer_blocks.{t}", TRANSFORMER_BLOCK)
              for t in range(depth)]
    return [("", "", TRANSFORMER_OUTER)] + blocks


def _unet_blocks(config, options=None):
    """`(original prefix, diffusers prefix, table)` for every UNet block,
    in the order of the original `input_blocks` / `middle_block` /
    `output_blocks` numbering. `options`: a family's values of options
    that `UNET_FIXED` otherwise fixes."""
    _check_fixed(config, dict(UNET_FIXED, **(options or {})), "UNet", defaults=UNET_FIXED)
    channels = [int(c) for c in config["block_out_channels"]]
    levels = len(channels)
    down = _block_types(config, "down_block_types", UNET_DOWN_BLOCKS, levels, "UNet")
    up = _block_types(config, "up_block_types", UNET_UP_BLOCKS, levels, "UNet")
    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels,
                       "transformer_layers_per_block")
    blocks = [("", "", UNET_TOP + UNET_ADDED_EMBEDDINGS[config.get("addition_embed_type")])]

    def resnet(original, diffusers, c_in, c_out):
        table = UNET_RESNET + (UNET_SHORTCUT if c_in != c_out else ())
        blocks.append((original, diffusers, table))

    def attention(original, diffusers, level_depth):
        blocks.extend((_join(original, o), _join(diffusers, d), table)
                      for o, d, table in _transformer(level_depth))

    index, c_in = 1, channels[0]  # input_blocks.0 is conv_in
    for level, (kind, c_out) in enumerate(zip(down, channels)):
        for layer in range(layers[level]):
            resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}", c_in, c_out)
            if UNET_DOWN_BLOCKS[kind]:
                attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{layer}",
                          depth[level])
            c_in, index = c_out, index + 1
        if level < levels - 1:
            blocks.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                           MODULE))
            index += 1

    resnet("middle_block.0", "mid_block.resnets.0", channels[-1], channels[-1])
    attention("middle_block.1", "mid_block.attentions.0", depth[-1])
    resnet("middle_block.2", "mid_block.resnets.1", channels[-1], channels[-1])

    # Each up resnet also takes one skip from the input path: the last of a
    # level takes the next finer level's width (its downsampler's output,
    # or conv_in's), the others the level's own, as in diffusers.
    rchannels, rlayers, rdepth = channels[::-1], layers[::-1], depth[::-1]
    index, previous = 0, rchannels[0]
    for level, (kind, c_out) in enumerate(zip(up, rchannels)):
        skip_last = rchannels[min(level + 1, levels - 1)]
        count = rlayers[level] + 1
        for layer in range(count):
            c_in = (previous if layer == 0 else c_out) + (skip_last if layer == count - 1 else c_out)
            resnet(f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{layer}", c_in, c_out)
            slot = 1
            if UNET_UP_BLOCKS[kind]:
                attention(f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{layer}",
                          rdepth[level])
                slot = 2
            if layer == count - 1 and level < levels - 1:
                blocks.append((f"output_blocks.{index}.{slot}.conv",
                               f"up_blocks.{level}.upsamplers.0.conv", MODULE))
            index += 1
        previous = c_out
    return blocks


def _vae_blocks(config):
    """`(original prefix, diffusers prefix, table)` for every VAE block."""
    _check_fixed(config, VAE_FIXED, "VAE")
    channels = [int(c) for c in config["block_out_channels"]]
    levels = len(channels)
    for option, kind in VAE_BLOCKS.items():
        _block_types(config, option, {kind: True}, levels, "VAE")
    layers = int(config.get("layers_per_block", 1))
    blocks = [("", "", VAE_TOP)]

    def resnet(original, diffusers, c_in, c_out):
        blocks.append((original, diffusers, VAE_RESNET + (VAE_SHORTCUT if c_in != c_out else ())))

    def middle(part):
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", channels[-1], channels[-1])
        blocks.append((f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION))
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", channels[-1], channels[-1])

    c_in = channels[0]
    for level, c_out in enumerate(channels):
        for layer in range(layers):
            resnet(f"encoder.down.{level}.block.{layer}",
                   f"encoder.down_blocks.{level}.resnets.{layer}", c_in, c_out)
            c_in = c_out
        if level < levels - 1:
            blocks.append((f"encoder.down.{level}.downsample.conv",
                           f"encoder.down_blocks.{level}.downsamplers.0.conv", MODULE))
    middle("encoder")

    # The original numbers the decoder's levels by resolution (up.0 is the
    # last one run); diffusers numbers them in the order they run.
    middle("decoder")
    c_in = channels[-1]
    for level, c_out in enumerate(channels[::-1]):
        original = f"decoder.up.{levels - 1 - level}"
        for layer in range(layers + 1):
            resnet(f"{original}.block.{layer}", f"decoder.up_blocks.{level}.resnets.{layer}",
                   c_in, c_out)
            c_in = c_out
        if level < levels - 1:
            blocks.append((f"{original}.upsample.conv",
                           f"decoder.up_blocks.{level}.upsamplers.0.conv", MODULE))
    return blocks


def _text_blocks(text, config):
    """A text encoder's blocks (`text`: a text table), and those of the
    original's extra layers that diffusers drops."""
    count = int(config["num_hidden_layers"])
    original, diffusers = text["layer"]
    nested = text.get("nested", "")

    def layer(n):
        return (original.format(n), _join(nested, diffusers.format(n)), text["layer_table"])

    extra = range(count, count + text["dropped"])
    blocks = [("", nested, text["top"])] + [layer(n) for n in range(count)]
    if "head" in text:
        blocks.append(("", "", text["head"]))
    return blocks, [layer(n) for n in extra]


def _keys(blocks, part, prefix):
    """`{original key: (part, diffusers keys, layout)}` for `blocks`."""
    table = {}
    for block_original, block_diffusers, modules in blocks:
        for module_original, module_diffusers, params, layout in modules:
            for param_original, param_diffusers in params:
                names = module_diffusers if isinstance(module_diffusers, tuple) else (module_diffusers,)
                key = prefix + _join(block_original, module_original, param_original)
                table[key] = (part, tuple(_join(block_diffusers, name, param_diffusers)
                                          for name in names), layout)
    return table


# The keyword that passes each part's config.
CONFIG_ARGUMENTS = {"unet": "unet_config", "vae": "vae_config", "text_encoder": "text_config",
                    "text_encoder_2": "text_2_config"}


def key_table(family, *, unet_config, vae_config, text_config=None, text_2_config=None):
    """The renaming for one family and configuration: `(table, ignored)`
    where `table` is `{original key: (part, diffusers keys, layout)}` and
    `ignored` the original keys of weights diffusers does not load.

    The configs are the diffusers `unet/config.json` and `vae/config.json`
    dicts and transformers' `text_encoder/config.json` (`text_config`) and
    `text_encoder_2/config.json` (`text_2_config`) ones: those of the parts
    the family has (SDXL base both text encoders, its refiner the second
    only, SD 1.x / 2.x the first only); the others are not read."""
    if family not in FAMILIES:
        raise ValueError(f"unknown single-file family {family!r}; supported: {sorted(FAMILIES)}.")
    entry = FAMILIES[family]
    configs = {"unet": unet_config, "vae": vae_config, "text_encoder": text_config,
               "text_encoder_2": text_2_config}
    for part in entry["parts"]:
        if configs[part] is None:
            raise ValueError(f"the {entry['name']} layout has a {part}: pass its config as "
                             f"{CONFIG_ARGUMENTS[part]}= (the {part}/config.json of a diffusers "
                             "folder).")
    table, ignored = {}, set(entry["ignored_keys"])
    for part, (prefix, _, _) in entry["parts"].items():
        if part == "unet":
            blocks, extra = _unet_blocks(unet_config, entry.get("unet_options")), []
        elif part == "vae":
            blocks, extra = _vae_blocks(vae_config), []
        else:
            blocks, extra = _text_blocks(entry["texts"][part], configs[part])
        table.update(_keys(blocks, part, prefix))
        ignored |= set(_keys(extra, part, prefix))
    return table, ignored


def _is_ignored(key, family, ignored):
    return key in ignored or key.startswith(FAMILIES[family]["ignored_prefixes"])


# ---------------------------------------------------------------------------
# Public API.


def _first_keys(keys, limit=8):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def detect_family(keys):
    """The family (a `FAMILIES` key: `"sd1"`, `"sd2"`, `"sdxl"`,
    `"sdxl_refiner"`) of an original single file's keys (a dict or any
    iterable of keys), or one `ValueError` naming what the file looks like.

    The text encoders tell the family, as diffusers tells them: a file with
    either of SDXL base's encoders is an SDXL base file (`to_diffusers`
    then names the one it lacks). An inpainting UNet (9 input channels) has
    its family's keys: the family is returned and `unet_in_channels` tells
    the caller."""
    keys = list(keys)
    for family, entry in FAMILIES.items():
        if any(key.startswith(entry["telltales"]) for key in keys):
            return family
    supported = ", ".join(f"{f} ({e['name']})" for f, e in FAMILIES.items())
    for prefix, what in OTHER_LAYOUTS:
        if any(key.startswith(prefix) for key in keys):
            raise ValueError(f"this file looks like {what} ({prefix}* keys); the single-file "
                             f"layouts supported are {supported}.")
    raise ValueError(f"this file is not a Stable Diffusion checkpoint in the original single-file "
                     f"layout (supported: {supported}); its first keys: "
                     f"{_first_keys(keys) or 'none: it holds no tensors'}.")


def unet_in_channels(state):
    """The number of input channels of an original file's UNet: 4 for text
    to image, 9 for an inpainting UNet (latents, mask, masked image)."""
    key = FAMILIES[detect_family(state)]["parts"]["unet"][0] + "input_blocks.0.0.weight"
    if key not in state:
        raise ValueError(f"the file has no UNet input convolution ({key}).")
    return int(np.shape(state[key])[1])


def _check_parts(family, keys):
    """One `ValueError` naming the first part of `family` the file has no
    key of."""
    entry = FAMILIES[family]
    for prefix, name, architecture in entry["parts"].values():
        if not any(key.startswith(prefix) for key in keys):
            where = ", ".join(filter(None, (f"{prefix}*", architecture)))
            held = ", ".join(f"{p}* ({n})" for p, n, _ in entry["parts"].values())
            raise ValueError(f"the file has no {name} ({where}); a {entry['name']} single file "
                             f"holds {held}.")


def to_diffusers(state, *, unet_config, vae_config, text_config=None, text_2_config=None):
    """An original single file's `{key: array}` as diffusers / transformers
    state dicts, one per part of its family (`"unet"`, `"vae"`, and
    `"text_encoder"` and / or `"text_encoder_2"`), in their keys and
    layouts, each array of the dtype it came in.

    The configs are those `key_table` reads. Keys diffusers does not load
    (see `FAMILIES`) are dropped; a part the file lacks raises one
    `ValueError` naming it, and any other key the configuration does not
    account for, or any key it needs and the file lacks, one naming the
    first few of each."""
    family = detect_family(state)
    _check_parts(family, state)
    table, ignored = key_table(family, unet_config=unet_config, vae_config=vae_config,
                               text_config=text_config, text_2_config=text_2_config)
    present = {key for key in state if not _is_ignored(key, family, ignored)}
    weights.check_keys(table, present, f"{FAMILIES[family]['name']} single-file")
    expected, found = int(unet_config.get("in_channels", 4)), unet_in_channels(state)
    if found != expected:
        raise ValueError(f"the file's UNet takes {found} input channels"
                         f"{' (an inpainting UNet)' if found == 9 else ''}, but the UNet config "
                         f"has in_channels={expected}.")
    parts = {part: {} for part in FAMILIES[family]["parts"]}
    for key, (part, names, layout) in table.items():
        values = LAYOUTS[layout][0](np.asarray(state[key]), len(names))
        parts[part].update(zip(names, values))
    return parts


NESTED = "text_model."


def _as_named(state, wanted):
    """A text encoder's state dict with each key nested under `text_model.`
    or not, as `wanted` names it (transformers nests `CLIPTextModel`'s
    keys before 5.6, `CLIPTextModelWithProjection`'s always)."""
    renamed = {}
    for key, value in state.items():
        bare = key[len(NESTED):] if key.startswith(NESTED) else key
        renamed[next((name for name in (bare, NESTED + bare) if name in wanted), key)] = value
    return renamed


def to_original(parts, *, family, unet_config, vae_config, text_config=None, text_2_config=None):
    """`to_diffusers` undone: diffusers / transformers state dicts, one per
    part of `family` (`{"unet": ..., "vae": ..., "text_encoder": ...,
    "text_encoder_2": ...}`, those the family has), as one original
    single-file `{key: array}`, which `safetensors.numpy.save_file` writes
    and diffusers' `from_single_file` reads. Weights diffusers does not
    load are not written (SD 2.x's `text_projection` and the last OpenCLIP
    layer are not in a diffusers folder to begin with)."""
    table, _ = key_table(family, unet_config=unet_config, vae_config=vae_config,
                         text_config=text_config, text_2_config=text_2_config)
    parts = dict(parts)
    for part in FAMILIES[family]["parts"]:
        wanted = {name for owner, names, _ in table.values() if owner == part for name in names}
        if part in TEXT_PARTS:
            parts[part] = _as_named(parts.get(part, {}), wanted)
        weights.check_keys(wanted, parts.get(part, {}), f"diffusers {part}")
    return {key: LAYOUTS[layout][1]([np.asarray(parts[part][name]) for name in names])
            for key, (part, names, layout) in table.items()}


def unet_module_names(config):
    """`{diffusers module path: original module path}` of every module of
    the UNet that `config` (diffusers') describes, e.g.
    `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`:
    the names kohya's sd-scripts gives SDXL's LoRA modules. Raises
    `ValueError` for a UNet the original layout does not hold."""
    options = {"addition_embed_type": config.get("addition_embed_type")}
    return {_join(block_diffusers, module_diffusers): _join(block_original, module_original)
            for block_original, block_diffusers, table in _unet_blocks(config, options)
            for module_original, module_diffusers, _, _ in table}
