"""`T5Encoder`: the encoder of T5 (Raffel et al. 2020), in its v1.1 form
the third text encoder of Stable Diffusion 3 / 3.5, the same function as
transformers' `T5EncoderModel`; and `T5Tokenizer`, T5's SentencePiece
(Unigram) tokenizer, run by the Hugging Face `tokenizers` library.

Token ids `(B, L)` become embeddings (`shared`), then `num_layers` pre-norm
blocks, each adding to the stream:

1. self-attention over all positions, scores `q k^T` (no `1/sqrt(d)`; T5's
   initialisation accounts for it) plus a learned number per head for the
   bucket of the distance `j - i` (each distance below `num_buckets // 4`
   its own, logarithmic bins up to `relative_attention_max_distance`, one
   bucket beyond; keys before and after the query apart), the first
   block's `relative_attention_bias` serving every block;
2. a feed-forward: `wo(gelu_tanh(wi_0 x) * wi_1 x)` for v1.1
   (`feed_forward_proj="gated-gelu"`), `wo(relu(wi x))` for the original T5
   (`"relu"`);

then the final norm. Every norm is T5's: `x / sqrt(mean(x^2) + eps)` times a
learned scale, no mean subtracted, no bias (Zhang & Sennrich 2019). Nothing
has a bias. There is no attention mask: SD 3 reads the padded ids whole, as
diffusers' pipeline does (`_get_t5_prompt_embeds` passes no mask).

Half precision. T5's feed-forward outputs outgrow float16's range. transformers
keeps each `wo` in float32 when it loads the model in float16, so its stream
is float32 from the first feed-forward on; here the stream (each block's
input and output) is float32 under every policy, the norms take their
statistics in float32 and give the policy's dtype, and under a float16
policy `wo` multiplies in float32 (its float16 weights upcast). The stream
cannot overflow, so nothing is clamped (transformers clamps a float16
stream to float16's range). Under bfloat16, whose range is float32's, `wo`
runs in bfloat16, as in transformers.

Each layer holding weights knows its module path in transformers'
`T5EncoderModel` state dict (`encoder.block.0.layer.0.SelfAttention.q`);
`t5_encoder_state_dict` brings the two spellings of the tied embedding
(`shared.weight`, `encoder.embed_tokens.weight`) to the one it reads.
"""

import json
import math
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_number
from keras_diffusion.stable_diffusion import layers as sd_layers
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.layers import _AtModulePath
from keras_diffusion.stable_diffusion.layers import _Block
from keras_diffusion.stable_diffusion.layers import Dense
from keras_diffusion.stable_diffusion.layers import Embedding
from keras_diffusion.stable_diffusion.layers import keras_name
from keras_diffusion.text import check_texts

PREFIX = "encoder"
EMBEDDING = "shared.weight"
# The same tied weight under the encoder's own name; files hold one or both.
_TIED_EMBEDDING = f"{PREFIX}.embed_tokens.weight"
FEED_FORWARDS = ("gated-gelu", "relu")
# T5Config's options this class implements, with transformers' defaults
# (t5-v1_1-xxl: d_model 4096, d_ff 10240, 24 layers, 64 heads, "gated-gelu").
DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
MODEL_TYPES = ("t5",)


def relative_position_buckets(num_buckets, max_distance):
    """The bucket of each distance `j - i` from `-max_distance` to
    `max_distance` (index `d + max_distance`); farther distances share the
    end buckets. Half the buckets per direction (keys after the query take
    the upper half); of those, distances below a half are their own bucket,
    the rest fall in logarithmic bins up to `max_distance`. Computed in
    float32 as transformers computes it, so the bins' edges (16, 32 and 64
    for T5's 32 buckets and 128) fall where they fall there."""
    half = num_buckets // 2
    exact = half // 2
    distance = np.arange(-max_distance, max_distance + 1)
    size = np.abs(distance)
    # The logarithm of the far ones only (the near ones are their own bucket).
    ratio = np.log(np.maximum(size, exact).astype(np.float32) / np.float32(exact))
    far = exact + (ratio / np.float32(math.log(max_distance / exact))
                   * np.float32(half - exact)).astype(np.int64)
    bucket = np.where(size < exact, size, np.minimum(far, half - 1))
    return (bucket + half * (distance > 0)).astype(np.int32)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="T5LayerNorm")
