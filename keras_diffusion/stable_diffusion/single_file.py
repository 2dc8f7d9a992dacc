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
  width)`;
- `"shift_scale"`: an SD 3 modulation's `(shift, scale)` halves -> diffusers'
  `(scale, shift)` (its own inverse).

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
)
# The 1x1 convolutions around the latent that SD 1.x / 2.x and SDXL's VAEs
# have and SD 3's has not, each by the config option that keeps it.
VAE_QUANT = {"use_quant_conv": _same("quant_conv"), "use_post_quant_conv": _same("post_quant_conv")}
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
# SD 3's files hold both CLIP encoders as transformers writes a
# `CLIPTextModelWithProjection` ("original_nested": the level the original
# nests the text model under). CLIP-L's projection is not read: the original
# takes CLIP-L's pooled output unprojected, so diffusers gives the model an
# identity projection (see the family's "identities").
SD3_CLIP_L = dict(CLIP_TEXT, nested="text_model", original_nested="text_model")
SD3_CLIP_G = dict(SD3_CLIP_L, head=_same("text_projection", params=WEIGHT))

# T5's encoder (transformers' `T5EncoderModel`), kept in its own keys; the
# relative position table sits in the first block only.
T5_LAYER = _same("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                 "layer.0.SelfAttention.o", "layer.0.layer_norm", "layer.1.layer_norm",
                 params=WEIGHT)
T5_FEED_FORWARD = {  # gated or not (`feed_forward_proj`)
    True: _same("layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
                "layer.1.DenseReluDense.wo", params=WEIGHT),
    False: _same("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo", params=WEIGHT),
}
T5_POSITIONS = _same("layer.0.SelfAttention.relative_attention_bias", params=WEIGHT)
T5_TOP = _same("shared", "encoder.final_layer_norm", params=WEIGHT)


def _t5_blocks(config):
    """T5's blocks (a text table's counterpart, derived from transformers'
    `T5Config` dict), and none dropped."""
    gated = str(config.get("feed_forward_proj", "relu")).startswith("gated-")
    layer = T5_LAYER + T5_FEED_FORWARD[gated]
    return [("", "", T5_TOP)] + [
        (f"encoder.block.{n}", f"encoder.block.{n}", layer + (T5_POSITIONS if n == 0 else ()))
        for n in range(int(config.get("num_layers", 6)))], []


# SD 3's MMDiT (diffusers' `SD3Transformer2DModel`): its modules outside the
# joint blocks, and a joint block's (an image `x_block` and a context
# `context_block`, each attention's query, key and value fused as `qkv`).
# The original modulations split into (shift, scale), diffusers' into
# (scale, shift): the last block's context modulation and the final layer's
# are those two alone ("shift_scale"); the others split into six or nine
# chunks in the same order in both.
MMDIT_TOP = (
    ("x_embedder.proj", "pos_embed.proj", WEIGHT_BIAS, "same"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", WEIGHT_BIAS, "same"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", WEIGHT_BIAS, "same"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", WEIGHT_BIAS, "same"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", WEIGHT_BIAS, "same"),
    ("context_embedder", "context_embedder", WEIGHT_BIAS, "same"),
    ("final_layer.linear", "proj_out", WEIGHT_BIAS, "same"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", WEIGHT_BIAS, "shift_scale"),
)
MMDIT_POSITIONS = (("", "pos_embed", (("pos_embed", "pos_embed"),), "same"),)
MMDIT_BLOCK = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), WEIGHT_BIAS, "split"),
    ("x_block.attn.proj", "attn.to_out.0", WEIGHT_BIAS, "same"),
    ("x_block.adaLN_modulation.1", "norm1.linear", WEIGHT_BIAS, "same"),
    ("x_block.mlp.fc1", "ff.net.0.proj", WEIGHT_BIAS, "same"),
    ("x_block.mlp.fc2", "ff.net.2", WEIGHT_BIAS, "same"),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
     WEIGHT_BIAS, "split"),
)
# Every block's context stream but the last's, which only feeds the joint
# attention (diffusers' `context_pre_only`).
MMDIT_CONTEXT = (
    ("context_block.attn.proj", "attn.to_add_out", WEIGHT_BIAS, "same"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear", WEIGHT_BIAS, "same"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj", WEIGHT_BIAS, "same"),
    ("context_block.mlp.fc2", "ff_context.net.2", WEIGHT_BIAS, "same"),
)
MMDIT_LAST_CONTEXT = (
    ("context_block.adaLN_modulation.1", "norm1_context.linear", WEIGHT_BIAS, "shift_scale"),
)
MMDIT_QK_NORM = (  # qk_norm="rms_norm" (SD 3.5)
    ("x_block.attn.ln_q", "attn.norm_q", WEIGHT, "same"),
    ("x_block.attn.ln_k", "attn.norm_k", WEIGHT, "same"),
    ("context_block.attn.ln_q", "attn.norm_added_q", WEIGHT, "same"),
    ("context_block.attn.ln_k", "attn.norm_added_k", WEIGHT, "same"),
)
MMDIT_DUAL = (  # the second image attention of `dual_attention_layers` (SD 3.5 Medium)
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), WEIGHT_BIAS, "split"),
    ("x_block.attn2.proj", "attn2.to_out.0", WEIGHT_BIAS, "same"),
)
MMDIT_DUAL_QK_NORM = (
    ("x_block.attn2.ln_q", "attn2.norm_q", WEIGHT, "same"),
    ("x_block.attn2.ln_k", "attn2.norm_k", WEIGHT, "same"),
)
MMDIT_QK_NORMS = (None, "rms_norm")

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
MMDIT_PART = ("model.diffusion_model.", "transformer", "MMDiT")

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

# Stable Diffusion 3 / 3.5 (Stability's layout, as their reference code and
# ComfyUI save it): the MMDiT under `model.diffusion_model.`, the VAE
# without quant convolutions, and the text encoders under
# `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` in transformers' own
# keys. Stability ships most files without text encoders (they come from
# elsewhere: `optional` parts), some with the CLIP ones, a few with T5 too.
# The three releases differ in the MMDiT's blocks, which tell them (any
# key must contain each of "requires"): SD 3.5 Medium's second image
# attention, SD 3.5 Large's query / key norms, SD 3 Medium neither. A Flux
# file (its own blocks) is not one, whatever encoders it holds.
# - "identities": diffusers keys a file has no original for, and the
#   identity matrix diffusers gives them (CLIP-L's projection, see
#   SD3_CLIP_L);
# - a T5 file may repeat its token embedding as `encoder.embed_tokens`,
#   tied to `shared`: dropped, as is the projection CLIP-L may carry.
SD3_FAMILY = {
    "telltales": ("model.diffusion_model.joint_blocks.", "text_encoders."),
    "excludes": ("model.diffusion_model.double_blocks.",),
    "parts": {"transformer": MMDIT_PART, "vae": VAE_PART,
              "text_encoder": ("text_encoders.clip_l.transformer.", "first text encoder",
                               "CLIP ViT-L"),
              "text_encoder_2": ("text_encoders.clip_g.transformer.", "second text encoder",
                                 "OpenCLIP ViT-bigG"),
              "text_encoder_3": ("text_encoders.t5xxl.transformer.", "third text encoder",
                                 "T5 v1.1 XXL")},
    "optional": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "texts": {"text_encoder": SD3_CLIP_L, "text_encoder_2": SD3_CLIP_G,
              "text_encoder_3": _t5_blocks},
    "identities": {"text_encoder": ("text_projection.weight",)},
    "ignored_keys": ("text_encoders.clip_l.transformer.text_model.embeddings.position_ids",
                     "text_encoders.clip_g.transformer.text_model.embeddings.position_ids",
                     "text_encoders.clip_l.transformer.text_projection.weight",
                     "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"),
    "ignored_prefixes": (),
}
FAMILIES.update({
    "sd35_medium": dict(SD3_FAMILY, name="Stable Diffusion 3.5 Medium", requires=(".attn2.",)),
    "sd35_large": dict(SD3_FAMILY, name="Stable Diffusion 3.5 Large", requires=(".ln_q.",)),
    "sd3": dict(SD3_FAMILY, name="Stable Diffusion 3 Medium"),
})

# Files that are something else: a key prefix that gives each away.
OTHER_LAYOUTS = (
    ("conditioner.embedders.",
     "a Stability (SGM) checkpoint whose conditioners are not SDXL's text encoders"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint, not supported yet"),
    ("double_blocks.", "a Flux transformer, not supported yet"),
    ("joint_blocks.",
     "a Stable Diffusion 3 / 3.5 transformer alone, without the model.diffusion_model. prefix "
     "and the VAE of a full checkpoint"),
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
VAE_FIXED = {"mid_block_add_attention": True}
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


def _swap_halves(value):
    first, second = np.split(value, 2, axis=0)
    return np.concatenate([second, first], axis=0)


LAYOUTS = {
    "same": (lambda value, count: [value], lambda values: values[0]),
    "shift_scale": (lambda value, count: [_swap_halves(value)],
                    lambda values: _swap_halves(values[0])),
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
    quant = sum((table for option, table in VAE_QUANT.items() if config.get(option, True)), ())
    blocks = [("", "", VAE_TOP + quant)]

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


def _mmdit_blocks(config):
    """`(original prefix, diffusers prefix, table)` for every block of the
    MMDiT that diffusers' `transformer/config.json` dict describes."""
    if config.get("qk_norm") not in MMDIT_QK_NORMS:
        raise ValueError(f"the transformer config option qk_norm={config['qk_norm']!r} is not "
                         f"supported by the single-file layout here (supported: "
                         f"{', '.join(map(repr, MMDIT_QK_NORMS))}).")
    count = int(config.get("num_layers", 18))
    dual = {int(n) for n in config.get("dual_attention_layers") or ()}
    norms = config.get("qk_norm") is not None
    # diffusers keeps the position table as a weight only with a maximum size.
    top = MMDIT_TOP + (MMDIT_POSITIONS if config.get("pos_embed_max_size", 96) else ())
    blocks = [("", "", top)]
    for n in range(count):
        table = MMDIT_BLOCK + (MMDIT_LAST_CONTEXT if n == count - 1 else MMDIT_CONTEXT)
        table += MMDIT_QK_NORM if norms else ()
        if n in dual:
            table += MMDIT_DUAL + (MMDIT_DUAL_QK_NORM if norms else ())
        blocks.append((f"joint_blocks.{n}", f"transformer_blocks.{n}", table))
    return blocks


def _text_blocks(text, config):
    """A text encoder's blocks (`text`: a text table, or a function of the
    config giving them), and those of the original's extra layers that
    diffusers drops."""
    if callable(text):
        return text(config)
    count = int(config["num_hidden_layers"])
    original, diffusers = text["layer"]
    nested, original_nested = text.get("nested", ""), text.get("original_nested", "")

    def layer(n):
        return (_join(original_nested, original.format(n)), _join(nested, diffusers.format(n)),
                text["layer_table"])

    extra = range(count, count + text["dropped"])
    blocks = [(original_nested, nested, text["top"])] + [layer(n) for n in range(count)]
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
CONFIG_ARGUMENTS = {"unet": "unet_config", "transformer": "transformer_config",
                    "vae": "vae_config", "text_encoder": "text_config",
                    "text_encoder_2": "text_2_config", "text_encoder_3": "text_3_config"}


def key_table(family, *, unet_config=None, vae_config=None, text_config=None,
              text_2_config=None, transformer_config=None, text_3_config=None, parts=None):
    """The renaming for one family and configuration: `(table, ignored)`
    where `table` is `{original key: (part, diffusers keys, layout)}` and
    `ignored` the original keys of weights diffusers does not load.

    The configs are the diffusers `unet/config.json` (or SD 3's
    `transformer/config.json`) and `vae/config.json` dicts and
    transformers' `text_encoder/config.json` (`text_config`),
    `text_encoder_2/...` (`text_2_config`) and `text_encoder_3/...`
    (`text_3_config`) ones: those of the parts the family has (SDXL base
    both CLIP encoders, its refiner the second only, SD 1.x / 2.x the first
    only, SD 3 a transformer and any of its three); the others are not
    read. `parts`: the parts to rename (None: all the family has, less the
    optional ones whose config is None)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown single-file family {family!r}; supported: {sorted(FAMILIES)}.")
    entry = FAMILIES[family]
    configs = {"unet": unet_config, "transformer": transformer_config, "vae": vae_config,
               "text_encoder": text_config, "text_encoder_2": text_2_config,
               "text_encoder_3": text_3_config}
    if parts is None:
        parts = [part for part in entry["parts"]
                 if configs[part] is not None or part not in entry.get("optional", ())]
    for part in parts:
        if configs[part] is None:
            raise ValueError(f"the {entry['name']} layout has a {part}: pass its config as "
                             f"{CONFIG_ARGUMENTS[part]}= (the {part}/config.json of a diffusers "
                             "folder).")
    table, ignored = {}, set(entry["ignored_keys"])
    for part in parts:
        prefix = entry["parts"][part][0]
        if part == "unet":
            blocks, extra = _unet_blocks(unet_config, entry.get("unet_options")), []
        elif part == "transformer":
            blocks, extra = _mmdit_blocks(transformer_config), []
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
    `"sdxl_refiner"`, `"sd3"`, `"sd35_medium"`, `"sd35_large"`) of an
    original single file's keys (a dict or any iterable of keys), or one
    `ValueError` naming what the file looks like.

    The text encoders tell the family, as diffusers tells them: a file with
    either of SDXL base's encoders is an SDXL base file (`to_diffusers`
    then names the one it lacks). An SD 3 file is told by its MMDiT's
    blocks (see `SD3_FAMILY`). An inpainting UNet (9 input channels) has
    its family's keys: the family is returned and `unet_in_channels` tells
    the caller."""
    keys = list(keys)
    for family, entry in FAMILIES.items():
        if (any(key.startswith(entry["telltales"]) for key in keys)
                and not any(key.startswith(entry.get("excludes", ())) for key in keys)
                and all(any(mark in key for key in keys) for mark in entry.get("requires", ()))):
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


def _described(prefix, name, architecture):
    return f"{prefix}* ({', '.join(filter(None, (name, architecture)))})"


def check_parts(family, keys):
    """One `ValueError` naming the first part of `family` that a file
    needs and has no key of (an SD 3 file needs its transformer and VAE;
    its text encoders are optional)."""
    entry = FAMILIES[family]
    optional = entry.get("optional", ())
    for part, (prefix, name, architecture) in entry["parts"].items():
        if part not in optional and not any(key.startswith(prefix) for key in keys):
            where = ", ".join(filter(None, (f"{prefix}*", architecture)))
            held = ", ".join(f"{p}* ({n})" for part, (p, n, _) in entry["parts"].items()
                             if part not in optional)
            if optional:
                held += " and optionally " + ", ".join(
                    _described(*entry["parts"][part]) for part in optional)
            raise ValueError(f"the file has no {name} ({where}); a {entry['name']} single file "
                             f"holds {held}.")


def parts_held(family, keys):
    """The parts of `family` that the file of `keys` holds: all it needs
    (see `check_parts`) and the optional ones it has keys of."""
    entry = FAMILIES[family]
    return [part for part, (prefix, _, _) in entry["parts"].items()
            if part not in entry.get("optional", ())
            or any(key.startswith(prefix) for key in keys)]


def to_diffusers(state, **configs):
    """An original single file's `{key: array}` as diffusers / transformers
    state dicts, one per part of its family that it holds (`"unet"` or
    `"transformer"`, `"vae"`, and its text encoders: `"text_encoder"`,
    `"text_encoder_2"`, `"text_encoder_3"`), in their keys and layouts, each
    array of the dtype it came in.

    `configs`: those `key_table` reads (`unet_config=`, `vae_config=`,
    ...). Keys diffusers does not load (see `FAMILIES`) are dropped; a part
    the file lacks raises one `ValueError` naming it, and any other key the
    configuration does not account for, or any key it needs and the file
    lacks, one naming the first few of each."""
    family = detect_family(state)
    check_parts(family, state)
    held = parts_held(family, state)
    table, ignored = key_table(family, parts=held, **configs)
    present = {key for key in state if not _is_ignored(key, family, ignored)}
    weights.check_keys(table, present, f"{FAMILIES[family]['name']} single-file")
    if "unet" in held:
        expected, found = int(configs["unet_config"].get("in_channels", 4)), unet_in_channels(state)
        if found != expected:
            raise ValueError(f"the file's UNet takes {found} input channels"
                             f"{' (an inpainting UNet)' if found == 9 else ''}, but the UNet "
                             f"config has in_channels={expected}.")
    parts = {part: {} for part in held}
    for key, (part, names, layout) in table.items():
        values = LAYOUTS[layout][0](np.asarray(state[key]), len(names))
        parts[part].update(zip(names, values))
    for part, names in FAMILIES[family].get("identities", {}).items():
        if part in parts:
            width = int(configs[CONFIG_ARGUMENTS[part]]["hidden_size"])
            dtype = next(iter(parts[part].values())).dtype
            parts[part].update({name: np.eye(width, dtype=dtype) for name in names})
    return parts


NESTED = "text_model."
# Keys a diffusers folder may hold that repeat another (transformers ties
# T5's token embedding to `shared`): not written.
TIED = {"text_encoder_3": ("encoder.embed_tokens.weight",)}


def _as_named(state, wanted):
    """A text encoder's state dict with each key nested under `text_model.`
    or not, as `wanted` names it (transformers nests `CLIPTextModel`'s
    keys before 5.6, `CLIPTextModelWithProjection`'s always)."""
    renamed = {}
    for key, value in state.items():
        bare = key[len(NESTED):] if key.startswith(NESTED) else key
        renamed[next((name for name in (bare, NESTED + bare) if name in wanted), key)] = value
    return renamed


def _without_identities(family, part, state):
    """`state` less the weights the layout stands for by an identity
    matrix, each checked to be one (the file could not say otherwise)."""
    names = FAMILIES[family].get("identities", {}).get(part, ())
    for name in names:
        value = np.asarray(state.get(name, np.eye(1)), dtype="float32")
        if value.ndim != 2 or not np.array_equal(value, np.eye(*value.shape, dtype="float32")):
            raise ValueError(f"the {part}'s {name} is not the identity, but the "
                             f"{FAMILIES[family]['name']} layout has no such weight (the "
                             "original reads the encoder unprojected); it cannot be written.")
    return {key: value for key, value in state.items()
            if key not in names and key not in TIED.get(part, ())}


def to_original(parts, *, family, **configs):
    """`to_diffusers` undone: diffusers / transformers state dicts, one per
    part of `family` (`{"unet": ..., "vae": ..., "text_encoder": ...,
    "text_encoder_2": ...}`; for SD 3 `"transformer"` and `"vae"` and any
    of its text encoders), as one original single-file `{key: array}`,
    which `safetensors.numpy.save_file` writes and diffusers'
    `from_single_file` reads. `configs`: those `key_table` reads. Weights
    diffusers does not load are not written (SD 2.x's `text_projection`
    and the last OpenCLIP layer are not in a diffusers folder to begin
    with; SD 3's CLIP-L projection must be the identity it stands for)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown single-file family {family!r}; supported: {sorted(FAMILIES)}.")
    optional = FAMILIES[family].get("optional", ())
    held = [part for part in FAMILIES[family]["parts"] if part not in optional or parts.get(part)]
    table, _ = key_table(family, parts=held, **configs)
    parts = dict(parts)
    for part in held:
        wanted = {name for owner, names, _ in table.values() if owner == part for name in names}
        state = _without_identities(family, part, parts.get(part, {}))
        if part in TEXT_PARTS:
            state = _as_named(state, wanted)
        weights.check_keys(wanted, state, f"diffusers {part}")
        parts[part] = state
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
