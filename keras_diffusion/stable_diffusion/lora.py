"""LoRA (Hu et al. 2021) for Stable Diffusion: Keras' own `enable_lora` on
the dense layers of the UNet and text encoder, and the LoRA files the
PyTorch world shares, read and written.

A LoRA adds `(alpha / rank) * B @ A` to a layer's weight `W` (`(out, in)`
in the reference layout), `A` `(rank, in)` and `B` `(out, rank)`. Keras'
`Dense` holds `W` transposed as `kernel` `(in, out)`, and after
`enable_lora(rank)` adds `(lora_alpha / lora_rank) * lora_kernel_a @
lora_kernel_b`, so `lora_kernel_a` is `A` transposed and `lora_kernel_b`
is `B` transposed.

The layouts read are spellings of that one thing (`SPELLINGS`, data): a
part's key prefix, the module path (with `.`, or with `_` as kohya writes
it), and the suffixes of A (down), B (up) and alpha:

- peft, what diffusers' `save_lora_weights` writes from
  `get_peft_model_state_dict`: `unet.<path>.lora_A.weight` / `.lora_B.weight`;
- diffusers, what its training scripts write after
  `convert_state_dict_to_diffusers`: `unet.<path>.lora.down.weight` /
  `.lora.up.weight`, text encoders `.lora_linear_layer.down.weight`; and
  its older attention-processor layout, `unet.<block>.processor.to_q_lora.
  down.weight` (the module named by `LEGACY_NAMES`);
- kohya / A1111: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.
  weight` and `.alpha`, `lora_te_` (or `lora_te1_`) for the text encoder,
  LoRAs of convolutions (LoCon, 3x3 kernels of their own rank) included.

SD 3's files name its MMDiT `transformer.` (`transformer.transformer_blocks.
0.attn.to_q.lora_A.weight`) beside `text_encoder.` and `text_encoder_2.`
(the two CLIP encoders), as diffusers' `StableDiffusion3Pipeline` writes
and reads them; diffusers reads no kohya layout for SD 3, nor does this.

A file mixes them freely, key by key, as diffusers' converters leave them.
The alpha of a module is its `.alpha` key, else the one peft's config in
the file's `lora_adapter_metadata` gives it (`lora_alpha`, `alpha_pattern`,
rsLoRA), else the rank (scale 1). DoRA, LoHa and LoKr files are refused by
name.

Several LoRAs apply at once, as diffusers' adapters: `load_lora_weights(...,
adapter_name=, scale=)` adds one, `set_adapters` weights them,
`delete_adapters` removes one. One adapter at a time (the one `enable_lora`
made, or the first loaded) lives in Keras' LoRA matrices of the dense
layers, where `fit` trains it; the others, and every LoRA of a convolution
(the PyTorch backend convolves with a kernel of its own, not Keras' LoRA
sum), are added to the kernels and taken out again when removed or
re-weighted. Files are written in the peft layout with `alpha / rank`
folded into B, which every reader takes at scale 1, or in kohya's.

The functions take the `StableDiffusion` model; its LoRA bookkeeping is a
`LoraState` kept outside Keras' tracking.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from keras import layers
from keras import ops

from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.layers import keras_name

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLED_WEIGHT_NAME = "pytorch_lora_weights.bin"  # what diffusers wrote before safetensors
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# SD 3's MMDiT: the image stream's attention projections, and the joint
# attention's context projections (diffusers' `train_dreambooth_lora_sd3.py`
# trains both unless `--lora_layers` says otherwise). `attn.` keeps SD 3.5
# medium's second image attention (`attn2`) out, as the script's targets do.
SD3_IMAGE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
SD3_TARGETS = SD3_IMAGE_TARGETS + ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                   "attn.to_add_out")
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_PREFIX = "text_model."  # transformers' CLIPTextModel before version 5
DEFAULT_ADAPTER = "default"

# The parts a LoRA file may name (the model's `lora_parts()` gives those it
# has); the first two are denoising networks (a model has one).
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

# Each part's key prefixes in a layout; the first is the one written. A part
# without kohya prefixes (SD 3's transformer) has no kohya layout.
DIFFUSERS_PREFIXES = {"unet": ("unet.",), "transformer": ("transformer.",),
                      "text_encoder": ("text_encoder.",), "text_encoder_2": ("text_encoder_2.",)}
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"),
                  "text_encoder_2": ("lora_te2_",)}
# How kohya's sd-scripts writes a family's files where it differs from the
# first prefixes above: SDXL's first text encoder is `lora_te1_`, and its
# UNet's modules have their original (SGM) names, `input_blocks_4_1_...`.
KOHYA_WRITTEN = {"SDXL": {"text_encoder": "lora_te1_", "original_unet_names": True}}
# How each layout spells a module's LoRA: (layout, part prefixes, module path
# written with "." or "_", {matrix: key suffix}). Tried in this order: a
# longer suffix before one it ends with.
SPELLINGS = (
    ("peft", DIFFUSERS_PREFIXES, ".",
     {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"}),
    ("diffusers", DIFFUSERS_PREFIXES, ".",
     {"down": ".lora.down.weight", "up": ".lora.up.weight"}),
    ("diffusers", DIFFUSERS_PREFIXES, ".",
     {"down": ".lora_linear_layer.down.weight", "up": ".lora_linear_layer.up.weight"}),
    ("diffusers attention processors", DIFFUSERS_PREFIXES, ".",
     {"down": ".down.weight", "up": ".up.weight"}),
    ("kohya", KOHYA_PREFIXES, "_",
     {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}),
)
# The older attention-processor layout names a projection after its
# processor's LoRA: the module it is the LoRA of, per part.
LEGACY_NAMES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v",
             "to_out_lora": "to_out.0"},
    "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                     "to_out_lora": "out_proj"},
}
LEGACY_NAMES["text_encoder_2"] = LEGACY_NAMES["text_encoder"]
# What a file's keys say of the family it was made for, checked in order
# (Flux shares SD 3's add_q_proj), named when its keys do not fit a model
# of another family: SDXL's second text encoder, added embedding, original
# UNet names and transformers two or more blocks deep; SD 1.x / 2.x's
# kohya text encoder (SDXL's is te1), attention at the first level and a
# fourth level (SDXL's UNet has three, the first without attention).
FAMILY_TELLTALES = (
    ("double_blocks", "Flux"), ("single_blocks", "Flux"),
    ("single_transformer_blocks", "Flux"), ("add_q_proj", "SD 3"), ("joint_blocks", "SD 3"),
    ("context_embedder", "SD 3"), ("transformer.transformer_blocks.", "SD 3"),
    ("lora_te2_", "SDXL"), ("text_encoder_2.", "SDXL"),
    ("add_embedding", "SDXL"), ("label_emb", "SDXL"), ("lora_unet_input_blocks_", "SDXL"),
    ("lora_unet_middle_block_", "SDXL"), ("lora_unet_output_blocks_", "SDXL"),
    ("transformer_blocks.1.attn", "SDXL"), ("transformer_blocks_1_attn", "SDXL"),
    ("lora_te_", "SD 1.x / 2.x"), ("down_blocks.0.attentions", "SD 1.x / 2.x"),
    ("down_blocks_0_attentions", "SD 1.x / 2.x"), ("up_blocks.3.", "SD 1.x / 2.x"),
    ("up_blocks_3_", "SD 1.x / 2.x"),
)
SD_FAMILY = "SD 1.x / 2.x"  # a model's family (`lora_family`) unless it names another
# Adapters of another kind than LoRA, refused by name: key marker -> format.
UNSUPPORTED = {"dora_scale": "DoRA (weight-decomposed LoRA)",
               "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
               "hada_w1_a": "LyCORIS LoHa", "hada_w2_a": "LyCORIS LoHa",
               "lokr_w1": "LyCORIS LoKr", "lokr_w2": "LyCORIS LoKr",
               "lora_B.bias": "LoRA with biases (peft's lora_bias)"}
READ = ("LoRA files of SD 1.x / 2.x and SDXL in the peft, diffusers and kohya layouts, and "
        "of SD 3 in the peft and diffusers layouts")


class Adapter:
    """One named LoRA: `entries` `{(part, module path): (down, up, alpha)}`
    in the reference layout as the file gave them (alpha resolved), the
    `weight` it is applied at (`set_adapters`), whether it is `active`, and
    `merged` `{key: alpha / rank times the weight}` that its entries added
    to kernels now."""

    def __init__(self, entries, weight):
        self.entries = entries
        self.weight = float(weight)
        self.active = True
        self.merged = {}

    @property
    def strength(self):
        return self.weight if self.active else 0.0


class LoraState:
    """A model's LoRA: the dense layers with Keras' LoRA enabled, by
    `(part, module path)`; the adapters by name, in the order loaded; the
    name of the one whose dense matrices those layers hold (`live`, None
    when none does); and the layers `fuse_lora` merged, with the
    `(lora_alpha, merged alpha)` to restore."""

    def __init__(self):
        self.layers = {}
        self.adapters = {}
        self.live = None
        self.fused = {}
        self.enabled_by_user = False


def state_of(model):
    """The model's `LoraState` (an empty one for a model without LoRA)."""
    return model.__dict__.setdefault("_lora_state", LoraState())