class RMSNormalization(_AtModulePath, layers.RMSNormalization):
    """T5's `T5LayerNorm` at `module_path`: `x / sqrt(mean(x^2) + epsilon)`
    times a learned scale. Its input is not cast: the statistics are taken
    in float32 whatever comes in; the output is in the compute dtype.

    Input shape `(..., dim)`; output shape the same.
    """

    def __init__(self, epsilon, module_path, **kwargs):
        kwargs.setdefault("name", keras_name(module_path))
        kwargs.setdefault("autocast", False)
        super().__init__(epsilon=epsilon, **kwargs)
        self._set_module_path(module_path)

    def _rules(self):
        return (("scale", "weight", "same"),)

    def call(self, x):
        x = ops.cast(x, "float32")
        x = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(x, self.compute_dtype) * ops.cast(self.scale, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("axis", None)
        return config


@keras.saving.register_keras_serializable(package="keras_diffusion",
                                          name="T5RelativePositionBias")
class RelativePositionBias(_Block):
    """T5's relative position bias, the `relative_attention_bias` of the
    self-attention at `module_path`: for query `i` and key `j`, the learned
    bias of each head for the bucket of `j - i` (`relative_position_buckets`).

    Input: token ids `(B, L)`, read for `L`. Output `(1, heads, L, L)`, added
    to every block's attention scores.
    """

    def __init__(self, heads, num_buckets, max_distance, module_path, **kwargs):
        super().__init__(module_path, **kwargs)
        self.heads, self.num_buckets = int(heads), int(num_buckets)
        self.max_distance = int(max_distance)
        self.embedding = Embedding(num_buckets, heads, self._sub("relative_attention_bias"))
        self._buckets = relative_position_buckets(self.num_buckets, self.max_distance)

    def build(self, ids_shape):
        self.embedding.build((None,))

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[1], dtype="int32")
        distance = ops.clip(positions[None, :] - positions[:, None], -self.max_distance,
                            self.max_distance)
        buckets = ops.take(ops.convert_to_tensor(self._buckets), distance + self.max_distance)
        return ops.transpose(self.embedding(buckets), (2, 0, 1))[None]

    def compute_output_shape(self, ids_shape):
        return (1, self.heads, ids_shape[1], ids_shape[1])

    def get_config(self):
        return dict(super().get_config(), heads=self.heads, num_buckets=self.num_buckets,
                    max_distance=self.max_distance)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="T5Block")
class EncoderBlock(_Block):
    """An encoder `T5Block`: `x + o(attention(layer.0.layer_norm(x)))`, the
    scores plus the relative position bias, then `x + feed_forward(
    layer.1.layer_norm(x))`. The stream stays float32 (the module docstring
    says why); so the block does not cast its inputs.

    Call arguments: `x` `(B, L, dim)`, `position_bias` `(1, heads, L, L)`.
    Output `(B, L, dim)` float32.
    """

    def __init__(self, heads, head_dim, d_ff, feed_forward, epsilon, module_path, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(module_path, **kwargs)
        self.heads, self.head_dim, self.d_ff = int(heads), int(head_dim), int(d_ff)
        self.feed_forward, self.epsilon = feed_forward, float(epsilon)
        self.attention_norm = RMSNormalization(epsilon, self._sub("layer.0.layer_norm"))
        self.feed_forward_norm = RMSNormalization(epsilon, self._sub("layer.1.layer_norm"))

    def build(self, x_shape, position_bias_shape):
        dim, inner = x_shape[-1], self.heads * self.head_dim
        attention, dense = self._sub("layer.0.SelfAttention"), self._sub("layer.1.DenseReluDense")
        self.q, self.k, self.v = (Dense(inner, f"{attention}.{name}", use_bias=False)
                                  for name in "qkv")
        self.o = Dense(dim, f"{attention}.o", use_bias=False)
        inputs = ("wi_0", "wi_1") if self.feed_forward == "gated-gelu" else ("wi",)
        self.wi = [Dense(self.d_ff, f"{dense}.{name}", use_bias=False) for name in inputs]
        self.wo = Dense(dim, f"{dense}.wo", use_bias=False)
        for sublayer in (self.attention_norm, self.feed_forward_norm, self.q, self.k, self.v,
                         *self.wi):
            sublayer.build(x_shape)
        self.o.build(tuple(x_shape[:-1]) + (inner,))
        self.wo.build(tuple(x_shape[:-1]) + (self.d_ff,))

    def _output(self, h):
        if self.compute_dtype == "float16":  # where T5's feed-forward outputs overflow
            return ops.matmul(ops.cast(h, "float32"), ops.cast(self.wo.kernel, "float32"))
        return ops.cast(self.wo(h), "float32")

    def call(self, x, position_bias):
        x = ops.cast(x, "float32")
        length = ops.shape(x)[1]
        h = self.attention_norm(x)
        q, k, v = (ops.reshape(project(h), (-1, length, self.heads, self.head_dim))
                   for project in (self.q, self.k, self.v))
        h = ops.dot_product_attention(q, k, v, bias=ops.cast(position_bias, q.dtype), scale=1.0)
        x = x + ops.cast(self.o(ops.reshape(h, (-1, length, self.heads * self.head_dim))),
                         "float32")
        h = self.feed_forward_norm(x)
        if self.feed_forward == "gated-gelu":
            h = ops.gelu(self.wi[0](h), approximate=True) * self.wi[1](h)
        else:
            h = ops.relu(self.wi[0](h))
        return x + self._output(h)

    def compute_output_spec(self, x, position_bias):
        return keras.KerasTensor(x.shape, dtype="float32")

    def get_config(self):
        return dict(super().get_config(), heads=self.heads, head_dim=self.head_dim,
                    d_ff=self.d_ff, feed_forward=self.feed_forward, epsilon=self.epsilon)


def check_t5_arguments(*, vocab_size, d_model, d_kv, d_ff, num_layers, num_heads,
                       relative_attention_num_buckets, relative_attention_max_distance,
                       layer_norm_epsilon, feed_forward_proj):
    """The rules of `T5Encoder`'s arguments (transformers' names)."""
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("d_kv", d_kv),
                        ("d_ff", d_ff), ("num_layers", num_layers), ("num_heads", num_heads)):
        check_integer(name, value)
    check_integer("relative_attention_num_buckets", relative_attention_num_buckets, low=4)
    check_integer("relative_attention_max_distance", relative_attention_max_distance)
    exact = relative_attention_num_buckets // 4
    if relative_attention_max_distance <= exact:
        raise ValueError(
            f"relative_attention_max_distance must be above relative_attention_num_buckets // 4 "
            f"({exact}, the distances with buckets of their own); got "
            f"{relative_attention_max_distance}."
        )
    if not is_number(layer_norm_epsilon) or not layer_norm_epsilon > 0:
        raise ValueError(f"layer_norm_epsilon must be a number > 0; got {layer_norm_epsilon!r}.")
    if feed_forward_proj not in FEED_FORWARDS:
        raise ValueError(
            f"feed_forward_proj must be one of {', '.join(FEED_FORWARDS)} (T5 v1.1, the "
            f"original T5); got {feed_forward_proj!r}."
        )


