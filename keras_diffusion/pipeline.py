"""The sampling pipeline: the one place that turns a model into a denoiser
and runs sampling loops on it.

It owns the image range at the API boundary ([0, 1] floats or uint8 outside,
[-1, 1] inside), label checking and class names, classifier-free guidance,
calling the network with the sampling (EMA) weights, the cache of compiled
loops and batched runs. `DiffusionModel.generate`, `keras_diffusion.
applications` and `keras_diffusion.export` all go through it.

It works on any model that offers this protocol, and imports no model class:

- `network`: a Keras model called as `network([x_t, t])`, or as
  `network([x_t, t, labels])` when the model is class-conditional; the
  pipeline runs it with `stateless_call`.
- `schedule`: a `DiffusionSchedule`; `prediction`: what the network
  predicts, `"epsilon"`, `"v"` or `"x0"`.
- `sampling_weights`: the variables to sample with, matching
  `network.trainable_variables` one for one (EMA weights, or the raw ones).
- `num_classes`: the number of classes of a conditional network (label
  `num_classes` is the null label of classifier-free guidance), or None;
  `class_names`: a list of names for the classes, or None.
- `text_encoder`, optional: for a prompted model, a Keras model mapping
  token ids `(N, L)` to features `(N, L, D)`, which the network (called as
  `network([x_t, t, context])`) cross-attends to; an encoder that also
  gives a pooled output (a dict with `"pooled_output"`, SDXL's) comes with
  a model method `added_conditions(x_t, pooled, negative=False)`, the
  network's further inputs (`network([x_t, t, context, *added])`) for the
  prompt's branch of guidance or (`negative`) the other; with it, `tokenizer`
  (texts to `(N, L)` int ids), `text_sampling_weights` (matching
  `text_encoder.trainable_variables`) and `empty_prompt_ids`, the `(L,)`
  ids of the empty prompt, its null condition.
- `image_shape`: `(H, W, C)` of the images the model takes and makes;
  `sample_shape`: that of what the samplers run on (the same for a pixel
  model; the latent shape for a latent one).
- `autoencoder`, optional: for a latent model, an `Autoencoder` with a
  measured `scaling_factor` (and optionally a `shift_factor`, subtracted
  first); the samplers then run on its scaled latents (`encode`,
  `decode`) and do not clip to [-1, 1].

A *loop* is a function `loop(denoiser, schedule, *inputs, prediction=...,
**constants)` of pure `keras.ops` (the samplers and the restoration loops of
`keras_diffusion.samplers`): `inputs` are tensors that may change from call
to call, `constants` are Python values (numbers, strings, numpy arrays) that
fix the traced program. `run_loop` compiles each loop once per set of
constants; the cache key is built here from the loop and every constant it
receives, so no caller can forget one.

A *condition* is what a request conditions on, checked by
`check_condition`: None, int32 labels `(N,)` for a class-conditional model,
or for a prompted model int32 token ids `(N, 2, L)`, each image's prompt and
its negative (or empty) prompt. It is batched with the images.
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion import backend
from keras_diffusion import samplers
from keras_diffusion.checks import check_guidance
from keras_diffusion import text
from keras_diffusion.text import check_texts
from keras_diffusion.checks import check_integer


# ----------------------------------------------------------------- ranges
def to_model_range(images):
    """[0, 1] floats or uint8 at the API boundary -> float32 in [-1, 1]."""
    images = ops.convert_to_tensor(images)
    if "int" in str(images.dtype):
        images = ops.cast(images, "float32") / 255.0
    return ops.cast(images, "float32") * 2.0 - 1.0


def from_model_range(x):
    """float32 in [-1, 1] -> numpy float32 in [0, 1]."""
    return np.clip((ops.convert_to_numpy(x) + 1.0) / 2.0, 0.0, 1.0).astype("float32")


def unit_range(x):
    """[-1, 1] -> [0, 1], clipped, as a tensor: `from_model_range` inside a
    traced function (an exported endpoint)."""
    return ops.clip((x + 1.0) / 2.0, 0.0, 1.0)


def _autoencoder(model):
    return getattr(model, "autoencoder", None)


def clips(model):
    """Whether the samplers clip to [-1, 1]: for pixels, not for latents."""
    return _autoencoder(model) is None


def encode(model, images, *, batch_size=None):
    """Images at the API boundary -> the space the samplers run in, as a
    float32 tensor: [-1, 1] pixels, or scaled latents (posterior means)."""
    autoencoder = _autoencoder(model)
    if autoencoder is None:
        return to_model_range(images)
    autoencoder.check_measured()
    latents = autoencoder.encode(images, batch_size=batch_size)
    return ops.convert_to_tensor(scale_latents(autoencoder, latents))


def decode(model, x, *, batch_size=None):
    """A sampler's output -> numpy float32 images in [0, 1]."""
    autoencoder = _autoencoder(model)
    if autoencoder is None:
        return from_model_range(x)
    latents = ops.convert_to_numpy(x) / _scaling_factor(autoencoder) + shift_factor(autoencoder)
    return autoencoder.decode(latents, batch_size=batch_size)