# ------------------------------------------------------------ the layers
def module_layers(part):
    """`{module path: layer}` of a part's dense and convolution layers."""
    found = {}
    for layer in part._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, (layers.Dense, layers.Conv2D)) and hasattr(layer, "module_path"):
            found[layer.module_path] = layer
    return found


def _parts(model):
    """`{part: Keras model}` of the parts a LoRA of `model` may name."""
    return model.lora_parts()


def _family(model):
    return getattr(model, "lora_family", SD_FAMILY)


def _network_part(model):
    """The name LoRA files give the model's denoising network."""
    return next(part for part, layer in _parts(model).items() if layer is model.network)


def _matching(paths, target):
    return [path for path in paths if path == target or path.endswith("." + target)]


def _check_targets(targets, what):
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets or \
            not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{what} must be a non-empty list of module-path suffixes, e.g. "
                         f"{list(ATTENTION_TARGETS)}; got {targets!r}.")
    return tuple(targets)


def _target_layers(part, targets, what):
    """The dense layers of `part` whose module paths end with one of
    `targets`, by module path."""
    found = module_layers(part)
    chosen = {}
    for target in targets:
        paths = _matching(found, target)
        dense = [path for path in paths if isinstance(found[path], layers.Dense)]
        if not paths:
            raise ValueError(f"{what} {target!r} names no layer of the {part.name}; module paths "
                             f"end e.g. with {', '.join(ATTENTION_TARGETS + TEXT_TARGETS)}.")
        if not dense:
            raise ValueError(
                f"{what} {target!r} names convolutions of the {part.name} ({paths[0]}); "
                "enable_lora trains dense layers (attention and feed-forward projections, and "
                "the linear proj_in / proj_out of SD 2.x)."
            )
        chosen.update({path: found[path] for path in dense})
    return chosen