def t5_encoder_state_dict(state_dict):
    """A transformers `T5EncoderModel` state dict (`{key: array}`, or a
    lazily read file), viewed with the keys `T5Encoder` reads: the tied
    token embedding once, as `shared.weight`, whether the file spells it so,
    as `encoder.embed_tokens.weight`, or both."""
    names = {key: key for key in state_dict if key != _TIED_EMBEDDING}
    if EMBEDDING not in names and _TIED_EMBEDDING in state_dict:
        names[EMBEDDING] = _TIED_EMBEDDING
    return weights.Renamed(state_dict, names)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="T5Encoder")
class T5Encoder(keras.Model):
    """T5's encoder (transformers' `T5EncoderModel`), the third text encoder
    of Stable Diffusion 3 / 3.5 (t5-v1_1-xxl).

    Args (transformers' names and defaults; t5-v1_1-xxl: `d_model=4096`,
    `d_kv=64`, `d_ff=10240`, 24 layers, 64 heads, `"gated-gelu"`):
        vocab_size: token ids it reads (32128).
        d_model: width of the stream and of the output.
        d_kv: width of each attention head (`num_heads * d_kv` need not be
            `d_model`).
        d_ff: width of the feed-forward.
        num_layers: blocks.
        num_heads: attention heads.
        relative_attention_num_buckets: buckets of the relative position
            bias, both directions together (at least 4).
        relative_attention_max_distance: the distance beyond which the
            buckets stop growing (above `relative_attention_num_buckets // 4`).
        layer_norm_epsilon: epsilon of every norm.
        feed_forward_proj: `"gated-gelu"` (v1.1: tanh GELU, gated) or
            `"relu"` (the original T5).

    Input: int token ids `(B, L)` of any length, as a `T5Tokenizer` makes
    them (SD 3: 256, padding included). Output: the last hidden state
    `(B, L, d_model)`, in the policy's compute dtype. `dim` (and
    `output_dim`) is `d_model`.

    Example:

    >>> encoder = T5Encoder.from_reference_config(
    ...     json.load(open("text_encoder_3/config.json")))
    >>> weights.load_state_dict(encoder, t5_encoder_state_dict(
    ...     safetensors.numpy.load_file("text_encoder_3/model.safetensors")))
    >>> encoder(tokenizer(["a photo of an astronaut"])).shape
    (1, 256, 4096)
    """

    def __init__(self, vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                 num_heads=8, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 feed_forward_proj="relu", **kwargs):
        arguments = dict(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
            num_heads=num_heads, relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance,
            layer_norm_epsilon=layer_norm_epsilon, feed_forward_proj=feed_forward_proj)
        check_t5_arguments(**arguments)
        ids = keras.Input((None,), dtype="int32", name="token_ids")
        h = Embedding(vocab_size, d_model, EMBEDDING.removesuffix(".weight"))(ids)
        position_bias = RelativePositionBias(
            num_heads, relative_attention_num_buckets, relative_attention_max_distance,
            f"{PREFIX}.block.0.layer.0.SelfAttention")(ids)
        for index in range(num_layers):
            h = EncoderBlock(num_heads, d_kv, d_ff, feed_forward_proj, layer_norm_epsilon,
                             f"{PREFIX}.block.{index}")(h, position_bias)
        h = RMSNormalization(layer_norm_epsilon, f"{PREFIX}.final_layer_norm")(h)
        super().__init__(ids, h, **kwargs)
        self.weights_dtype = sd_layers.half_weights_policy()
        self._arguments = arguments
        for name, value in arguments.items():
            setattr(self, name, value)
        self.dim = int(d_model)

    @property
    def output_dim(self):
        return self.dim

    def get_config(self):
        return sd_layers.with_weights_dtype({"name": self.name, **self._arguments}, self)

    @classmethod
    def from_config(cls, config):
        return sd_layers.from_weights_dtype(cls, config)

    @classmethod
    def from_reference_config(cls, config, **kwargs):
        """The encoder a transformers T5 `config.json` (as a dict) describes,
        its weights unset: the options that shape the function are read
        (transformers' defaults for those left out); the rest (dropout,
        the decoder's sizes, bookkeeping) does not change the encoder's
        output and is ignored. A config of another model raises."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json); got "
                            f"{type(config).__name__}.")
        model_type = config.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"the text encoder config has model_type={model_type!r}; supported: 't5' "
                "(transformers' T5EncoderModel, SD 3's text_encoder_3)."
            )
        return cls(**{key: config[key] for key in DEFAULTS if key in config}, **kwargs)


# ------------------------------------------------------------------ tokenizer
DEFAULT_MAX_LENGTH = 256  # diffusers' SD 3 max_sequence_length
_EXTRA_ID = "<extra_id_"  # T5's sentinels, `<extra_id_0>` ...


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "T5Tokenizer runs on the Hugging Face tokenizers library: pip install "
            "'keras-diffusion[sd]' (or pip install tokenizers)."
        ) from error
    return tokenizers


def _token_name(value, default):
    """A special token's string: a config gives a string or an `AddedToken` dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else default


