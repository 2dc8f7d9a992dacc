"""The layers every Stable Diffusion family's parts are built of: Keras
layers that know the module path of the weights they hold in the reference
(diffusers) state dict, so `weights.load_state_dict` assigns a checkpoint
directly, and the helpers that keep a part's weights in half precision.

A family's own blocks (the VAE's resnets, the UNet's transformers, CLIP's
encoder layers) live in that family's files and are built of these.
"""

import json

import keras
from keras import layers

from keras_diffusion import backend
from keras_diffusion import precision as precisions
from keras_diffusion.network import _Conv2D
from keras_diffusion.network import _GroupNormalization
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.weights import Placeholder

# diffusers' AutoencoderKL epsilon, every group norm of it: the default of
# `GroupNormalization`; the UNet and others pass their own.
_EPSILON = 1e-6


def keras_name(module_path):
    """The Keras name of the layer at `module_path` in the reference state
    dict: the path with `_` for `.`. Under PyTorch, Keras registers a
    layer's variables by paths built from layer names, where a `.` is not
    allowed; so the module path is kept apart, in `module_path`, and
    `checkpoint_weights` names the keys from it."""
    return module_path.replace(".", "_")


class _AtModulePath:
    """A Keras layer holding the weights of the reference module at
    `module_path`, laid out as `weights.RULES` says for its Keras class."""

    def _set_module_path(self, module_path):
        if not isinstance(module_path, str) or not module_path:
            raise ValueError(f"module_path must be a non-empty string; got {module_path!r}.")
        self.module_path = module_path

    def _rules(self):
        return next(rules for cls, rules in weights.RULES if isinstance(self, cls))

    def checkpoint_weights(self):
        return [(getattr(self, attribute), f"{self.module_path}.{suffix}", layout)
                for attribute, suffix, layout in self._rules()
                if getattr(self, attribute, None) is not None]

    def add_weight(self, *args, **kwargs):
        # Inside `weights.building_from` a weight takes its checkpoint value
        # as it is made, instead of a placeholder overwritten later.
        for attribute, suffix, layout in self._rules():
            if kwargs.get("name") == attribute:
                kwargs["initializer"] = weights.from_checkpoint(
                    f"{self.module_path}.{suffix}", layout, kwargs.get("initializer"))
        return super().add_weight(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "module_path": self.module_path}


def half_weights_policy():
    """The global dtype policy's name where it keeps weights in half
    precision (`load_model(dtype=...)` builds the parts in it), else None."""
    policy = keras.config.dtype_policy()
    return policy.name if policy.variable_dtype != "float32" else None


def with_weights_dtype(config, part):
    """A part's config with the half-precision policy it was built in, so
    that `from_weights_dtype` rebuilds it so; a float32 part's is unchanged."""
    return {**config, "weights_dtype": part.weights_dtype} if part.weights_dtype else config


def from_weights_dtype(cls, config):
    """`cls(**config)` built in the policy `with_weights_dtype` recorded."""
    config = dict(config)
    with precisions.policy_scope(config.pop("weights_dtype", None)):
        return cls(**config)


class ReferenceConfigured:
    """For a part built from a reference library's config dict (diffusers'
    `config.json`, kept as JSON in `_reference_config`): `config` is that
    dict, and the Keras config is it plus the name, `trainable` and the
    half-precision policy the part was built in. Mixed in before
    `keras.Model`."""

    @property
    def config(self):
        """The reference config dict (a copy)."""
        return json.loads(self._reference_config)

    def get_config(self):
        return with_weights_dtype({"name": self.name, "trainable": self.trainable, **self.config},
                                  self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return from_weights_dtype(cls, config)


def float32_output(layer_cls, *args, **kwargs):
    """A part's last layer, whose output is float32: computed in float32
    under a float32 or mixed policy (its weights are float32 there), and in
    the policy's half precision where the weights are half (as diffusers
    computes a half model), its output cast to float32 after it."""
    half = half_weights_policy() is not None
    layer = layer_cls(*args, **kwargs, **({} if half else {"dtype": "float32"}))
    if not half:
        return layer
    to_float32 = layers.Activation("linear", dtype="float32", name=f"{layer.name}_float32")
    return lambda h: to_float32(layer(h))


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDVAEConv2D")
class Conv2D(_AtModulePath, _Conv2D):
    """The project's `Conv2D` holding the `Conv2d` at `module_path`."""

    def __init__(self, filters, kernel_size, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        kwargs.setdefault("kernel_initializer", Placeholder())
        kwargs.setdefault("padding", "same")
        super().__init__(filters, kernel_size, **kwargs)
        self._set_module_path(module_path)


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SDVAEGroupNormalization")
class GroupNormalization(_AtModulePath, _GroupNormalization):
    """The project's `GroupNormalization` (statistics in float32) holding
    the `GroupNorm` at `module_path`, with diffusers' VAE epsilon."""

    def __init__(self, groups, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        kwargs.setdefault("epsilon", _EPSILON)
        super().__init__(groups=groups, **kwargs)
        self._set_module_path(module_path)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDVAEDense")
class Dense(_AtModulePath, layers.Dense):
    """Keras' `Dense` holding the `Linear` at `module_path`, run on the
    backend's faster path where it has one (`keras_diffusion.backend.dense`)."""

    def __init__(self, units, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        kwargs.setdefault("kernel_initializer", Placeholder())
        super().__init__(units, **kwargs)
        self._set_module_path(module_path)

    def call(self, inputs, training=None):
        y = backend.dense(self, inputs)
        return super().call(inputs, training=training) if y is NotImplemented else y


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDEmbedding")
class Embedding(_AtModulePath, layers.Embedding):
    """Keras' `Embedding` holding the `Embedding` at `module_path`."""

    def __init__(self, input_dim, output_dim, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        kwargs.setdefault("embeddings_initializer", Placeholder())
        super().__init__(input_dim, output_dim, **kwargs)
        self._set_module_path(module_path)


class LayerChain(keras.Model):
    """A functional model of one input and one output whose layers form a
    single chain (each takes the one before's output), run a layer at a time.

    Keras' graph runner keeps every layer's output until the model returns.
    Under PyTorch, which runs eagerly, a 512x512 SD VAE decode then held 0.9
    GB more than diffusers' (every full-size map of its last level); run as
    a chain, each map is freed once the next layer has it. Compiled
    backends free them anyway. Symbolic calls take Keras' own path."""

    def __init__(self, inputs, outputs, **kwargs):
        super().__init__(inputs, outputs, **kwargs)
        for before, layer in zip(self.layers, self.layers[1:]):
            if layer.input is not before.output:
                raise ValueError(f"{layer.name} does not take {before.name}'s output: the "
                                 f"layers of {self.name} are not one chain.")
        self._chain = self.layers[1:]

    def _run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
        if call_fn is not None:
            return super()._run_through_graph(inputs, operation_fn, call_fn)
        (x,) = keras.tree.flatten(inputs)
        for layer in self._chain:
            x = operation_fn(layer)(x)
        return keras.tree.pack_sequence_as(self._outputs_struct, [x])


class _Block(layers.Layer):
    """A layer of several reference modules, at `module_path`; its
    sublayers sit at paths below it."""

    def __init__(self, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        super().__init__(**kwargs)
        self.module_path = module_path

    def _sub(self, suffix):
        return f"{self.module_path}.{suffix}"

    def get_config(self):
        return {**super().get_config(), "module_path": self.module_path}
