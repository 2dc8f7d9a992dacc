"""Export a diffusion model for serving, from any backend.

It works on any model of the sampling pipeline's protocol
(`keras_diffusion.pipeline`), and its endpoints trace the very functions
the pipeline compiles for sampling in Python.

`export_saved_model` writes a TensorFlow SavedModel whose endpoints need
nothing of keras_diffusion or Keras when loaded: `tf.saved_model.load(path)`
alone serves them. Images are NHWC float32 and the batch size `B` is free.

| endpoint | inputs | output |
| --- | --- | --- |
| `generate` | `noise` (B, H, W, C) standard normal (a latent model: (B, h, w, c), its latents' shape) | images (B, H, W, C) in [0, 1] |
| `generate_conditional` (conditional models) | `noise`, `labels` (B,) int32, `guidance` () float32 | images in [0, 1] |
| `generate_from_tokens` (prompted models) | `noise`, `token_ids` (B, L) int32, `guidance` () float32 | images in [0, 1] |
| `denoise` (pixel models) | `images` (B, H, W, C) in [0, 1], `sigma` () float32 | images in [0, 1] |
| `predict_noise` | `x_t` (B, H, W, C) in [-1, 1] (or scaled latents), `t` (B,) int32 (float32 `sigma * timesteps` on a flow schedule) (, `labels` (B,) int32 when conditional; `token_ids` (B, L) int32 when prompted) | epsilon, x_t's shape |

A latent model's `generate` decodes with its autoencoder inside the endpoint.
A prompted model's endpoints encode the token ids with its text encoder
inside; guidance steers away from the empty prompt, which `generate` and
`denoise` use. Its tokenizer does not run in the SavedModel: a
`WordTokenizer` is written beside it as `assets/tokenizer.json` (the
vocabulary in id order, special tokens first, `max_length` and the word
pattern), from which a server tokenises prompts in a few lines of Python
(see the README).

`generate` runs the sampler loop that `DiffusionModel.generate` runs, with
the sampler and number of steps fixed at export; a stochastic sampler
(`"ddpm"`, `"dpmpp_2m_sde"`, DDIM with `eta > 0`) takes its per-step noise as
a second input, `step_noise` (steps, B, H, W, C), so the artifact holds no
random state. `denoise` takes `sigma`, the noise std on the [0, 1] scale, at
run time. `generate` and `denoise` of a conditional model use its null
label. Every endpoint uses the sampling (EMA) weights, and for the same
noise `generate` and `denoise` match `DiffusionModel.generate` / `.denoise`
within 1e-4.

TensorFlow exports natively and JAX through `jax2tf` inside
`keras.export.ExportArchive`. PyTorch cannot trace these endpoints into a
SavedModel, so under PyTorch the model is saved to a temporary `.keras` file
and exported by a Python subprocess running the TensorFlow backend (custom
layers in the network must then be registered on import of their module).

`export_onnx` writes one network evaluation, `predict_noise`, as ONNX through
Keras' own `export(format="onnx")`.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
from keras import ops

from keras_diffusion import backend
from keras_diffusion import pipeline
from keras_diffusion import samplers
from keras_diffusion.schedule import check_steps

# The subprocess that exports a `.keras` file under the TensorFlow backend.
_TENSORFLOW_EXPORT = (
    "import json, sys\n"
    "import keras_diffusion\n"
    "from keras_diffusion.export import export_saved_model\n"
    "model_path, path, options = json.loads(sys.argv[1])\n"
    "export_saved_model(keras_diffusion.load_model(model_path), path, **options)\n"
)


def export_model(model, filepath, *, format="tf_saved_model", verbose=None, input_signature=None,
                 **kwargs):
    """What `DiffusionModel.export` does; see there."""
    if getattr(model, "requires_aesthetics_score", False):
        raise ValueError("an SDXL refiner does not export: its endpoints would make images from "
                         "noise, and a refiner refines images (img2img in Python).")
    if format == "tf_saved_model":
        if input_signature is not None:
            raise ValueError(
                "input_signature does not apply to a diffusion SavedModel: its endpoints "
                "(generate, denoise, predict_noise) define their own inputs. Leave it out."
            )
        return export_saved_model(model, filepath, verbose=bool(verbose), **kwargs)
    if format == "onnx":
        return export_onnx(model, filepath, verbose=verbose, input_signature=input_signature,
                           **kwargs)
    raise ValueError(
        f"format must be 'tf_saved_model' (generate, denoise and predict_noise endpoints) "
        f"or 'onnx' (predict_noise); got {format!r}."
    )


def export_saved_model(
    model,
    path,
    *,
    steps=50,
    sampler="ddim",
    eta=0.0,
    timestep_spacing=None,
    denoise_steps=10,
    verbose=False,
):
    """Write `model` as a TensorFlow SavedModel with the endpoints listed in
    this module's docstring.

    Args:
        model: a `DiffusionModel`.
        path: the SavedModel directory to write.
        steps: sampler steps of `generate` and `generate_conditional`.
        sampler: one of `keras_diffusion.SAMPLERS`.
        eta: DDIM stochasticity, as in `DiffusionModel.generate`.
        timestep_spacing: as in `DiffusionModel.generate`.
        denoise_steps: denoiser evaluations of `denoise`, spread from the
            noise level down to 0 as in `DiffusionModel.denoise` (whose
            default, 10, it shares).
        verbose: print the endpoints Keras wrote.

    Under PyTorch the export runs in a subprocess with the TensorFlow backend
    (the model is passed through a temporary `.keras` file).
    """
    options = dict(steps=steps, sampler=sampler, eta=eta, timestep_spacing=timestep_spacing,
                   denoise_steps=denoise_steps)
    # Validate here, so a bad argument fails before any work (or subprocess).
    timesteps = samplers.plan_timesteps(
        model.schedule, sampler, steps, eta=eta, spacing=timestep_spacing,
        mu=pipeline.dynamic_shift(model, model.sample_shape),
    )
    check_steps(denoise_steps, model.schedule.timesteps)
    if not backend.traces_saved_models():
        return _export_under_tensorflow(model, path, options)
    from keras_diffusion.quiet import import_tensorflow

    tf = import_tensorflow()

    archive = keras.export.ExportArchive()
    archive.track(_SamplingVariables(model))
    endpoints = _endpoints(
        model, timesteps=timesteps, sampler=sampler, eta=eta, denoise_steps=denoise_steps
    )
    for name, fn, signature in endpoints:
        archive.add_endpoint(name, fn, signature, **backend.endpoint_options(signature))
    # Serving needs no gradients; tracing them would trace every loop again.
    no_gradients = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    archive.write_out(os.fspath(path), options=no_gradients, verbose=verbose)
    if pipeline.text_encoder(model) is not None:
        _write_tokenizer(model, path)


def _write_tokenizer(model, path):
    """`assets/tokenizer.json` of a SavedModel (a CLIP tokenizer's folder,
    `assets/tokenizer/`): what a server needs to turn prompts into the
    token ids of `generate_from_tokens`."""
    from keras_diffusion.images import atomic_write
    from keras_diffusion.text import SPECIAL_TOKENS
    from keras_diffusion.text import WordTokenizer
    from keras_diffusion.text import WORD_PATTERN

    tokenizer = model.tokenizer
    if hasattr(tokenizer, "save_folder"):  # CLIP's: the files transformers reads too
        tokenizer.save_folder(os.path.join(os.fspath(path), "assets", "tokenizer"))
        return
    if not isinstance(tokenizer, WordTokenizer):
        return  # e.g. a KerasHub tokenizer: serve it with its own preset files
    record = {
        "vocabulary": list(SPECIAL_TOKENS) + list(tokenizer.vocabulary),
        "max_length": tokenizer.max_length,
        "pattern": WORD_PATTERN,
        "lowercase": True,
        "special_tokens": {"pad": 0, "unknown": 1, "start": 2, "end": 3},
    }
    assets = os.path.join(os.fspath(path), "assets")
    os.makedirs(assets, exist_ok=True)
    atomic_write(os.path.join(assets, "tokenizer.json"),
                 lambda temp: open(temp, "w").write(json.dumps(record, indent=1) + "\n"))


def _endpoints(model, *, timesteps, sampler, eta, denoise_steps):
    """`(name, fn, input_signature)` of each SavedModel endpoint."""
    sample_shape = (None,) + model.sample_shape
    spec = {
        "noise": _spec("noise", sample_shape),
        "step_noise": _spec("step_noise", (len(timesteps),) + sample_shape),
        "labels": _spec("labels", (None,), "int32"),
        "guidance": _spec("guidance", ()),
        "images": _spec("images", (None,) + model.image_shape),
        "sigma": _spec("sigma", ()),
        "x_t": _spec("x_t", sample_shape),
        "t": _spec("t", (None,), _time_dtype(model)),
    }
    prompted = pipeline.text_encoder(model) is not None
    if prompted:
        empty = ops.convert_to_tensor(model.empty_prompt_ids)
        spec["token_ids"] = _spec("token_ids", (None, empty.shape[0]), "int32")

        if pipeline.zeros_for_no_negative(model):  # SDXL: away from zero features
            empty = ops.full_like(empty, -1)

        def condition(token_ids):  # each prompt, and the empty prompt to guide away from
            return ops.stack([token_ids, ops.broadcast_to(empty, ops.shape(token_ids))], axis=1)

    constants = dict(timesteps=timesteps, sampler=sampler, eta=float(eta),
                     clip_x0=pipeline.clips(model))

    def sample(noise, step_noise=None, condition_input=None, guidance=1.0):
        # The very loop `DiffusionModel.generate` compiles: same numerics.
        # `condition_input`: labels, or a prompted model's token ids.
        run = pipeline.loop_function(
            model, samplers.run_sampler, constants=constants, guidance_scale=guidance
        )
        weights, state = pipeline.sampling_state(model)
        if prompted and condition_input is not None:
            condition_input = condition(condition_input)
        return pipeline.decode_tensor(model, run(weights, state, condition_input, noise, step_noise))

    if not samplers.SAMPLERS[sampler].needs_noise(eta, model.schedule):
        def generate(noise):
            return sample(noise)

        def generate_conditional(noise, labels, guidance):
            return sample(noise, None, labels, guidance)

        noises = ["noise"]
    else:  # a stochastic sampler takes its per-step noise as an input
        def generate(noise, step_noise):
            return sample(noise, step_noise)

        def generate_conditional(noise, step_noise, labels, guidance):
            return sample(noise, step_noise, labels, guidance)

        noises = ["noise", "step_noise"]

    def denoise(images, sigma):
        # As DiffusionModel.denoise: noise of std sigma on the [0, 1] scale
        # is 2 sigma on the model's, the noise of some timestep t, from which
        # DDIM runs; here t is found at run time (in float32).
        t = model.schedule.timestep_for_noise_std(2.0 * sigma)
        x_t = model.schedule.x_t_from_noisy(ops.cast(images, "float32") * 2.0 - 1.0, t)
        guided = pipeline.denoiser(model, *pipeline.sampling_state(model), None, 1.0)
        if getattr(model.schedule, "flow", False):  # t is a sigma; its plan is arithmetic
            x0 = samplers.run_euler_from(guided, model.schedule, x_t, t, steps=denoise_steps,
                                         prediction=model.prediction)
        else:
            x0 = samplers.run_ddim_from(
                guided, model.schedule, x_t, t,
                plan=lambda start: samplers.partial_timesteps(start, denoise_steps),
                prediction=model.prediction,
            )
        return pipeline.unit_range(x0)

    def predict_noise(x_t, t, labels=None):
        weights, state = pipeline.sampling_state(model)
        added = []
        if prompted:
            labels, pooled = pipeline.text_function(model, weights, state, pooled=True)(labels)
            if pooled is not None:  # SDXL: the pooled prompt and the default time ids
                added = model.added_conditions(x_t, pooled)
        inputs = [x_t, t] if labels is None else [x_t, t, labels, *added]
        output = pipeline.network_function(model, weights, state)(inputs)
        return _noise_from_output(model.schedule, x_t, output, t, model.prediction)

    labels = ["labels"] if model.num_classes is not None else ["token_ids"] if prompted else []
    endpoints = [("generate", generate, noises)]
    if model.num_classes is not None:
        endpoints.append(("generate_conditional", generate_conditional, noises + labels + ["guidance"]))
    if prompted:
        endpoints.append(("generate_from_tokens", generate_conditional, noises + labels + ["guidance"]))
    if pipeline.clips(model):  # a pixel model; a latent one cannot denoise (see applications)
        endpoints.append(("denoise", denoise, ["images", "sigma"]))
    endpoints.append(("predict_noise", predict_noise, ["x_t", "t"] + labels))
    return [(name, fn, [spec[i] for i in inputs]) for name, fn, inputs in endpoints]


class _SamplingVariables(keras.layers.Layer):
    """The variables the endpoints read: the sampling (EMA) weights and the
    network's non-trainable state. Tracked instead of the model, the archive
    saves neither the raw weights nor the optimizer, and does not walk the
    model's Python caches (its compiled samplers, which TensorFlow cannot
    save)."""

    def __init__(self, model):
        super().__init__(name="sampling_variables")
        self.weights_used = list(model.sampling_weights)
        self.state_used = list(model.network.non_trainable_variables)
        if pipeline.text_encoder(model) is not None:  # prompted: the text encoder's too
            self.text_weights_used = list(model.text_sampling_weights)
            self.text_state_used = list(model.text_encoder.non_trainable_variables)
        autoencoder = getattr(model, "autoencoder", None)
        # A latent model's generate decodes: the decoder and the scaling factor.
        self.decoder_used = [] if autoencoder is None else (
            list(autoencoder.decoder.variables) + [autoencoder.scaling_factor])
        self.built = True


def _time_dtype(model):
    """The dtype of `predict_noise`'s `t`: whole timesteps on a DDPM
    schedule, a flow schedule's `sigma * timesteps` as floats."""
    return "float32" if getattr(model.schedule, "flow", False) else "int32"


