"""`CLIPTextTransformer`: the text encoder of Stable Diffusion 1.x / 2.x, the
same function as transformers' `CLIPTextModel` (Radford et al. 2021), in
the `text_encoder` slot of a `LatentDiffusionModel`.

Token ids `(B, L)`, L up to `max_position_embeddings` (77), become token plus
position embeddings, then `num_hidden_layers` pre-norm transformer layers
(causal self-attention, then an MLP with `quick_gelu` (SD 1.x) or `gelu`
(SD 2.x)), then `final_layer_norm`: features `(B, L, hidden_size)` that the
UNet cross-attends to. With `skip_layers=k` (diffusers' `clip_skip`) the
features are those of the layer `k` before the last, final layer norm
applied; the skipped layers keep their weights, so a full checkpoint loads.

Every layer holding weights knows its module path in the state dict
(`text_model.encoder.layers.0.self_attn.q_proj`), the layout of the Hub's
`text_encoder/` files and of the original single-file checkpoints; its Keras
name is that path with `_` for `.`. `text_model_state_dict` brings a state
dict written by transformers 5 (no `text_model.` prefix) or an older one (a
`position_ids` buffer) to that layout.
"""

import keras
from keras import layers
from keras import ops

from keras_diffusion import backend
from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.stable_diffusion import layers as sd_layers
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.layers import _AtModulePath
from keras_diffusion.stable_diffusion.layers import _Block
from keras_diffusion.stable_diffusion.layers import keras_name

PREFIX = "text_model"
# `hidden_act` values and their functions: CLIP's sigmoid approximation
# (SD 1.x, OpenAI's CLIP) and the exact, erf-based GELU (SD 2.x, OpenCLIP).
ACTIVATIONS = ("quick_gelu", "gelu")

# CLIPTextConfig's options this class implements, with transformers' defaults.
DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# Buffers some checkpoints carry that are not weights (`arange(77)`).
_BUFFERS = (f"{PREFIX}.embeddings.position_ids",)
# `CLIPTextModelWithProjection`'s projection of the pooled output, beside
# `text_model.` in its state dict.
PROJECTION = "text_projection"


def _activation(name, x):
    if name == "quick_gelu":
        return x * ops.sigmoid(1.702 * x)
    return ops.gelu(x, approximate=False)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDCLIPDense")
