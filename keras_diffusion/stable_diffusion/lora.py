"""LoRA (Hu et al. 2021) for Stable Diffusion: Keras' own `enable_lora` on
the dense layers of the UNet and text encoder, and the LoRA files the
PyTorch world shares, read and written.

A LoRA adds `(alpha / rank) * B @ A` to a layer's weight `W` (`(out, in)`
in the reference layout), `A` `(rank, in)` and `B` `(out, rank)`. Keras'
`Dense` holds `W` transposed as `kernel` `(in, out)`, and after
`enable_lora(rank)` adds `(lora_alpha / lora_rank) * lora_kernel_a @
lora_kernel_b`, so `lora_kernel_a` is `A` transposed and `lora_kernel_b`
is `B` transposed. A `scale` given when a file is loaded multiplies
`alpha`, as diffusers' adapter weights do.

Two file formats, the ones people share (`FORMATS`):

- diffusers / peft, as diffusers' `save_lora_weights` and its training
  scripts write `pytorch_lora_weights.safetensors`:
  `unet.<module path>.lora_A.weight` `(rank, in)` and `.lora_B.weight`
  `(out, rank)`, the text encoder's under `text_encoder.` (with or without
  transformers' `text_model.`); alphas from `.alpha` keys or from the
  file's `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`),
  else `alpha = rank`;
- kohya (sd-scripts; what AUTOMATIC1111 and ComfyUI users share):
  `lora_unet_<module path, "_" for ".">.lora_down.weight`, `.lora_up.weight`
  and `.alpha`; `lora_te_` for the text encoder.

LoRAs of convolutions (kohya's `proj_in` / `proj_out` of SD 1.x, LoCon's
resnet convolutions) are added to the kernels when loaded: the PyTorch
backend runs convolutions on a kernel of its own (`backend.conv2d`) that
reads the kernel variable, not Keras' LoRA sum. Only dense layers keep a
separate, trainable LoRA. Files are written in the peft format with each
`alpha / rank` folded into `B`, which every reader takes at scale 1.

The functions take the `StableDiffusion` model; its LoRA bookkeeping is a
`LoraState` kept outside Keras' tracking.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.vae import keras_name

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_PREFIX = "text_model."  # transformers' CLIPTextModel before version 5

# The model's parts a LoRA may touch: file name -> model attribute.
PARTS = {"unet": "network", "text_encoder": "text_encoder"}

# How each format names a module's matrices: the part's key prefix, how a
# module path is spelled, and the suffixes of A (down), B (up) and alpha.
FORMATS = {
    "peft": {"prefixes": {"unet": "unet.", "text_encoder": "text_encoder."},
             "spell": lambda path: path, "down": ".lora_A.weight", "up": ".lora_B.weight",
             "alpha": ".alpha"},
    "kohya": {"prefixes": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
              "spell": keras_name, "down": ".lora_down.weight", "up": ".lora_up.weight",
              "alpha": ".alpha"},
}
# Key prefixes of LoRAs for other model families, named in the error.
# kohya names SDXL's UNet modules as the original (SGM) layout does.
FOREIGN_PREFIXES = {"lora_te1_": "SDXL", "lora_te2_": "SDXL", "text_encoder_2.": "SDXL",
                    "lora_unet_input_blocks_": "SDXL", "lora_unet_middle_block_": "SDXL",
                    "lora_unet_output_blocks_": "SDXL", "transformer.": "SD3 / Flux",
                    "lora_transformer_": "SD3 / Flux"}
# Parts of LoRA variants this module does not read.
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA biases",
               "hada_": "LoHa", "lokr_": "LoKr"}


class LoraState:
    """A model's LoRA: the dense layers with Keras' LoRA enabled, by
    `(part, module path)`; the convolution LoRAs added to kernels at load
    (`(down, up, alpha)` in the reference layout, alpha times the scale),
    kept to be saved; and the layers `fuse_lora` merged, with the
    `(lora_alpha, merged alpha)` to restore."""

    def __init__(self):
        self.layers = {}
        self.merged = {}
        self.fused = {}
        self.enabled_by_user = False


def state_of(model):
    """The model's `LoraState` (an empty one for a model without LoRA)."""
    return model.__dict__.setdefault("_lora_state", LoraState())