def _noise_from_output(schedule, x_t, output, t, prediction):
    """The noise a network output at network time `t` implies: on a flow
    schedule from the velocity at sigma = t / timesteps."""
    if getattr(schedule, "flow", False):
        return schedule.predict_noise(x_t, output, ops.cast(t, "float32") / schedule.timesteps)
    return schedule.predict_epsilon(x_t, output, t, prediction)


def _spec(name, shape, dtype="float32"):
    return keras.InputSpec(shape=shape, dtype=dtype, name=name)


def _network(model):
    """`inputs -> output` of the network with the sampling (EMA) weights."""
    return pipeline.network_function(model, *pipeline.sampling_state(model))


# ------------------------------------------- PyTorch: through TensorFlow
def _export_under_tensorflow(model, path, options):
    """Save `model` to a temporary `.keras` file and export it from a Python
    subprocess running the TensorFlow backend."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as temp:
        model_path = os.path.join(temp, "model.keras")
        model.save(model_path)
        arguments = json.dumps([model_path, os.path.abspath(os.fspath(path)), options])
        result = subprocess.run(
            [sys.executable, "-c", _TENSORFLOW_EXPORT, arguments],
            env=env, capture_output=True, text=True,
        )
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        raise RuntimeError(
            "exporting under the TensorFlow backend failed: "
            + (lines[-1] if lines else f"exit code {result.returncode}")
        )


# ------------------------------------------------------------------ ONNX
def export_onnx(model, path, *, verbose=None, input_signature=None, **kwargs):
    """Write `predict_noise` (one network evaluation with the EMA weights,
    returning epsilon) as ONNX, through Keras' `export(format="onnx")`.

    Keras converts with tf2onnx under TensorFlow, jax2onnx under JAX and
    `torch.onnx` (TorchScript) under PyTorch. The inputs are `x_t` (B, H, W,
    C) float32 in [-1, 1], `t` (B,) int32 (and `labels` (B,) int32 for a
    conditional model; `context` (B, L, D) float32, the text encoder's
    features, for a prompted one), with the batch size free on every
    backend.
    """
    if pipeline.text_encoder(model) is not None and not backend.onnx_traces_layer_normalization():
        raise ValueError(
            "ONNX export of a prompted model does not work under PyTorch: torch.onnx cannot "
            "trace Keras' LayerNormalization of its transformer blocks with a free batch size. "
            "Export it under TensorFlow or JAX (KERAS_BACKEND), or export a SavedModel."
        )
    predictor = _NoisePredictor(model)
    if input_signature is None:
        input_signature = [_predictor_inputs(model)]
    with backend.onnx_export_context():
        predictor.export(os.fspath(path), format="onnx", verbose=verbose,
                         input_signature=input_signature, **kwargs)


def _predictor_inputs(model):
    specs = [_spec("x_t", (None,) + model.sample_shape), _spec("t", (None,), _time_dtype(model))]
    if pipeline.text_encoder(model) is not None:
        return specs + [_spec("context", (None,) + _context_shape(model))]
    return specs + ([_spec("labels", (None,), "int32")] if model.num_classes is not None else [])


def _context_shape(model):
    """`(L, D)` of a prompted model's text features."""
    return (len(model.empty_prompt_ids), model.network.context_dim)


class _NoisePredictor(keras.Model):
    """`[x_t, t(, labels or context)] -> epsilon` with a copy of the network holding the
    sampling (EMA) weights: a plain Keras model that every ONNX converter
    can trace."""

    def __init__(self, model, **kwargs):
        kwargs.setdefault("name", "noise_predictor")
        super().__init__(**kwargs)
        self.network = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(model.network)
        )
        for copy, value in zip(self.network.trainable_variables, model.sampling_weights):
            copy.assign(ops.convert_to_numpy(value))
        for copy, value in zip(self.network.non_trainable_variables,
                               model.network.non_trainable_variables):
            copy.assign(ops.convert_to_numpy(value))
        self.schedule = model.schedule
        self.prediction = model.prediction
        example = [ops.zeros((1,) + model.sample_shape), ops.zeros((1,), _time_dtype(model))]
        if model.num_classes is not None:
            example.append(ops.zeros((1,), "int32"))
        if pipeline.text_encoder(model) is not None:
            example.append(ops.zeros((1,) + _context_shape(model)))
        self(example)  # build, so the exporters see a called model

    def call(self, inputs):
        x_t, t = inputs[0], inputs[1]
        return _noise_from_output(self.schedule, x_t, self.network(inputs), t, self.prediction)