@keras.saving.register_keras_serializable(package="keras_diffusion", name="T5Tokenizer")
class T5Tokenizer:
    """Texts to `(N, max_length)` int32 ids by T5's SentencePiece Unigram
    model, the ids transformers' `T5TokenizerFast` gives as diffusers' SD 3
    pipeline calls it (`padding="max_length", max_length=256,
    truncation=True, add_special_tokens=True`): the text's tokens, cut to
    `max_length - 1`, then `</s>`, then `<pad>` up to `max_length`.

    The `tokenizers` library runs the `tokenizer.json` as it is (normalizer,
    pre-tokenizer, Unigram model, added tokens), except that `</s>` is
    appended whatever its post-processor says, as transformers' T5 tokenizer
    appends it. (transformers 5 rebuilds the pipeline from the file's
    vocabulary and charsmap: whitespace split, then Metaspace, the layout of
    T5's own files.) Saved with the model: its config holds the
    `tokenizer.json` text.

    Args:
        tokenizer_json: the text of a `tokenizer.json` with a Unigram model.
        max_length: ids per text, `</s>` included (256, diffusers' SD 3
            `max_sequence_length`); may be set later.
        eos_token, pad_token: the end and padding tokens (`</s>`, `<pad>`).

    Example:

    >>> tokenizer = T5Tokenizer.from_folder("stable-diffusion-3-medium/tokenizer_3")
    >>> tokenizer(["a photo of an astronaut", ""]).shape
    (2, 256)
    """

    def __init__(self, tokenizer_json, max_length=DEFAULT_MAX_LENGTH, eos_token="</s>",
                 pad_token="<pad>"):
        tokenizers = _tokenizers()
        if not isinstance(tokenizer_json, str):
            raise TypeError(f"tokenizer_json must be the text of a tokenizer.json; got "
                            f"{type(tokenizer_json).__name__}.")
        model_type = (json.loads(tokenizer_json).get("model") or {}).get("type")
        if model_type != "Unigram":
            raise ValueError(f"the tokenizer.json is not a T5 tokenizer: its model is "
                             f"{model_type!r}; expected 'Unigram' (SentencePiece).")
        self.tokenizer_json = tokenizer_json
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id, self.pad_id = (self._id(token, name) for token, name in
                                    ((eos_token, "eos_token"), (pad_token, "pad_token")))
        self._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
            special_tokens=[(eos_token, self.eos_id)])
        self.max_length = max_length

    def _id(self, token, name):
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise ValueError(f"the tokenizer.json has no token {token!r} for its {name}.")
        return index

    @property
    def max_length(self):
        return self._max_length

    @max_length.setter
    def max_length(self, value):
        self._max_length = check_integer("max_length", value, note=" (the end token)")
        self._tokenizer.enable_truncation(self._max_length)
        self._tokenizer.enable_padding(length=self._max_length, pad_id=self.pad_id,
                                       pad_token=self.pad_token)

    @property
    def vocabulary_size(self):
        """Ids in use, added tokens included: the text encoder's input range."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts):
        """`(N, max_length)` int32 ids of `texts` (a string or a list). Texts
        longer than `max_length - 1` tokens are cut, with one warning per
        call."""
        texts = check_texts(texts)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        cut = [encoding.overflowing[0] for encoding in encodings if encoding.overflowing]
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(texts)} prompts were cut to T5's {self.max_length - 1} "
                f"tokens (max_length {self.max_length} with the end token); the first lost: "
                f"{self._tokenizer.decode(cut[0].ids)!r}",
                stacklevel=2,
            )
        return np.array([encoding.ids for encoding in encodings], np.int32)

    def decode(self, ids):
        """The texts of id rows, special tokens left out."""
        return self._tokenizer.decode_batch([[int(i) for i in row] for row in ids])

    # -------------------------------------------------------- serialisation
    def get_config(self):
        return {"tokenizer_json": self.tokenizer_json, "max_length": self.max_length,
                "eos_token": self.eos_token, "pad_token": self.pad_token}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save_folder(self, path):
        """Write the tokenizer as a diffusers `tokenizer_3/` folder
        (`tokenizer.json`, `tokenizer_config.json`), which transformers'
        `T5TokenizerFast` and `from_folder` read."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        vocabulary = self._tokenizer.get_vocab(with_added_tokens=True)
        # transformers adds 100 sentinels unless told how many the vocabulary has.
        sentinels = sorted((t for t in vocabulary if t.startswith(_EXTRA_ID)),
                           key=vocabulary.get, reverse=True)
        config = {"tokenizer_class": "T5Tokenizer", "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "unk_token": self._unk_token(),
                  "extra_ids": len(sentinels), "additional_special_tokens": sentinels,
                  "model_max_length": self.max_length}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False),
                                                      encoding="utf-8")
        return folder

    def _unk_token(self):
        model = json.loads(self.tokenizer_json)["model"]
        unk = model.get("unk_id")
        return model["vocab"][unk][0] if unk is not None else "<unk>"

    @classmethod
    def from_folder(cls, path, max_length=DEFAULT_MAX_LENGTH):
        """The tokenizer of a diffusers `tokenizer_3/` folder: its
        `tokenizer.json`, the end and padding tokens named by
        `tokenizer_config.json` / `special_tokens_map.json` when present.
        `max_length` is the pipeline's (256), not the folder's
        `model_max_length` (512), as diffusers' SD 3 reads it."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; expected a T5 tokenizer folder "
                                    "with tokenizer.json.")
        if not (folder / "tokenizer.json").is_file():
            found = "spiece.model but no tokenizer.json" if (
                folder / "spiece.model").is_file() else "no tokenizer.json"
            raise FileNotFoundError(
                f"{folder} holds {found}; T5Tokenizer reads tokenizer.json (diffusers' SD 3 "
                "folders ship it; transformers' T5TokenizerFast writes it with save_pretrained)."
            )
        names = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                names.update(json.loads((folder / name).read_text(encoding="utf-8")))
        return cls((folder / "tokenizer.json").read_text(encoding="utf-8"), max_length=max_length,
                   eos_token=_token_name(names.get("eos_token"), "</s>"),
                   pad_token=_token_name(names.get("pad_token"), "<pad>"))