def _peft_a_initializer(seed):
    """A drawn as peft draws it (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in),
    1/sqrt(in))), on the host, from one NumPy generator."""
    rng = np.random.default_rng(seed)

    def initializer(shape, dtype=None):
        bound = 1.0 / math.sqrt(shape[0])
        return rng.uniform(-bound, bound, tuple(shape)).astype(dtype or "float32")

    return initializer


def _zeros(shape, dtype=None):
    return np.zeros(tuple(shape), dtype or "float32")


def _enable(layer, rank, alpha, a_initializer=_zeros):
    layer.enable_lora(int(rank), lora_alpha=alpha, a_initializer=a_initializer,
                      b_initializer=_zeros)
    layer.lora_alpha = float(alpha)


def _set_trainable(model):
    """Only the LoRA matrices train: every other variable of the UNet and
    text encoder is frozen (Keras' `enable_lora` freezes the kernel but
    not the bias). A text encoder with LoRA layers is made trainable for
    them; the model's `train_text_encoder` (a saved setting: the whole
    encoder trains) stays as it is."""
    state = state_of(model)
    lora = {id(v) for layer in state.layers.values()
            for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    network = _network_part(model)
    if any(part != network for part, _ in state.layers):
        model.text_encoder.trainable = True
    # The text encoder whole: an encoder no LoRA file names (SD 3's T5) stays frozen.
    for part in (*_parts(model).values(), model.text_encoder):
        for variable in part.variables:
            variable.trainable = id(variable) in lora


def _changed(model):
    """After the function or the trainable variables change: sampling
    recompiles (a scale is a constant of the traced program), and `fit`
    asks for `compile` again (the optimizer was built for other variables)."""
    model.__dict__.pop("_compiled_loops", None)
    if getattr(model, "compiled", False):
        model.compiled = False


def _check_model(model):
    if model.ema_decay:
        raise ValueError(
            "LoRA needs a model without an EMA of its weights (ema_decay=None, as a loaded "
            "Stable Diffusion model has): the EMA copies were made for the full weights."
        )


def enable_lora(model, rank=8, alpha=None, targets=ATTENTION_TARGETS, text_encoder=False,
                seed=None):
    """Keras' LoRA on the UNet's dense layers whose module paths end with one
    of `targets` (and, with `text_encoder`, on each text encoder's: True
    for `TEXT_TARGETS`, or a list of suffixes); A drawn as peft draws it,
    B zero, so the model's function starts unchanged. Afterwards only the
    LoRA matrices are trainable. `alpha` None is `rank` (scale 1)."""
    state = state_of(model)
    if state.layers or state.adapters:
        how = "enable_lora was called" if state.enabled_by_user else "a LoRA was loaded"
        raise ValueError(f"the model already has LoRA layers ({how}); enable_lora is called "
                         "once per model. Load trained LoRA weights with load_lora_weights.")
    _check_model(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank!r}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or alpha <= 0):
        raise ValueError(f"alpha must be a positive number or None (= rank); got {alpha!r}.")
    network = _network_part(model)
    chosen = {(network, path): layer for path, layer in
              _target_layers(model.network, _check_targets(targets, "targets"),
                             "target").items()}
    if text_encoder:
        text_targets = TEXT_TARGETS if text_encoder is True else text_encoder
        text_targets = _check_targets(text_targets, "text_encoder")
        for part, encoder in _parts(model).items():
            if part != network:
                chosen.update({(part, path): layer for path, layer in
                               _target_layers(encoder, text_targets, "text target").items()})
    initializer = _peft_a_initializer(seed)
    alpha = float(rank if alpha is None else alpha)
    for key, layer in chosen.items():
        _enable(layer, rank, alpha, initializer)
        state.layers[key] = layer
    # The matrices live in the layers; the adapter keeps each module's alpha.
    state.adapters[DEFAULT_ADAPTER] = Adapter({key: (None, None, alpha) for key in chosen}, 1.0)
    state.live = DEFAULT_ADAPTER
    state.enabled_by_user = True
    _set_trainable(model)
    _changed(model)