def encode_mask(model, known):
    """A boolean mask of known pixels `(N, H, W, C)` -> float32 `(N,
    *sample_shape)`, 1 where known. For latents a cell counts as known only
    when every pixel of its `f x f` patch, in every channel, is known; the
    rest is generated, and the known pixels are pasted back afterwards."""
    known = np.asarray(known, dtype=bool)
    autoencoder = _autoencoder(model)
    if autoencoder is None:
        return known.astype("float32")
    pad = autoencoder.pad  # the padding is the same in every image: known
    known = np.pad(known, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=True)
    n, height, width, _ = known.shape
    f = autoencoder.factor
    cells = known.all(axis=-1).reshape(n, height // f, f, width // f, f).all(axis=(2, 4))
    shape = (n, height // f, width // f, model.sample_shape[-1])
    return np.broadcast_to(cells[..., np.newaxis], shape).astype("float32")


def decode_tensor(model, x):
    """`decode` inside a traced function (an exported endpoint): a sampler's
    output -> images in [0, 1] as a tensor, decoded with the autoencoder's
    weights as they are traced."""
    autoencoder = _autoencoder(model)
    if autoencoder is None:
        return unit_range(x)
    decoder = autoencoder.decoder
    latents = x / ops.cast(autoencoder.scaling_factor, "float32") + shift_factor(autoencoder)
    weights = [v.value for v in decoder.trainable_variables]
    state = [v.value for v in decoder.non_trainable_variables]
    return unit_range(decoder.stateless_call(weights, state, latents, training=False)[0])


def _scaling_factor(autoencoder):
    autoencoder.check_measured()
    return float(ops.convert_to_numpy(autoencoder.scaling_factor))


def shift_factor(autoencoder):
    """What is subtracted from the latents before scaling (an autoencoder's
    optional `shift_factor`, SD 3's VAE's; 0 when it has none)."""
    return float(getattr(autoencoder, "shift_factor", 0.0) or 0.0)


def scale_latents(autoencoder, latents):
    """Latents as the samplers run on them: `(latents - shift_factor) *
    scaling_factor` (a tensor or an array; the scaling factor as a tensor,
    so that a traced training step reads the variable)."""
    shifted = ops.subtract(ops.cast(latents, "float32"), shift_factor(autoencoder))
    return ops.multiply(shifted, ops.cast(autoencoder.scaling_factor, "float32"))


def call_network(owner, network, x, *, batch_size=None):
    """`network(x)` with its current weights, compiled once per network and
    kept on `owner`, in batches of `batch_size` (None: all at once)."""
    compiled = owner.__dict__.setdefault("_compiled_loops", _CompiledLoops()).functions
    key = ("network", network.name)
    if key not in compiled:
        compiled[key] = backend.current().compile_function(
            lambda weights, state, x: network.stateless_call(weights, state, x, training=False)[0]
        )
    weights = [v.value for v in network.trainable_variables]
    state = [v.value for v in network.non_trainable_variables]
    x = ops.convert_to_tensor(x, dtype="float32")
    total = x.shape[0]
    if not batch_size or batch_size >= total:
        return compiled[key](weights, state, x)
    return ops.concatenate([compiled[key](weights, state, x[start:start + batch_size])
                            for start in range(0, total, batch_size)], axis=0)


# -------------------------------------------- labels, prompts and guidance
def text_encoder(model):
    """The model's text encoder, or None when it takes no prompts."""
    return getattr(model, "text_encoder", None)


def check_condition(model, num_images, guidance_scale, *, labels=None, prompts=None,
                    negative_prompts=None):
    """The condition of a request (see this module's docstring) for
    `num_images` images.

    `labels` (class-conditional models): None, one label for every image,
    or one per image; a label is an index or, when the model has
    `class_names`, a name (any case). `prompts` and `negative_prompts`
    (prompted models): None (the empty prompt), one string for every image
    or one per image; a negative prompt replaces the empty prompt as the
    direction guidance steers away from."""
    encoder = text_encoder(model)
    check_guidance(guidance_scale, model.num_classes is not None or encoder is not None)
    if encoder is None:
        if prompts is not None or negative_prompts is not None:
            raise ValueError(
                "prompts were given, but this model has no text encoder; build it with "
                "text_encoder=... (and a UNet with context_dim) to generate from prompts."
            )
        return check_labels(model, labels, num_images)
    if labels is not None:
        raise ValueError(
            "labels were given, but this model is prompted (it has a text encoder); "
            "pass prompts=... instead, e.g. prompts='a handwritten seven'."
        )
    ids = [tokenize(model, _per_image(texts, num_images, name))
           for texts, name in ((prompts, "prompts"), (negative_prompts, "negative_prompts"))]
    if negative_prompts is None and zeros_for_no_negative(model):
        ids[1] = np.full_like(ids[1], -1)
    return ops.convert_to_tensor(np.stack(ids, axis=1))


def zeros_for_no_negative(model):
    """Whether guidance steers away from zero features, not from the empty
    prompt's, when no negative prompt is given (diffusers' SDXL
    `force_zeros_for_empty_prompt`)."""
    return bool(getattr(model, "force_zeros_for_empty_prompt", False))


def _per_image(texts, num_images, name):
    if texts is None:
        return [""] * num_images
    texts = check_texts(texts, name)
    if len(texts) == 1:
        return texts * num_images
    if len(texts) != num_images:
        raise ValueError(
            f"{name} must be one string or one per image ({num_images}); got {len(texts)}."
        )
    return texts


def tokenize(model, texts):
    """`(N, L)` int32 token ids of `texts` by the model's tokenizer."""
    return text.tokenize(model.tokenizer, texts)


def check_labels(model, labels, num_images):
    """The labels of a request as an int32 tensor `(num_images,)`, or None
    for the null label (see `check_condition`)."""
    if model.num_classes is None:
        if labels is not None:
            raise ValueError(
                "labels were given, but this model is unconditional (its network has no "
                "num_classes); generate without labels."
            )
        return None
    if labels is None:
        return None
    if isinstance(labels, (int, np.integer, str)):
        labels = [labels] * num_images
    labels = [_label_index(model, label) for label in labels]
    if len(labels) != num_images:
        raise ValueError(
            f"labels must have one entry per image ({num_images}); got {len(labels)}."
        )
    return ops.convert_to_tensor(np.asarray(labels, dtype="int32"))


def _label_index(model, label):
    if isinstance(label, str) and not label.isdigit():
        names = [name.lower() for name in (model.class_names or [])]
        if label.lower() not in names:
            accepted = ", ".join(model.class_names) if model.class_names else "integers only"
            raise ValueError(f"unknown class name {label!r}; accepted: {accepted}.")
        return names.index(label.lower())
    index = int(label)
    if not 0 <= index < model.num_classes:
        raise ValueError(
            f"label {label!r} is out of range; accepted: 0 to {model.num_classes - 1}."
        )
    return index


# ---------------------------------------------------- the network, guided
def sampling_state(model):
    """`(weights, state)`: the values of the sampling weights and of the
    non-trainable variables, as `stateless_call` takes them, the network's
    first, then (prompted models) the text encoder's. Inside an export
    trace they are the traced values."""
    weights = [v.value for v in model.sampling_weights]
    state = [v.value for v in model.network.non_trainable_variables]
    encoder = text_encoder(model)
    if encoder is not None:
        weights += [v.value for v in model.text_sampling_weights]
        state += [v.value for v in encoder.non_trainable_variables]
    return weights, state


def network_function(model, weights, state):
    """`inputs -> output` of the network with the given weight values."""
    weights = weights[:len(model.network.trainable_variables)]
    state = state[:len(model.network.non_trainable_variables)]

    def network(inputs, **options):
        output = model.network.stateless_call(weights, state, inputs, training=False,
                                              **options)[0]
        # Shaped like x_t, and now said so: a network of any image size may
        # lose the static batch size inside, which a traced loop
        # (TensorFlow's while_loop) refuses to carry.
        return ops.reshape(output, ops.shape(inputs[0]))

    return network


def compiled_network(model):
    """`(x_t, t, context) -> output` of the network, compiled as the
    sampling loops compile it: the weights are the program's arguments, not
    constants baked into it (JAX would copy every weight into the program,
    8 GB and a minute of compiling at SD 1.5 size). For benchmarks."""
    weights, state = sampling_state(model)
    step = backend.current().compile_function(
        lambda w, s, *inputs: network_function(model, w, s)(list(inputs)))
    return lambda *inputs: step(weights, state, *inputs)


def text_function(model, weights, state, pooled=False):
    """`token ids (N, L) -> features (N, L, D)` of the text encoder with the
    given weight values (the tail of `sampling_state`'s lists); with
    `pooled`, `(features, pooled output)`, the second None for an encoder
    without one (only SDXL's has)."""
    encoder = text_encoder(model)
    weights = weights[len(model.network.trainable_variables):]
    state = state[len(model.network.non_trainable_variables):]

    def encode(ids):
        inputs = text.encoder_inputs(encoder, ids)
        output = encoder.stateless_call(weights, state, inputs, training=False)[0]
        features = ops.cast(text.encoder_features(output), "float32")
        if not pooled:
            return features
        extra = text.encoder_pooled(output)
        return features, None if extra is None else ops.cast(extra, "float32")

    return encode


def empty_condition(model):
    """The condition of no prompt, for one image: `(1, 2, L)` token ids of
    the empty prompt twice (an SDXL model's second row: -1, no prompt)."""
    ids = model.empty_prompt_ids
    negative = np.full_like(ids, -1) if zeros_for_no_negative(model) else ids
    return ops.convert_to_tensor(np.stack([ids, negative])[np.newaxis])


def denoiser(model, weights, state, condition, guidance_scale, skip_guidance=None):
    """The `(x_t, t) -> output` denoiser the samplers take: the network with
    the given weight values, conditioned on `condition` (see this module's
    docstring; None: the null label, or the empty prompt), with
    classifier-free guidance: uncond + w (cond - uncond) (Ho & Salimans 2022
    eq. 6, written so w = 0 is unconditional and w = 1 conditional). For a
    prompted model "uncond" is the negative prompt. `guidance_scale` may be
    a tensor (an exported endpoint's input). `skip_guidance`: the
    constant `skip_layer_guidance` makes, or None."""
    network = network_function(model, weights, state)
    if text_encoder(model) is not None:
        return _prompted(model, network, weights, state, condition, guidance_scale,
                         skip_guidance)
    if model.num_classes is None:
        return lambda x, t: network([x, t])

    def null_labels(x):
        return [ops.full((ops.shape(x)[0],), model.num_classes, dtype="int32")]

    if condition is None:
        return lambda x, t: network([x, t, *null_labels(x)])
    return _guided(network, lambda x: [condition], null_labels, guidance_scale)


def _prompted(model, network, weights, state, condition, guidance_scale, skip_guidance=None):
    """`denoiser` for a prompted model: the network cross-attends to each
    prompt's features, and (SDXL) takes the pooled output and the model's
    `added_conditions` besides. Ids of -1 stand for a prompt that is not
    there (an SDXL model's missing negative prompt, `force_zeros_for_empty_
    prompt`): its features and pooled output are zeros."""
    if condition is None:
        condition = empty_condition(model)
    ids = ops.convert_to_tensor(condition)
    length = ids.shape[-1]
    flat = ops.reshape(ids, (-1, length))
    absent = ops.all(flat < 0, axis=-1)
    empty = ops.convert_to_tensor(model.empty_prompt_ids[np.newaxis], dtype=flat.dtype)
    features, pooled = text_function(model, weights, state, pooled=True)(
        ops.where(flat < 0, empty, flat))
    kept = 1.0 - ops.cast(absent, "float32")
    features = ops.reshape(features * kept[:, None, None],
                           (-1, 2, _length_of(features), features.shape[-1]))
    if pooled is not None:
        pooled = ops.reshape(pooled * kept[:, None], (-1, 2, pooled.shape[-1]))

    def inputs(branch):
        def extra(x):
            context = [_broadcast(features[:, branch], x)]
            if pooled is None:
                return context
            return context + model.added_conditions(x, _broadcast(pooled[:, branch], x),
                                                    negative=branch == 1)
        return extra

    return _guided(network, inputs(0), inputs(1), guidance_scale,
                   _skipping(network, inputs(0), skip_guidance))


def _skipping(network, cond, skip_guidance):
    """`(x, t, cond_out) -> correction` of skip-layer guidance, or None:
    inside the window of network times it is `scale (cond_out - out)`,
    `out` the conditional branch with the named blocks skipped."""
    if skip_guidance is None:
        return None
    layers, scale, low, high = skip_guidance

    def correction(x, t, cond_out):
        def skipped():
            out = ops.cast(network([x, t, *cond(x)], skip_layers=list(layers)), "float32")
            return scale * (cond_out - out)

        time = ops.cast(ops.take(t, 0), "float32")
        return ops.cond(ops.logical_and(time > low, time < high), skipped,
                        lambda: ops.zeros_like(cond_out))

    return correction


def skip_layer_guidance(model, timesteps, sampler, layers, scale, start, stop):
    """The constant of skip-layer guidance (Stability's SD 3.5 sampling
    trick, diffusers' `skip_guidance_layers`): on the steps `i` of a plan
    with `start * n < i < stop * n` (`n` steps), the guided prediction gains
    `scale (cond - cond_skipped)`, `cond_skipped` the conditional branch run
    with the blocks `layers` left out. The steps are found in the loop by
    the network time they call it at: `(layers, scale, low, high)`, the
    window's bounds halfway to the neighbouring steps' times. None when no
    step is in the window. The network must take `skip_layers`."""
    import inspect

    if "skip_layers" not in inspect.signature(model.network.call).parameters:
        raise ValueError(f"skip-layer guidance needs a network that can skip blocks (SD 3's "
                         f"transformer); this model's is a {type(model.network).__name__}.")
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in layers)):
        raise ValueError(f"skip_guidance_layers must be a list of block indices; got "
                         f"{layers!r}.")
    for name, value in (("skip_layer_guidance_start", start),
                        ("skip_layer_guidance_stop", stop)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a fraction in [0, 1]; got {value!r}.")
    schedule, n = model.schedule, len(timesteps)
    times = np.asarray(timesteps, np.float64)
    if getattr(schedule, "flow", False):
        times = times * schedule.timesteps
        if sampler.startswith("dpmpp"):  # the whole timesteps that solver calls at
            times = np.floor(times)
    steps = [i for i in range(n) if start * n < i < stop * n]
    if not steps:
        return None
    first, last = steps[0], steps[-1]
    high = np.inf if first == 0 else (times[first - 1] + times[first]) / 2
    low = -np.inf if last == n - 1 else (times[last] + times[last + 1]) / 2
    return (tuple(int(i) for i in layers), float(scale), float(low), float(high))


def _length_of(features):
    """The token axis of `(N, L, D)` features, static where known."""
    return features.shape[1] if features.shape[1] is not None else ops.shape(features)[1]


def _broadcast(context, x):
    """A context for every image of `x` (one prompt's is repeated)."""
    return ops.broadcast_to(context, (ops.shape(x)[0],) + tuple(context.shape[1:]))


def _guided(network, cond, uncond, guidance_scale, correction=None):
    """Guidance between the network's conditional and unconditional
    branches; `cond(x)` and `uncond(x)` give the network inputs after `x_t`
    and `t` of each (a list: labels, or a context and SDXL's added
    conditions) for a batch `x`. `correction(x, t, cond_out)`, added to
    the guided output: skip-layer guidance's (`_skipping`)."""
    fixed = not ops.is_tensor(guidance_scale)
    if fixed and guidance_scale == 0:
        return lambda x, t: network([x, t, *uncond(x)])
    if fixed and guidance_scale == 1:
        return lambda x, t: network([x, t, *cond(x)])

    def guided(x, t):
        both = network([
            ops.concatenate([x, x], axis=0),
            ops.concatenate([t, t], axis=0),
            *[ops.concatenate([a, b], axis=0) for a, b in zip(cond(x), uncond(x))],
        ])
        cond_out, uncond_out = ops.split(ops.cast(both, "float32"), 2, axis=0)
        guided_out = uncond_out + guidance_scale * (cond_out - uncond_out)
        if correction is not None:
            guided_out = guided_out + correction(x, t, cond_out)
        return guided_out

    return guided


# ------------------------------------------------------- compiled runs
def loop_function(model, loop, *, constants, guidance_scale):
    """`run(weights, state, condition, *inputs)`: `loop` over the guided
    network, uncompiled. `run_loop` compiles it; an export traces it."""

    constants = dict(constants)
    skipping = constants.pop("skip_guidance", None)  # the denoiser's, not the loop's

    def run(weights, state, condition, *inputs):
        guided = denoiser(model, weights, state, condition, guidance_scale, skipping)
        return loop(guided, model.schedule, *inputs, prediction=model.prediction, **constants)

    return run


class _CompiledLoops:
    """A model's compiled loops by key. Not a dict attribute: TensorFlow
    would track a dict on the model and then refuse to save it."""

    def __init__(self):
        self.functions = {}


def run_loop(model, loop, inputs, *, constants=None, condition=None, guidance_scale=1.0,
             batch_size=None, batch_axes=None):
    """Run `loop` compiled, with the sampling weights and guidance, in
    batches of `batch_size` images.

    Args:
        model: a model of the protocol in this module's docstring.
        loop: see this module's docstring.
        inputs: tensors, or None for an absent one; float32.
        constants: keyword arguments of `loop` that fix the program.
        condition: from `check_condition` (labels or prompt token ids), or
            None.
        guidance_scale: classifier-free guidance weight.
        batch_size: images per compiled call; None runs all at once.
        batch_axes: the batch axis of each input (default 0 for all):
            per-step noise `(steps, N, ...)` is split along axis 1.

    Returns:
        The loop's output for all N images, concatenated along axis 0.
    """
    constants = dict(constants or {})
    key = (loop, _freeze(constants), float(guidance_scale), condition is None)
    compiled = model.__dict__.setdefault("_compiled_loops", _CompiledLoops()).functions
    if key not in compiled:
        compiled[key] = backend.current().compile_function(
            loop_function(model, loop, constants=constants, guidance_scale=guidance_scale)
        )
    function = compiled[key]
    weights, state = sampling_state(model)
    inputs = [None if x is None else ops.convert_to_tensor(x, dtype="float32") for x in inputs]
    batch_axes = batch_axes or (0,) * len(inputs)
    total = next(x.shape[axis] for x, axis in zip(inputs, batch_axes) if x is not None)
    if not batch_size or batch_size >= total:
        return function(weights, state, condition, *inputs)
    outputs = []
    for start in range(0, total, batch_size):
        part = slice(start, start + batch_size)
        parts = [None if x is None else x[(slice(None),) * axis + (part,)]
                 for x, axis in zip(inputs, batch_axes)]
        outputs.append(function(weights, state, None if condition is None else condition[part],
                                *parts))
    return ops.concatenate(outputs, axis=0)


def _freeze(value):
    """A hashable stand-in for a constant, equal exactly when the constant is."""
    if isinstance(value, dict):
        return tuple(sorted((name, _freeze(item)) for name, item in value.items()))
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, (int, float, np.number)):
        return float(value) if isinstance(value, (float, np.floating)) else int(value)
    raise TypeError(
        f"a loop constant must be a number, string, bool, None, numpy array, list or tuple; "
        f"got {type(value).__name__}."
    )