class Dense(sd_layers.Dense):
    """The VAE's `Dense` (a `Linear` at `module_path`), under the name the
    text encoder's saved configs use."""


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="SDCLIPLayerNormalization")
class LayerNormalization(_AtModulePath, layers.LayerNormalization):
    """Keras' `LayerNormalization` holding the `LayerNorm` at `module_path`."""

    def __init__(self, epsilon, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        super().__init__(epsilon=epsilon, **kwargs)
        self._set_module_path(module_path)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDCLIPEmbedding")
class Embedding(sd_layers.Embedding):
    """The shared `Embedding` (an `Embedding` at `module_path`), under the
    name the text encoder's saved configs use."""


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDCLIPEmbeddings")
class Embeddings(_Block):
    """CLIP's `CLIPTextEmbeddings`: the embedding of each token plus that of
    its position (learned, one per position up to `max_positions`).

    Input shape `(B, L)` int ids, L <= `max_positions`; output shape
    `(B, L, dim)`.
    """

    def __init__(self, vocab_size, dim, max_positions, module_path, **kwargs):
        super().__init__(module_path, **kwargs)
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.max_positions = int(max_positions)
        self.token_embedding = Embedding(vocab_size, dim, self._sub("token_embedding"))
        self.position_embedding = Embedding(max_positions, dim, self._sub("position_embedding"))

    def build(self, ids_shape):
        self.token_embedding.build(ids_shape)
        self.position_embedding.build((self.max_positions,))

    def call(self, ids):
        length = ops.shape(ids)[1]
        if isinstance(length, int) and length > self.max_positions:
            raise ValueError(
                f"token ids of length {length} are longer than this text encoder's "
                f"{self.max_positions} positions; tokenize with max_length={self.max_positions}."
            )
        positions = self.position_embedding(ops.arange(length, dtype="int32"))
        return self.token_embedding(ops.cast(ids, "int32")) + positions[None]

    def compute_output_shape(self, ids_shape):
        return tuple(ids_shape) + (self.dim,)

    def get_config(self):
        return dict(super().get_config(), vocab_size=self.vocab_size, dim=self.dim,
                    max_positions=self.max_positions)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDCLIPEncoderLayer")
class EncoderLayer(_Block):
    """CLIP's `CLIPEncoderLayer`: `x + out_proj(causal_attention(
    layer_norm1(x)))`, then `x + fc2(act(fc1(layer_norm2(x))))`.

    Input shape `(B, L, dim)`; output shape the same.
    """

    def __init__(self, heads, intermediate_size, activation, epsilon, module_path, **kwargs):
        super().__init__(module_path, **kwargs)
        self.heads, self.intermediate_size = int(heads), int(intermediate_size)
        self.activation, self.epsilon = activation, float(epsilon)
        self.layer_norm1 = LayerNormalization(epsilon, self._sub("layer_norm1"))
        self.layer_norm2 = LayerNormalization(epsilon, self._sub("layer_norm2"))

    def build(self, input_shape):
        dim = input_shape[-1]
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Dense(dim, self._sub(f"self_attn.{part}")) for part in ("q_proj", "k_proj", "v_proj",
                                                                    "out_proj"))
        self.fc1 = Dense(self.intermediate_size, self._sub("mlp.fc1"))
        self.fc2 = Dense(dim, self._sub("mlp.fc2"))
        for sublayer in (self.layer_norm1, self.layer_norm2, self.q_proj, self.k_proj, self.v_proj,
                         self.out_proj, self.fc1):
            sublayer.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.intermediate_size,))

    def call(self, x):
        dim = x.shape[-1]
        heads_shape = (-1, ops.shape(x)[1], self.heads, dim // self.heads)
        h = self.layer_norm1(x)
        q, k, v = (ops.reshape(proj(h), heads_shape) for proj in (self.q_proj, self.k_proj,
                                                                  self.v_proj))
        h = backend.attention(q, k, v, is_causal=True)
        x = x + self.out_proj(ops.reshape(h, (-1, ops.shape(x)[1], dim)))
        h = self.fc2(_activation(self.activation, self.fc1(self.layer_norm2(x))))
        return x + h

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), heads=self.heads,
                    intermediate_size=self.intermediate_size, activation=self.activation,
                    epsilon=self.epsilon)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="SDCLIPPooled")
class Pooled(layers.Layer):
    """CLIP's pooled output: each sequence's features at its end token,
    found as transformers finds it: the largest id when `eos_token_id` is
    2 (the configs of the original CLIP, whose end token is the last id),
    else the first `eos_token_id`.

    Call arguments: `features` `(B, L, D)`, `ids` `(B, L)`. Output `(B, D)`.
    """

    def __init__(self, eos_token_id=2, **kwargs):
        super().__init__(**kwargs)
        self.eos_token_id = int(eos_token_id)

    def call(self, features, ids):
        ids = ops.cast(ids, "int32")
        if self.eos_token_id == 2:
            end = ops.argmax(ids, axis=-1)
        else:
            end = ops.argmax(ops.cast(ops.equal(ids, self.eos_token_id), "int32"), axis=-1)
        picked = ops.one_hot(end, ops.shape(ids)[1], dtype=features.dtype)
        return ops.einsum("bl,bld->bd", picked, features)

    def compute_output_shape(self, features_shape, ids_shape):
        return (features_shape[0], features_shape[-1])

    def get_config(self):
        return dict(super().get_config(), eos_token_id=self.eos_token_id)