# ------------------------------------------------------------- reading files
def _resolve(path, what):
    path = Path(os.fspath(path))
    if path.is_dir():
        named = [path / name for name in (WEIGHT_NAME, PICKLED_WEIGHT_NAME)
                 if (path / name).is_file()]
        candidates = named[:1] or sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{path} holds {'no' if not candidates else 'several'} .safetensors files; "
                f"expected {WEIGHT_NAME} (or {PICKLED_WEIGHT_NAME}, or one .safetensors file), "
                f"or pass the {what} file.")
        return candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}.")
    return path


def _metadata(path):
    """The peft configs diffusers writes into a safetensors header
    (`lora_adapter_metadata`, keys `unet.lora_alpha`, ...), or {}."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        raw = (file.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{path} has lora_adapter_metadata that is not JSON.") from None


def read_file(path):
    """`({key: numpy array}, metadata)` of a LoRA file (`.safetensors`, or a
    PyTorch `.bin` where it loads without running code) or of a folder
    holding `pytorch_lora_weights.safetensors`. A truncated or corrupt
    file raises one `ValueError` naming it."""
    from keras_diffusion import checkpoint_files

    path = _resolve(path, "LoRA")
    return checkpoint_files.read_weights(path), _metadata(path)


def _module_tables(model, lookup):
    """`{part: {separator: {spelled path: module path}}}` of `_lookup`'s
    modules: each as the layouts spell it, with `.` or `_`, a text
    encoder's also without transformers' `text_model.` (as transformers 5
    names it), and a UNet's also by its original name with `_` (kohya's
    SDXL files)."""
    tables = {part: {".": {}, "_": {}} for part in _parts(model)}
    for part, path in lookup:
        for separator, spelled in tables[part].items():
            spelled[path.replace(".", separator)] = path
            if path.startswith(TEXT_PREFIX):
                spelled[path[len(TEXT_PREFIX):].replace(".", separator)] = path
    for path, original in (original_unet_names(model) if "unet" in tables else {}).items():
        if ("unet", path) in lookup:
            tables["unet"]["_"][keras_name(original)] = path
    return tables


def original_unet_names(model):
    """`{module path: original (SGM / CompVis) module path}` of the UNet's
    modules, as `single_file` renames them ({} for a UNet that layout does
    not describe)."""
    try:
        return single_file.unet_module_names(model.network.config)
    except (ValueError, TypeError):  # TypeError: transformer depths given per layer
        return {}


def _legacy(middle, part):
    """A module path of the attention-processor layout (`attn1.processor.
    to_q_lora`) as the path of the module it is the LoRA of (`attn1.to_q`)."""
    names = [name for name in middle.split(".") if name != "processor"]
    legacy = LEGACY_NAMES.get(part, {})  # SD 3's files never had that layout
    if names and names[-1] in legacy:
        names[-1] = legacy[names[-1]]
    return ".".join(names)


def _split_key(key, tables):
    """`(part, module path, matrix)` of a LoRA key, matrix one of `"down"`,
    `"up"`, `"alpha"`, the path None where the key names no module of the
    part; None where no spelling matches the key."""
    for _, prefixes, separator, suffixes in SPELLINGS:
        for part, spelled in prefixes.items():
            prefix = next((p for p in spelled if key.startswith(p)), None)
            if prefix is None:
                continue
            for matrix, suffix in suffixes.items():
                if key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                    middle = key[len(prefix):-len(suffix)]
                    if separator == ".":
                        middle = _legacy(middle, part)
                    spelled = tables.get(part, {}).get(separator, {})  # {}: a part it lacks
                    return part, spelled.get(middle), matrix
    return None


def _refuse_other_kinds(keys):
    """One error for a file of an adapter kind other than LoRA, by name."""
    for key in keys:
        for marker, kind in UNSUPPORTED.items():
            if marker in key:
                raise ValueError(f"the file is a {kind} adapter ({marker} in {key}), which "
                                 f"keras_diffusion does not load; it reads {READ}.")


def _alpha_from_metadata(metadata, part, path, rank):
    """The alpha peft's config gives module `path` (None without one)."""
    config = {key[len(part) + 1:]: value for key, value in metadata.items()
              if key.startswith(part + ".")}
    if not config:
        return None
    if config.get("use_dora"):
        raise ValueError(f"the file is a DoRA (weight-decomposed LoRA) adapter (use_dora in its "
                         f"metadata), which keras_diffusion does not load; it reads {READ}.")
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        pattern = pattern.lstrip("^")
        if path == pattern or path.endswith("." + pattern):
            alpha = value
    if alpha is None:
        return None
    # rsLoRA scales by alpha / sqrt(rank): the same as alpha * sqrt(rank) over rank.
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _as_matrix(value, rows):
    """A 2-D `(rows, n)` view of a dense LoRA matrix given 2-D, or 4-D with
    1x1 spatial dims (a LoRA of a 1x1 convolution for a dense layer)."""
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    return value if value.ndim == 2 and value.shape[0] == rows else None


