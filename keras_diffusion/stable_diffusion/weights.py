"""Checkpoint weights in the reference layout <-> the variables of a Keras part.

Every layer of the Stable Diffusion parts that owns weights knows its module
path in the reference state dict (`"down_blocks.0.resnets.0.conv1"`, in a
`module_path` attribute; its Keras name is that path with `_` for `.`, as
PyTorch refuses dots in the names Keras registers variables by), so the
table from a checkpoint key to a Keras variable is derived from the layers:
each lists its weights in a `checkpoint_weights()` method returning
`(variable, key, layout)` triples, by `RULES` for the Keras layer classes
(`vae.py` holds the shared helpers); a layer without that method is named
by its module path itself and follows `RULES`.

Layouts (reference -> Keras):

- `"same"`: unchanged (biases, norms, embeddings);
- `"dense"`: a `Linear` weight `(out, in)` -> a `Dense` kernel `(in, out)`;
- `"conv"`: a `Conv2d` weight `(out, in, kh, kw)` -> `(kh, kw, in, out)`;
- `"conv_as_dense"`: a 1x1 `Conv2d` weight `(out, in, 1, 1)` -> a `Dense`
  kernel `(in, out)` (the original VAE's attention, as diffusers reads it).
"""

import keras
import numpy as np
from keras import layers

LAYOUTS = ("same", "dense", "conv", "conv_as_dense")

# Keras layer class -> (variable attribute, reference key suffix, layout).
RULES = (
    (layers.Conv2D, (("kernel", "weight", "conv"), ("bias", "bias", "same"))),
    (layers.Dense, (("kernel", "weight", "dense"), ("bias", "bias", "same"))),
    (layers.GroupNormalization, (("gamma", "weight", "same"), ("beta", "bias", "same"))),
    (layers.LayerNormalization, (("gamma", "weight", "same"), ("beta", "bias", "same"))),
    (layers.Embedding, (("embeddings", "weight", "same"),)),
)


def to_keras(value, layout):
    """A reference-layout array as the Keras variable holds it."""
    if layout == "dense":
        return value.T
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "conv_as_dense":
        return value.reshape(value.shape[0], value.shape[1]).T
    return value


def to_reference(value, layout):
    """A Keras variable's array in the reference layout (`to_keras` undone)."""
    if layout == "dense":
        return value.T
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if layout == "conv_as_dense":
        return value.T[:, :, None, None]
    return value


def _layer_weights(layer):
    own = getattr(layer, "checkpoint_weights", None)
    if own is not None:
        return list(own())
    for cls, rules in RULES:
        if isinstance(layer, cls):
            return [(getattr(layer, attribute), f"{layer.name}.{suffix}", layout)
                    for attribute, suffix, layout in rules
                    if getattr(layer, attribute, None) is not None]
    return []


def checkpoint_table(model):
    """`{reference key: (variable, layout)}` for every weight of `model`."""
    table = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable, key, layout in _layer_weights(layer):
            if key in table:
                raise ValueError(f"two variables of {model.name} claim the checkpoint key {key!r}.")
            table[key] = (variable, layout)
    return table


def _listed(keys, limit=5):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(table, state_dict, what):
    """Raise one `ValueError` naming the first missing and unexpected keys
    when `state_dict` does not hold exactly the weights of `table`."""
    missing = set(table) - set(state_dict)
    unexpected = set(state_dict) - set(table)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        raise ValueError(f"the {what} weights do not match its architecture: "
                         f"{'; '.join(parts)}.")


def load_state_dict(model, state_dict, what="model"):
    """Assign a reference-layout `state_dict` (`{key: numpy array}`) to
    `model`'s variables, cast to each variable's dtype.

    Every key must match a variable and every variable a key, with the
    right shape; otherwise one `ValueError` names what differs and nothing
    is assigned."""
    table = checkpoint_table(model)
    check_keys(table, state_dict, what)
    values = {}
    for key, (variable, layout) in table.items():
        value = to_keras(np.asarray(state_dict[key]), layout)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"the {what} weight {key!r} has shape {tuple(np.shape(state_dict[key]))}, "
                f"which does not fit the architecture (Keras variable {variable.path} of shape "
                f"{tuple(variable.shape)}); is the checkpoint for another configuration?"
            )
        values[key] = value
    for key, (variable, _) in table.items():
        variable.assign(values.pop(key).astype(variable.dtype, copy=False))


def state_dict(model):
    """`model`'s weights as a reference-layout `{key: float32 numpy array}`."""
    return {key: np.ascontiguousarray(to_reference(np.asarray(variable.numpy(), "float32"), layout))
            for key, (variable, layout) in checkpoint_table(model).items()}


@keras.saving.register_keras_serializable(package="keras_diffusion", name="Placeholder")
class Placeholder(keras.initializers.Initializer):
    """A Keras initializer for weights that a checkpoint overwrites: zeros
    made by NumPy on the host, so building an 860M-parameter UNet neither
    draws random numbers nor (under JAX) compiles a kernel per shape."""

    def __call__(self, shape, dtype=None):
        return np.zeros(tuple(int(d) for d in shape), dtype=dtype or "float32")

    def get_config(self):
        return {}