def check_clip_arguments(*, vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                         num_attention_heads, max_position_embeddings, hidden_act,
                         layer_norm_eps, skip_layers, projection_dim=None):
    """The rules of `CLIPTextTransformer`'s arguments (transformers' names)."""
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size),
                        ("num_hidden_layers", num_hidden_layers),
                        ("num_attention_heads", num_attention_heads),
                        ("max_position_embeddings", max_position_embeddings)):
        check_integer(name, value)
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size must be divisible by num_attention_heads; got hidden_size="
            f"{hidden_size}, num_attention_heads={num_attention_heads}."
        )
    if hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act must be one of {', '.join(ACTIVATIONS)}; got {hidden_act!r}."
        )
    if not is_number(layer_norm_eps) or not layer_norm_eps > 0:
        raise ValueError(f"layer_norm_eps must be a number > 0; got {layer_norm_eps!r}.")
    check_integer("skip_layers", skip_layers, low=0)
    if projection_dim is not None:
        check_integer("projection_dim", projection_dim)
    if skip_layers >= num_hidden_layers:
        raise ValueError(
            f"skip_layers must be below num_hidden_layers ({num_hidden_layers}); got "
            f"{skip_layers}."
        )


def text_model_state_dict(state_dict):
    """A transformers `CLIPTextModel` state dict (`{key: array}`), viewed with the
    keys `CLIPTextTransformer` reads: under `text_model.` (transformers 5
    writes them without it; the Hub's SD files and older versions with it),
    the `text_model.embeddings.position_ids` buffer (`arange(77)`, not a
    weight, in files older transformers wrote) left out."""
    names = {key if key.startswith((f"{PREFIX}.", f"{PROJECTION}.")) else f"{PREFIX}.{key}": key
             for key in state_dict}
    # A view: a lazily read file stays unread until each weight is taken.
    return weights.Renamed(state_dict, {new: old for new, old in names.items()
                                        if new not in _BUFFERS})