def has_lora(model):
    state = state_of(model)
    return bool(state.layers or state.merged)


# ------------------------------------------------------------ the layers
def module_layers(part):
    """`{module path: layer}` of a part's dense and convolution layers."""
    found = {}
    for layer in part._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, (layers.Dense, layers.Conv2D)) and hasattr(layer, "module_path"):
            found[layer.module_path] = layer
    return found


def _parts(model):
    return {name: getattr(model, attribute) for name, attribute in PARTS.items()}


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
    if any(part == "text_encoder" for part, _ in state.layers):
        model.text_encoder.trainable = True
    for part in _parts(model).values():
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
    of `targets` (and, with `text_encoder`, on the text encoder's: True
    for `TEXT_TARGETS`, or a list of suffixes); A drawn as peft draws it,
    B zero, so the model's function starts unchanged. Afterwards only the
    LoRA matrices are trainable. `alpha` None is `rank` (scale 1)."""
    state = state_of(model)
    if state.layers or state.merged:
        how = "enable_lora was called" if state.enabled_by_user else "a LoRA was loaded"
        raise ValueError(f"the model already has LoRA layers ({how}); enable_lora is called "
                         "once per model. Load trained LoRA weights with load_lora_weights.")
    _check_model(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank!r}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or alpha <= 0):
        raise ValueError(f"alpha must be a positive number or None (= rank); got {alpha!r}.")
    chosen = {("unet", path): layer for path, layer in
              _target_layers(model.network, _check_targets(targets, "targets"),
                             "target").items()}
    if text_encoder:
        text_targets = TEXT_TARGETS if text_encoder is True else text_encoder
        text_targets = _check_targets(text_targets, "text_encoder")
        chosen.update({("text_encoder", path): layer for path, layer in
                       _target_layers(model.text_encoder, text_targets, "text target").items()})
    initializer = _peft_a_initializer(seed)
    for key, layer in chosen.items():
        _enable(layer, rank, rank if alpha is None else alpha, initializer)
        state.layers[key] = layer
    state.enabled_by_user = True
    _set_trainable(model)
    _changed(model)


# ------------------------------------------------------------- reading files
def _resolve(path, what):
    path = Path(os.fspath(path))
    if path.is_dir():
        candidates = [path / WEIGHT_NAME] if (path / WEIGHT_NAME).is_file() else sorted(
            path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{path} holds {'no' if not candidates else 'several'} .safetensors files; "
                f"expected {WEIGHT_NAME} (or one .safetensors file), or pass the {what} file.")
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
    holding `pytorch_lora_weights.safetensors`."""
    from keras_diffusion.stable_diffusion import single_file

    path = _resolve(path, "LoRA")
    return single_file.read_weights(path), _metadata(path)


def _split_key(key, tables):
    """`(format, part, module path, kind)` of a LoRA key, kind one of
    `"down"`, `"up"`, `"alpha"`; None where the key is not one of ours."""
    for name, spec in FORMATS.items():
        for part, prefix in spec["prefixes"].items():
            if not key.startswith(prefix):
                continue
            for kind in ("down", "up", "alpha"):
                if not key.endswith(spec[kind]):
                    continue
                spelled = key[len(prefix):-len(spec[kind])]
                names = tables[part][name]
                # transformers 5 names the text encoder's modules without text_model.
                for candidate in (spelled, spec["spell"](TEXT_PREFIX) + spelled):
                    if candidate in names:
                        return name, part, names[candidate], kind
                return name, part, None, kind
    return None


def _alpha_from_metadata(metadata, part, path, rank):
    """The alpha peft's config gives module `path` (None without one)."""
    config = {key[len(part) + 1:]: value for key, value in metadata.items()
              if key.startswith(part + ".")}
    if not config:
        return None
    if config.get("use_dora"):
        raise ValueError("the LoRA is a DoRA (use_dora in its metadata), which keras_diffusion "
                         "does not load.")
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
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