def _fits(layer, down, up):
    """Whether `(down, up)` fit `layer`: `(rank, in)` and `(out, rank)` for a
    dense layer; `(rank, in, kh, kw)` and `(out, rank, 1, 1)` for a
    convolution `(kh, kw, in, out)` (or 2-D for a 1x1 one)."""
    rank = down.shape[0]
    if isinstance(layer, layers.Dense):
        kernel_in, kernel_out = layer._kernel.shape
        down, up = _as_matrix(down, rank), _as_matrix(up, int(kernel_out))
        return (down is not None and up is not None and down.shape[1] == kernel_in
                and up.shape[1] == rank)
    kh, kw, kernel_in, kernel_out = layer.kernel.shape
    if down.ndim == 2 and (kh, kw) == (1, 1):
        down = down[:, :, None, None]
    if up.ndim == 2:
        up = up[:, :, None, None]
    return (down.ndim == 4 and down.shape[1:] == (kernel_in, kh, kw)
            and up.shape == (kernel_out, rank, 1, 1))


def _reference_shape(layer):
    """The layer's weight shape in the reference layout."""
    if isinstance(layer, layers.Dense):
        kernel_in, kernel_out = layer._kernel.shape
        return (int(kernel_out), int(kernel_in))
    kh, kw, kernel_in, kernel_out = (int(d) for d in layer.kernel.shape)
    return (kernel_out, kernel_in, kh, kw)


def _look(keys, model):
    """`(marker, family)` of the first telltale (in `FAMILY_TELLTALES`' order)
    that one of `keys` holds; None where none does or it is the model's
    own family (an SD 3 key holds SDXL's `transformer_blocks.1.attn` too)."""
    for marker, family in FAMILY_TELLTALES:
        if any(marker in key for key in keys):
            return None if family == _family(model) else (marker, family)
    return None


def _unread_kohya(keys, model):
    """Whether `keys` are kohya's for a model whose network has no kohya
    layout (SD 3: diffusers reads none either)."""
    kohya = tuple(prefix for prefixes in KOHYA_PREFIXES.values() for prefix in prefixes)
    return _network_part(model) not in KOHYA_PREFIXES and any(k.startswith(kohya) for k in keys)


def _misfit(problems, keys, model):
    """The one error for keys that do not fit, naming the first few, the
    model's family and the family the file's keys look like."""
    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
    look = _look(keys, model)
    if look:
        guess = f"Its keys look like a LoRA for {look[1]} ({look[0]}); "
    elif _unread_kohya(keys, model):
        guess = (f"Its keys are kohya's, a layout neither diffusers nor keras_diffusion reads "
                 f"for {_family(model)} models; ")
    else:
        guess = ("It may be a LoRA for another model (SD 2.x weights on an SD 1.x model, or "
                 "another family); ")
    return (f"the LoRA does not fit this {_family(model)} model: {'; '.join(problems[:5])}"
            f"{more}. {guess}keras_diffusion reads {READ}.")


def _key_problem(key, split, model):
    look = _look([key], model)
    if split is None or split[1] is None:
        if look:
            return f"{key} (a key of {look[1]} LoRAs)"
        return f"{key} (not a LoRA key)" if split is None else \
            f"{key} (names no module of the {split[0]})"
    return None


def _pair_problem(part, path, matrices, layer):
    if "down" not in matrices or "up" not in matrices:
        return f"{part} {path} (its {'up' if 'up' not in matrices else 'down'} matrix is missing)"
    down, up = matrices["down"], matrices["up"]
    if down.ndim < 2 or up.ndim < 2:
        return f"{part} {path} (matrices of shapes {down.shape} and {up.shape})"
    if down.shape[0] != up.shape[1]:
        return (f"{part} {path} (its down matrix {down.shape} has rank {down.shape[0]} but its "
                f"up matrix {up.shape} rank {up.shape[1]})")
    if not _fits(layer, down, up):
        return (f"{part} {path} (shapes {down.shape} and {up.shape} do not fit its weight of "
                f"shape {_reference_shape(layer)})")
    return None