@keras.saving.register_keras_serializable(package="keras_diffusion", name="CLIPTextTransformer")
class CLIPTextTransformer(keras.Model):
    """CLIP's text transformer (transformers' `CLIPTextModel`), the text
    encoder of Stable Diffusion 1.x / 2.x.

    Args (transformers' names and defaults; SD 1.x: `hidden_size=768`,
    `intermediate_size=3072`, 12 layers, 12 heads, `quick_gelu`; SD 2.x:
    1024, 4096, 23 layers, 16 heads, `gelu`):
        vocab_size: token ids it reads (49408 for CLIP's BPE).
        hidden_size: feature width.
        intermediate_size: width of each layer's MLP.
        num_hidden_layers: transformer layers.
        num_attention_heads: heads; must divide `hidden_size`.
        max_position_embeddings: the longest id sequence (77).
        hidden_act: `"quick_gelu"` or `"gelu"`.
        layer_norm_eps: epsilon of every layer norm.
        skip_layers: 0 for the last layer's features; `k` for those of the
            layer `k` before it (diffusers' `clip_skip`), final layer norm
            applied either way unless `final_layer_norm=False`.
        final_layer_norm: apply the final layer norm to the features
            (SD 1.x / 2.x); SDXL reads the penultimate layer's output as it
            is (`skip_layers=1, final_layer_norm=False`).
        projection_dim: with a width, transformers'
            `CLIPTextModelWithProjection` (SDXL's second encoder): a second
            output, the pooled output (the last layer's, final layer norm
            applied, at the end token) through the bias-free
            `text_projection`.
        eos_token_id: how the end token is found for the pooled output
            (see `Pooled`).

    Input: int token ids `(B, L)`, L <= `max_position_embeddings`, as a
    `CLIPTokenizer` makes them. Output: `(B, L, hidden_size)` features, and
    with `projection_dim` the `(B, projection_dim)` projected pooled output.
    `dim` (and `output_dim`) is `hidden_size`; `tokenizer` is None (the
    latent model holds the tokenizer).

    Example:

    >>> encoder = CLIPTextTransformer.from_reference_config(
    ...     json.load(open("text_encoder/config.json")))
    >>> weights.load_state_dict(encoder, text_model_state_dict(
    ...     safetensors.numpy.load_file("text_encoder/model.safetensors")))
    >>> encoder(tokenizer(["a photo of an astronaut"])).shape
    (1, 77, 768)
    """

    def __init__(self, vocab_size=49408, hidden_size=512, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, skip_layers=0,
                 final_layer_norm=True, projection_dim=None, eos_token_id=2, **kwargs):
        check_clip_arguments(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps, skip_layers=skip_layers, projection_dim=projection_dim,
        )
        ids = keras.Input((None,), dtype="int32", name="token_ids")
        h = Embeddings(vocab_size, hidden_size, max_position_embeddings,
                       f"{PREFIX}.embeddings")(ids)
        encoder_layers = [
            EncoderLayer(num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
                         f"{PREFIX}.encoder.layers.{index}")
            for index in range(num_hidden_layers)
        ]
        used = num_hidden_layers - skip_layers
        # The pooled output needs the last layer: with a projection every layer runs.
        run = num_hidden_layers if projection_dim is not None else used
        hidden = [h]
        for layer in encoder_layers[:run]:
            hidden.append(layer(hidden[-1]))
        final_norm = LayerNormalization(layer_norm_eps, f"{PREFIX}.final_layer_norm")
        features = final_norm(hidden[used]) if final_layer_norm else hidden[used]
        outputs = features
        if projection_dim is not None:
            pooled = Pooled(eos_token_id, name="pooled")(final_norm(hidden[-1]), ids)
            outputs = [features, Dense(projection_dim, PROJECTION, use_bias=False)(pooled)]
        super().__init__(ids, outputs, **kwargs)
        self.weights_dtype = sd_layers.half_weights_policy()
        if not final_norm.built:  # off the outputs' path: tracked here, a checkpoint holds it
            final_norm.build((None, None, hidden_size))
            self.unused_final_norm = final_norm
        # Not on the path to the output, so tracked here: a checkpoint holds them.
        self.skipped_layers = encoder_layers[run:]
        for layer in self.skipped_layers:
            layer.build((None, None, hidden_size))
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.max_position_embeddings = int(max_position_embeddings)
        self.hidden_act = hidden_act
        self.layer_norm_eps = float(layer_norm_eps)
        self.skip_layers = int(skip_layers)
        self.final_layer_norm = bool(final_layer_norm)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.eos_token_id = int(eos_token_id)
        self.dim = self.hidden_size
        self.max_length = self.max_position_embeddings
        self.tokenizer = None

    @property
    def output_dim(self):
        return self.dim

    def get_config(self):
        return sd_layers.with_weights_dtype({
            "name": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "skip_layers": self.skip_layers,
            # Written only when set, so files of SD 1.x / 2.x encoders stay as they were.
            **({} if self.final_layer_norm else {"final_layer_norm": False}),
            **({} if self.projection_dim is None else {"projection_dim": self.projection_dim,
                                                       "eos_token_id": self.eos_token_id}),
        }, self)

    @classmethod
    def from_config(cls, config):
        return sd_layers.from_weights_dtype(cls, config)

    @classmethod
    def from_reference_config(cls, config, skip_layers=0, **kwargs):
        """The text encoder a transformers `CLIPTextModel` `config.json` (as
        a dict) describes, its weights unset. The options that shape the
        function are read (transformers' defaults for those left out);
        the rest of a transformers config (dropout rates, bookkeeping) does
        not change the features and is ignored. A config whose
        `architectures` is `CLIPTextModelWithProjection` builds the
        projection (`projection_dim`, default 512, and `eos_token_id`, as
        transformers reads them). A config of another model raises."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json); got "
                            f"{type(config).__name__}.")
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(
                f"the text encoder config has model_type={model_type!r}; supported: "
                "'clip_text_model' (transformers' CLIPTextModel, SD 1.x / 2.x)."
            )
        arguments = {key: config[key] for key in DEFAULTS if key in config}
        if "CLIPTextModelWithProjection" in (config.get("architectures") or ()):
            arguments.update(projection_dim=config.get("projection_dim", 512),
                             eos_token_id=config.get("eos_token_id", 2))
        return cls(**arguments, skip_layers=skip_layers, **kwargs)