def parse(state, metadata, model):
    """`{(part, module path): (down, up, alpha)}` of a LoRA state dict for
    `model`, alpha None where the file gives none; raises one `ValueError`
    naming the first keys that do not fit."""
    modules = {part: module_layers(model_part) for part, model_part in _parts(model).items()}
    tables = {part: {name: {spec["spell"](path): path for path in paths}
                     for name, spec in FORMATS.items()} for part, paths in modules.items()}
    found, problems = {}, []
    for key in sorted(state):
        variant = next((name for marker, name in UNSUPPORTED.items() if marker in key), None)
        if variant:
            problems.append(f"{key} ({variant}, not supported)")
            continue
        family = next((family for prefix, family in FOREIGN_PREFIXES.items()
                       if key.startswith(prefix)), None)
        split = _split_key(key, tables)
        if family or split is None:
            reason = f"a key of {family} LoRAs" if family else "not a LoRA key"
            problems.append(f"{key} ({reason})")
            continue
        _, part, path, kind = split
        if path is None:
            problems.append(f"{key} (names no module of the {part})")
            continue
        found.setdefault((part, path), {})[kind] = np.asarray(state[key], "float32")
    entries = {}
    for (part, path), matrices in found.items():
        if "down" not in matrices or "up" not in matrices:
            missing = "up" if "up" not in matrices else "down"
            problems.append(f"{part} {path} (its {missing} matrix is missing)")
            continue
        down, up = matrices["down"], matrices["up"]
        layer = modules[part][path]
        if not _fits(layer, down, up):
            problems.append(f"{part} {path} (shapes {down.shape} and {up.shape} do not fit its "
                            f"weight of shape {_reference_shape(layer)})")
            continue
        alpha = matrices.get("alpha")
        alpha = (float(np.reshape(alpha, ())) if alpha is not None
                 else _alpha_from_metadata(metadata, part, path, down.shape[0]))
        entries[(part, path)] = (down, up, alpha)
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"the LoRA does not fit this model: {'; '.join(problems[:5])}{more}. It may be a "
            "LoRA for another architecture (SDXL, or SD 2.x weights on an SD 1.x model); "
            "keras_diffusion reads diffusers/peft and kohya LoRAs of SD 1.x / 2.x."
        )
    if not entries:
        raise ValueError("the LoRA file holds no LoRA weights.")
    return entries


# -------------------------------------------------------------- loading
def _conv_delta(down, up, kernel_shape):
    """`up @ down` as a convolution kernel in Keras' `(kh, kw, in, out)`."""
    kh, kw = kernel_shape[:2]
    if down.ndim == 2:
        down = down.reshape(down.shape + (kh, kw))
    up = up.reshape(up.shape[0], up.shape[1])
    delta = np.einsum("or,rihw->oihw", up, down)
    return weights.to_keras(delta, "conv")