def parse(state, metadata, model):
    """`{(part, module path): (down, up, alpha)}` of a LoRA state dict for
    `model`, alpha the rank where the file gives none; raises one
    `ValueError` naming the first keys that do not fit, or the adapter kind
    a file of another kind is."""
    _refuse_other_kinds(state)
    lookup = _lookup(model)
    tables = _module_tables(model, lookup)
    found, problems = {}, []
    for key in sorted(state):
        split = _split_key(key, tables)
        problem = _key_problem(key, split, model)
        if problem:
            problems.append(problem)
            continue
        part, path, matrix = split
        found.setdefault((part, path), {})[matrix] = np.asarray(state[key], "float32")
    entries = {}
    for (part, path), matrices in found.items():
        problem = _pair_problem(part, path, matrices, lookup[(part, path)])
        if problem:
            problems.append(problem)
            continue
        down, up = matrices["down"], matrices["up"]
        alpha = matrices.get("alpha")
        alpha = (float(np.reshape(alpha, ())) if alpha is not None
                 else _alpha_from_metadata(metadata, part, path, down.shape[0]))
        entries[(part, path)] = (down, up, float(down.shape[0]) if alpha is None else alpha)
    if problems:
        raise ValueError(_misfit(problems, state, model))
    if not entries:
        raise ValueError("the LoRA file holds no LoRA weights.")
    return entries


# ------------------------------------------------------------ the adapters
def _lookup(model):
    """`{(part, module path): layer}` of the model's dense and convolution layers."""
    return {(part, path): layer for part, model_part in _parts(model).items()
            for path, layer in module_layers(model_part).items()}


def _check_scale(scale, what="scale"):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number; got {scale!r}.")
    return float(scale)


def _check_name(name):
    if name is None:
        return DEFAULT_ADAPTER
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string or None; got {name!r}.")
    return name


def _check_not_fused(state, doing):
    if state.fused:
        raise ValueError(f"a LoRA is fused into the weights; call unfuse_lora() before {doing}.")


def _known(state, names):
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in state.adapters:
            loaded = ", ".join(state.adapters) or "none"
            raise ValueError(f"the model has no LoRA adapter named {name!r}; loaded: {loaded}.")
    return names


def _enabled_misfits(state, entries, dense):
    """Why the file's dense modules do not fit the LoRA layers there are."""
    problems = []
    for key in sorted(dense):
        layer, rank = state.layers.get(key), entries[key][0].shape[0]
        if layer is None:
            problems.append(f"{key[0]} {key[1]} (no LoRA layer there)")
        elif rank != layer.lora_rank:
            problems.append(f"{key[0]} {key[1]} (rank {rank}, the layer's {layer.lora_rank})")
    problems.sort(key=lambda problem: "no LoRA layer" in problem)  # ranks first
    return problems


def _goes_live(state, name, entries, dense):
    """Whether the adapter `name` loads into the layers' LoRA matrices
    (where fit trains it) rather than into the kernels. Loading again under
    the name of the adapter that lives there must fit its layers (to resume
    training)."""
    if state.live not in (None, name):
        return False
    problems = _enabled_misfits(state, entries, dense) if state.layers else []
    if problems and state.live == name:
        raise ValueError(
            "the LoRA does not fit the model's LoRA layers (enabled before, by enable_lora or "
            f"an earlier load): {'; '.join(problems[:5])}. Load it into a model without LoRA "
            "(load the checkpoint again), under another adapter_name, or enable_lora with "
            "the file's rank and modules."
        )
    return bool(dense) and not problems


def _delta(layer, down, up):
    """`up @ down` in the layout of the layer's kernel variable."""
    if isinstance(layer, layers.Dense):
        rank = down.shape[0]
        return (_as_matrix(up, up.shape[0]) @ _as_matrix(down, rank)).T
    kh, kw = layer.kernel.shape[:2]
    if down.ndim == 2:
        down = down.reshape(down.shape + (kh, kw))
    up = up.reshape(up.shape[0], up.shape[1])
    return weights.to_keras(np.einsum("or,rihw->oihw", up, down), "conv")


def _add_to_kernel(layer, down, up, factor):
    variable = layer._kernel if isinstance(layer, layers.Dense) else layer.kernel
    value = ops.convert_to_numpy(variable)
    variable.assign((value + _delta(layer, down, up) * factor).astype(value.dtype))