def run_sampler(model, x, *, timesteps, sampler, eta=0.0, condition=None, guidance_scale=1.0,
                step_noise=None, batch_size=None, stop=None, skip_guidance=None):
    """Run a sampler from `x` (at `timesteps[0]`) over `timesteps`: x0 as a
    tensor, in [-1, 1] for a pixel model. `step_noise` as
    `samplers.draw_step_noise` draws it. `stop`: run only that many of the
    steps and return the noisy sample they reach (`samplers.run_sampler`).
    `skip_guidance`: `skip_layer_guidance`'s constant, or None."""
    stop = samplers.check_stop(sampler, stop, len(timesteps))
    skipping = {} if skip_guidance is None else {"skip_guidance": skip_guidance}
    return run_loop(
        model, samplers.run_sampler, [x, step_noise],
        constants=dict(timesteps=samplers.plan(timesteps), sampler=sampler,
                       eta=float(eta), clip_x0=clips(model), stop=stop, **skipping),
        condition=condition, guidance_scale=guidance_scale, batch_size=batch_size,
        batch_axes=(0, 1),
    )


def sample(model, num_images, *, steps=50, sampler="ddim", seed=None, labels=None,
           prompts=None, negative_prompts=None, guidance_scale=1.0, eta=0.0,
           timestep_spacing=None, batch_size=None, use_karras_sigmas=None, noise=None,
           image_size=None, denoising_end=None, skip_guidance_layers=None,
           skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
           skip_layer_guidance_stop=0.2):
    """`num_images` samples from pure noise, in the space the samplers run
    in (see `decode`); the arguments are those of `DiffusionModel.generate`.
    `denoising_end`: stop that fraction of the way (`samplers.split_point`)
    and return the noisy samples there, for a refiner to finish.
    `skip_guidance_layers` and the three settings after it: skip-layer
    guidance (`skip_layer_guidance`), with diffusers' defaults."""
    check_integer("num_images", num_images)
    condition = check_condition(model, num_images, guidance_scale, labels=labels, prompts=prompts,
                                negative_prompts=negative_prompts)
    shape = sample_shape(model, image_size)
    if noise is not None:
        noise = check_noise(model, noise, num_images, shape, image_size)
        shape = noise.shape[1:]
    timesteps = samplers.plan_timesteps(
        model.schedule, sampler, steps, eta=eta, spacing=timestep_spacing,
        use_karras_sigmas=use_karras_sigmas, mu=dynamic_shift(model, shape),
    )
    if noise is None:
        noise = keras.random.normal((num_images,) + shape, seed=seed)
    else:
        noise = ops.convert_to_tensor(noise)
    step_seed = None if seed is None else seed + 1
    step_noise = samplers.draw_step_noise(
        noise.shape, sampler, len(timesteps), eta=eta, seed=step_seed, schedule=model.schedule
    )
    stop = (None if denoising_end is None
            else samplers.split_point(model.schedule, timesteps, denoising_end))
    skipping = None
    if skip_guidance_layers is not None and guidance_scale != 1:
        skipping = skip_layer_guidance(model, timesteps, sampler, skip_guidance_layers,
                                       skip_layer_guidance_scale, skip_layer_guidance_start,
                                       skip_layer_guidance_stop)
    return run_sampler(
        model, noise, timesteps=timesteps, sampler=sampler, eta=eta, condition=condition,
        guidance_scale=guidance_scale, step_noise=step_noise, batch_size=batch_size, stop=stop,
        skip_guidance=skipping,
    )