def load_lora_weights(model, path, scale=1.0):
    """Load a LoRA file (see the module docstring for the formats) with its
    strength times `scale`. On a model without LoRA this enables Keras'
    LoRA on the file's dense layers, with the file's ranks; on a model with
    LoRA layers (`enable_lora`, or a LoRA loaded before) the file replaces
    their values, and must fit their modules and ranks (e.g. to resume
    training). Convolution LoRAs are added to their kernels. Afterwards
    only the LoRA matrices are trainable."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}.")
    _check_model(model)
    state = state_of(model)
    if state.fused:
        raise ValueError("a LoRA is fused into the weights; call unfuse_lora() before loading "
                         "another.")
    tensors, metadata = read_file(path)
    entries = parse(tensors, metadata, model)
    dense = {key: entry for key, entry in entries.items()
             if isinstance(_layer(model, key), layers.Dense)}
    if state.layers:
        _check_fits_enabled(state, dense)
    _unmerge_convolutions(model, state)
    updates = []
    for key, (down, up, alpha) in entries.items():
        rank = down.shape[0]
        alpha = float(rank if alpha is None else alpha) * float(scale)
        layer = _layer(model, key)
        if key in dense:
            updates.append((layer, key, _as_matrix(down, rank).T,
                            _as_matrix(up, up.shape[0]).T, alpha))
        else:
            delta = _conv_delta(down, up, layer.kernel.shape) * (alpha / rank)
            layer.kernel.assign(ops.convert_to_numpy(layer.kernel) + delta)
            state.merged[key] = (down, up, alpha)
    for key, layer in state.layers.items():
        if key not in dense:  # a layer the file leaves out contributes nothing
            layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, "float32"))
    for layer, key, a, b, alpha in updates:
        if not layer.lora_enabled:
            _enable(layer, a.shape[1], alpha)
            state.layers[key] = layer
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
        layer.lora_alpha = alpha
    _set_trainable(model)
    _changed(model)


def _unmerge_convolutions(model, state):
    """Take the convolution LoRAs loaded before out of their kernels."""
    for key, (down, up, alpha) in state.merged.items():
        layer = _layer(model, key)
        delta = _conv_delta(down, up, layer.kernel.shape) * (alpha / down.shape[0])
        layer.kernel.assign(ops.convert_to_numpy(layer.kernel) - delta)
    state.merged.clear()


def _layer(model, key):
    part, path = key
    return module_layers(getattr(model, PARTS[part]))[path]


def _check_fits_enabled(state, dense):
    problems = []
    for key, (down, _, _) in sorted(dense.items()):
        layer = state.layers.get(key)
        if layer is None:
            problems.append(f"{key[0]} {key[1]} (no LoRA layer there)")
        elif down.shape[0] != layer.lora_rank:
            problems.append(f"{key[0]} {key[1]} (rank {down.shape[0]}, the layer's "
                            f"{layer.lora_rank})")
    problems.sort(key=lambda problem: "no LoRA layer" in problem)  # ranks first
    if problems:
        raise ValueError(
            "the LoRA does not fit the model's LoRA layers (enabled before, by enable_lora or "
            f"an earlier load): {'; '.join(problems[:5])}. Load it into a model without LoRA "
            "(load the checkpoint again), or enable_lora with the file's rank and modules."
        )


# ------------------------------------------------------------ fuse, unfuse
def fuse_lora(model, scale=1.0):
    """Add each dense layer's LoRA, times `scale`, to its kernel, and stop
    adding it in the forward pass (its `lora_alpha` is 0 until
    `unfuse_lora`). Convolution LoRAs are in their kernels already."""
    state = state_of(model)
    if not state.layers:
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
def lora_state_dict(model, format="peft"):
    """The model's LoRA as a `{key: float32 array}` of `format` ("peft" or
    "kohya"): dense layers' from their LoRA matrices, convolutions' as they
    were loaded. peft keys hold `alpha / rank` folded into B (readers take
    such files at scale 1); kohya keys hold B as trained and `.alpha`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}.")
    state = state_of(model)
    if not has_lora(model):
        raise ValueError("the model has no LoRA to save; call enable_lora (then fit) or "
                         "load_lora_weights first.")
    matrices = {}
    for key, layer in state.layers.items():
        alpha = state.fused[key][0] if key in state.fused else layer.lora_alpha
        down = ops.convert_to_numpy(layer.lora_kernel_a).astype("float32").T
        up = ops.convert_to_numpy(layer.lora_kernel_b).astype("float32").T
        matrices[key] = (down, up, alpha)
    matrices.update(state.merged)
    spec = FORMATS[format]
    out = {}
    for (part, path), (down, up, alpha) in sorted(matrices.items()):
        name = spec["prefixes"][part] + spec["spell"](path)
        rank = down.shape[0]
        if format == "peft":
            out[name + spec["down"]] = down
            out[name + spec["up"]] = up * np.float32(alpha / rank)
        else:
            out[name + spec["down"]] = down
            out[name + spec["up"]] = up
            out[name + spec["alpha"]] = np.asarray(alpha, "float32")
    return {key: np.ascontiguousarray(value, "float32") for key, value in out.items()}


def save_lora_weights(model, path, format="peft"):
    """Write the model's LoRA to `path`: a `.safetensors` file, or a folder
    (made if needed) that gets `pytorch_lora_weights.safetensors`, the
    file diffusers' `load_lora_weights` looks for. Written to a temporary
    file and renamed, so a failure leaves nothing half-written. Returns
    the file's path."""
    from safetensors.numpy import save_file

    tensors = lora_state_dict(model, format=format)
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