def _apply(model, state):
    """Bring the layers to what the adapters say: the live adapter's alphas
    times its strength, every other entry in its kernel at its strength."""
    live = state.adapters.get(state.live)
    for key, layer in state.layers.items():
        layer.lora_alpha = (live.entries[key][2] * live.strength
                            if live is not None and key in live.entries else 0.0)
    lookup = None
    for adapter in state.adapters.values():
        for key, (down, up, alpha) in adapter.entries.items():
            if down is None or adapter is live and key in state.layers:
                continue  # held by the LoRA layers (enable_lora's only there)
            target = alpha * adapter.strength / down.shape[0]
            current = adapter.merged.get(key, 0.0)
            if target != current:
                lookup = lookup or _lookup(model)
                _add_to_kernel(lookup[key], down, up, target - current)
            adapter.merged[key] = target


def _make_live(state, name, dense, lookup):
    """Put the adapter's dense matrices into the layers' LoRA (enabled where
    needed, with the file's ranks); layers it leaves out get B = 0."""
    for key, layer in state.layers.items():
        if key not in dense:
            layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, "float32"))
    for key in dense:
        down, up, alpha = state.adapters[name].entries[key]
        layer, rank = lookup[key], down.shape[0]
        if not layer.lora_enabled:
            _enable(layer, rank, alpha)
            state.layers[key] = layer
        layer.lora_kernel_a.assign(_as_matrix(down, rank).T)
        layer.lora_kernel_b.assign(_as_matrix(up, up.shape[0]).T)
    state.live = name


def _remove(model, state, name):
    adapter = state.adapters[name]
    adapter.active = False
    if state.live == name:
        for layer in state.layers.values():
            layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, "float32"))
        state.live = None
    _apply(model, state)  # takes its merged entries out of the kernels
    del state.adapters[name]


def _settled(model):
    _set_trainable(model)
    _changed(model)


def load_lora_weights(model, path, scale=1.0, adapter_name=None):
    """Load a LoRA file (see the module docstring for the layouts) as the
    adapter `adapter_name` (None: `"default"`), applied at `scale`. An
    adapter of that name is replaced; one of another name stays, and both
    apply. On a model without LoRA layers the file's dense modules get
    Keras' LoRA with its ranks (`fit` trains them); loading again under the
    same name must fit those layers (to resume training). A refused file
    changes nothing."""
    scale = _check_scale(scale)
    name = _check_name(adapter_name)
    _check_model(model)
    state = state_of(model)
    _check_not_fused(state, "loading another")
    tensors, metadata = read_file(path)
    entries = parse(tensors, metadata, model)
    lookup = _lookup(model)
    dense = {key for key in entries if isinstance(lookup[key], layers.Dense)}
    live = _goes_live(state, name, entries, dense)
    if name in state.adapters:
        _remove(model, state, name)
    state.adapters[name] = Adapter(entries, scale)
    if live:
        _make_live(state, name, dense, lookup)
    _apply(model, state)
    _settled(model)


def set_adapters(model, adapter_names, weights=None):
    """Apply only the adapters named (one name or a list), each at its
    weight (`weights`: one number for all, a list, or None for 1.0), as
    diffusers' `set_adapters`; the others stay loaded but apply nothing."""
    state = state_of(model)
    names = _known(state, adapter_names)
    if weights is None or isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [1.0 if weights is None else weights] * len(names)
    if isinstance(weights, str) or not hasattr(weights, "__len__") or len(weights) != len(names):
        raise ValueError(f"weights must be a number, None or one number per adapter "
                         f"({len(names)}); got {weights!r}.")
    weights = [_check_scale(weight, "each adapter weight") for weight in weights]
    _check_not_fused(state, "set_adapters")
    chosen = dict(zip(names, weights))
    for name, adapter in state.adapters.items():
        adapter.active = name in chosen
        adapter.weight = chosen.get(name, adapter.weight)
    _apply(model, state)
    _settled(model)


def delete_adapters(model, adapter_names):
    """Remove the adapters named (one name or a list): what they added
    leaves the kernels (up to rounding), and their LoRA matrices are zeroed."""
    state = state_of(model)
    names = _known(state, adapter_names)
    _check_not_fused(state, "deleting adapters")
    for name in names:
        _remove(model, state, name)
    _settled(model)


def unload_lora_weights(model):
    """Remove every adapter (`delete_adapters` of them all)."""
    state = state_of(model)
    if state.adapters:
        delete_adapters(model, list(state.adapters))


def get_active_adapters(model):
    return [name for name, adapter in state_of(model).adapters.items() if adapter.active]


def get_list_adapters(model):
    return list(state_of(model).adapters)