def dynamic_shift(model, shape):
    """The `mu` of a flow schedule that shifts by the image
    (`use_dynamic_shifting`) for samples of `shape` `(h, w, C)`: from its
    token count, h * w over the network's patch area (1 for a UNet); None
    for every other schedule."""
    schedule = model.schedule
    if not getattr(schedule, "use_dynamic_shifting", False):
        return None
    patch = getattr(model.network, "patch_size", 1)
    return schedule.mu_for(shape[0] * shape[1] // (patch * patch))


# ------------------------------------------------------------ image sizes
def size_multiple(model):
    """The multiple of which every image side must be: the network's
    downsampling factor, times the autoencoder's for a latent model."""
    autoencoder = _autoencoder(model)
    return (getattr(model.network, "downsampling_factor", 1)
            * (1 if autoencoder is None else autoencoder.factor))


def flexible_size(model):
    """Whether the network takes inputs of any (divisible) height and width
    (a functional network with free height and width: a subclassed one,
    which declares no inputs, is taken at the model's size)."""
    inputs = getattr(model.network, "inputs", None)
    return bool(inputs) and None in tuple(inputs[0].shape[1:3])


def training_image_shape(model, images):
    """`(H, W, C)` at which `fit` takes `images` (NHWC): the model's own
    size, or, where the network takes any size it divides (the Stable
    Diffusion parts), the images' own size when it divides (what diffusers'
    training scripts' `--resolution` chooses). A size that does not divide
    is refused in one line."""
    if not flexible_size(model) or np.ndim(images) != 4:
        return tuple(model.image_shape)
    height, width = images.shape[1:3]
    multiple = size_multiple(model)
    if height % multiple or width % multiple:
        own = f"{model.image_shape[0]}x{model.image_shape[1]}"
        raise ValueError(
            f"the training images are {height}x{width}, a size this model cannot divide: both "
            f"sides must be multiples of {multiple} (its own size is {own}); resize or crop "
            f"them first, e.g. keras_diffusion.load_image_folder(folder, "
            f"image_size=({model.image_shape[0]}, {model.image_shape[1]})).")
    return (None, None, model.image_shape[-1])


def sample_shape(model, image_size=None):
    """`(h, w, C)` of one sample the samplers run on, for images of
    `image_size` `(H, W)`; None: the model's own size."""
    if image_size is None:
        return tuple(model.sample_shape)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(side, (int, np.integer)) and side > 0 for side in image_size)):
        raise ValueError(f"image_size must be (height, width), two positive integers; "
                         f"got {image_size!r}.")
    height, width = (int(side) for side in image_size)
    if not flexible_size(model):
        if (height, width) != tuple(model.image_shape[:2]):
            raise ValueError(f"this model makes {model.image_shape[0]}x{model.image_shape[1]} "
                             f"images only; got image_size={image_size!r}.")
        return tuple(model.sample_shape)
    multiple = size_multiple(model)
    if height % multiple or width % multiple:
        raise ValueError(f"image_size {height}x{width} does not divide: both sides must be "
                         f"multiples of {multiple} for this model.")
    autoencoder = _autoencoder(model)
    factor = 1 if autoencoder is None else autoencoder.factor
    return (height // factor, width // factor, model.sample_shape[-1])


def check_noise(model, noise, num_images, shape, image_size):
    """`noise` given to `generate` as float32 numpy `(num_images, *shape)`:
    the starting point of the samplers, shaped like the samples (NHWC
    latents for a latent model); with no `image_size` its height and width
    set the size."""
    noise = np.asarray(ops.convert_to_numpy(noise) if ops.is_tensor(noise) else noise)
    kind = "latents" if _autoencoder(model) is not None else "images"
    if noise.ndim != 4 or not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"noise must be float {kind} of shape (N, height, width, channels), NHWC; "
                         f"got {noise.dtype} of shape {noise.shape}.")
    if image_size is None and flexible_size(model):
        autoencoder = _autoencoder(model)
        factor = 1 if autoencoder is None else autoencoder.factor
        shape = sample_shape(model, (noise.shape[1] * factor, noise.shape[2] * factor))
    if noise.shape != (num_images,) + tuple(shape):
        raise ValueError(f"noise must have shape {(num_images,) + tuple(shape)} (one {kind} "
                         f"sample per image, NHWC); got {noise.shape}.")
    if not np.isfinite(noise).all():
        raise ValueError("noise holds NaN or infinite values.")
    return noise.astype("float32")