# ------------------------------------------------------------ fuse, unfuse
def fuse_lora(model, scale=1.0):
    """Add each dense layer's LoRA, times `scale`, to its kernel, and stop
    adding it in the forward pass (its `lora_alpha` is 0 until
    `unfuse_lora`). Convolution LoRAs and adapters other than the one in
    the LoRA layers are in their kernels already."""
    state = state_of(model)
    if not state.adapters:
        raise ValueError("the model has no LoRA layers to fuse; load_lora_weights or "
                         "enable_lora first.")
    if state.fused:
        raise ValueError("the LoRA is fused already; unfuse_lora() first.")
    for key, layer in state.layers.items():
        merged = layer.lora_alpha * float(scale)
        layer._kernel.assign(ops.convert_to_numpy(layer._kernel)
                             + _lora_product(layer) * (merged / layer.lora_rank))
        state.fused[key] = (layer.lora_alpha, merged)
        layer.lora_alpha = 0.0
    _changed(model)


def unfuse_lora(model):
    """`fuse_lora` undone: the LoRA leaves the kernels (up to rounding) and
    is added in the forward pass again."""
    state = state_of(model)
    if not state.fused:
        raise ValueError("no LoRA is fused into the model's weights.")
    for key, (alpha, merged) in state.fused.items():
        layer = state.layers[key]
        layer._kernel.assign(ops.convert_to_numpy(layer._kernel)
                             - _lora_product(layer) * (merged / layer.lora_rank))
        layer.lora_alpha = alpha
    state.fused.clear()
    _changed(model)


def _lora_product(layer):
    return (ops.convert_to_numpy(layer.lora_kernel_a).astype("float32")
            @ ops.convert_to_numpy(layer.lora_kernel_b).astype("float32"))


# ---------------------------------------------------------------- saving
def _adapter_to_save(state, adapter_name):
    if not state.adapters:
        raise ValueError("the model has no LoRA to save; call enable_lora (then fit) or "
                         "load_lora_weights first.")
    if adapter_name is not None:
        return _known(state, [adapter_name])[0]
    if state.live is not None:
        return state.live
    if len(state.adapters) == 1:
        return next(iter(state.adapters))
    raise ValueError(f"the model holds the LoRA adapters {', '.join(state.adapters)}; name the "
                     "one to save with adapter_name.")


def lora_state_dict(model, format="peft", adapter_name=None):
    """One adapter's LoRA (`adapter_name`; None: the one in the LoRA layers,
    which fit trains) as a `{key: float32 array}` of `format` ("peft" or
    "kohya"), its alphas times the weight it applies at: dense layers' from
    their LoRA matrices, the rest as loaded. peft keys hold `alpha / rank`
    folded into B (readers take such files at scale 1); kohya keys hold B
    and `.alpha`."""
    if format not in ("peft", "kohya"):
        raise ValueError(f"format must be one of peft, kohya; got {format!r}.")
    if format == "kohya" and _network_part(model) not in KOHYA_PREFIXES:
        raise ValueError(f"kohya's layout has no {_family(model)} LoRAs (diffusers' "
                         f"{_family(model)} loader reads none); save with format='peft'.")
    state = state_of(model)
    name = _adapter_to_save(state, adapter_name)
    adapter = state.adapters[name]
    kohya = {part: prefixes[0] for part, prefixes in KOHYA_PREFIXES.items()}
    kohya.update(KOHYA_WRITTEN.get(_family(model), {}))
    unet_names = original_unet_names(model) if kohya.pop("original_unet_names", False) else {}
    out = {}
    for (part, path), (down, up, alpha) in sorted(adapter.entries.items()):
        layer = state.layers.get((part, path)) if name == state.live else None
        if layer is not None:
            down = ops.convert_to_numpy(layer.lora_kernel_a).astype("float32").T
            up = ops.convert_to_numpy(layer.lora_kernel_b).astype("float32").T
        alpha, rank = alpha * adapter.weight, down.shape[0]
        if format == "peft":
            key = DIFFUSERS_PREFIXES[part][0] + path
            out[key + ".lora_A.weight"] = down
            out[key + ".lora_B.weight"] = up * np.float32(alpha / rank)
        else:
            key = kohya[part] + keras_name(unet_names.get(path, path) if part == "unet" else path)
            out[key + ".lora_down.weight"] = down
            out[key + ".lora_up.weight"] = up
            out[key + ".alpha"] = np.asarray(alpha, "float32")
    return {key: np.ascontiguousarray(value, "float32") for key, value in out.items()}


def save_lora_weights(model, path, format="peft", adapter_name=None):
    """Write one adapter's LoRA (see `lora_state_dict`) to `path`: a
    `.safetensors` file, or a folder (made if needed) that gets
    `pytorch_lora_weights.safetensors`, the file diffusers'
    `load_lora_weights` looks for. Written to a temporary file and renamed,
    so a failure leaves nothing half-written. Returns the file's path."""
    from safetensors.numpy import save_file

    tensors = lora_state_dict(model, format=format, adapter_name=adapter_name)
    path = Path(os.fspath(path))
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".safetensors.tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path
