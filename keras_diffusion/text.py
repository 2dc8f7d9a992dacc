"""Text for prompted models: a word tokenizer built from captions, and a small
transformer text encoder, both saved with the model.

`WordTokenizer` needs no download: its vocabulary is the words of the
training captions (lower-cased; punctuation split off), plus four special
tokens. It runs in NumPy, in the input pipeline, so the train step is the
same on every backend. Texts become `(N, max_length)` int32 ids: a start
token, the words, an end token, then padding; longer texts are truncated
with one warning, as CLIP's tokenizers do.

`TextEncoder` maps those ids to `(N, max_length, dim)` features: token and
position embeddings, then `depth` pre-norm transformer layers
(self-attention over all positions, padding included, then a GELU
feed-forward), then a layer norm; the architecture of CLIP's text
transformer (Radford et al. 2021) at the scale of MNIST's captions. Any
Keras model mapping ids to `(N, length, dim)` can take its place.
"""

import re
import warnings

import keras
import numpy as np
from keras import layers
from keras import ops

from keras_diffusion.checks import check_integer
from keras_diffusion.network import HostInitializer
from keras_diffusion.network import TransformerLayer

# A word is a run of letters, digits or apostrophes; any other non-space
# character is a token of its own.
WORD_PATTERN = r"[\w']+|[^\w\s]"
_WORDS = re.compile(WORD_PATTERN)
SPECIAL_TOKENS = ("<pad>", "<unknown>", "<start>", "<end>")
PAD, UNKNOWN, START, END = range(4)


def check_texts(texts, name="prompts"):
    """A list of strings from one string or a sequence of them."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings; got {type(texts).__name__}.")
    if not texts:
        raise ValueError(f"{name} is empty; expected at least one string.")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"{name} must be strings; item {index} is {text!r} ({type(text).__name__})."
            )
    return list(texts)


def check_tokenizer_arguments(*, max_length):
    """The rules of `WordTokenizer`'s arguments (a config's `text` section
    is checked by them too)."""
    check_integer("max_length", max_length, low=3, note=" (a start and an end token and a word)")


def check_text_encoder_arguments(*, dim, depth, heads):
    """The rules of `TextEncoder`'s arguments."""
    check_integer("dim", dim)
    check_integer("depth", depth)
    check_integer("heads", heads)
    if dim % heads:
        raise ValueError(f"dim must be divisible by heads; got dim={dim}, heads={heads}.")


def split_words(text):
    """The lower-cased words and punctuation marks of `text`."""
    return _WORDS.findall(text.lower())


def tokenize(tokenizer, texts):
    """`(N, L)` int32 token ids of `texts` (a list of strings) by any
    tokenizer, which sees each distinct text once. A tokenizer may return
    the ids, or a dict holding them as `"token_ids"` (KerasHub's
    preprocessors)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    ids = tokenizer(unique.tolist())
    if isinstance(ids, dict) and "token_ids" in ids:
        ids = ids["token_ids"]
    ids = np.asarray(ops.convert_to_numpy(ids) if ops.is_tensor(ids) else ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or len(ids) != len(unique):
        raise ValueError(
            f"the tokenizer must map N texts to an (N, length) array of integer ids; "
            f"got shape {ids.shape}, dtype {ids.dtype} for {len(unique)} texts."
        )
    return ids.astype("int32")[inverse.reshape(-1)]


def encoder_inputs(encoder, ids):
    """`ids` as `encoder` takes them: a tensor, or `{"token_ids": ids}` for
    an encoder built on a dict of inputs (KerasHub's CLIP text encoder)."""
    structure = getattr(encoder, "_inputs_struct", None)
    if isinstance(structure, dict):
        return {"token_ids": ids}
    return ids


def encoder_pooled(output):
    """A text encoder's pooled output where it gives one (a dict's
    `"pooled_output"`: SDXL's encoders), else None."""
    return output.get("pooled_output") if isinstance(output, dict) else None


def encoder_features(output):
    """A text encoder's features from its output: the output itself, or
    its `"sequence_output"` when it returns a dict (KerasHub's CLIP encoder
    with an intermediate output)."""
    return output["sequence_output"] if isinstance(output, dict) else output


def check_prompted_parts(network, text_encoder, tokenizer, num_classes):
    """The tokenizer of a prompted model (`tokenizer`, else the text
    encoder's own), once the network, text encoder and tokenizer are checked
    to fit together; None for a model without a text encoder."""
    context_dim = getattr(network, "context_dim", None)
    if text_encoder is None:
        if context_dim is not None:
            raise ValueError(
                f"the network cross-attends to a context (context_dim={context_dim}), so "
                "the model needs a text encoder: pass text_encoder=TextEncoder(...)."
            )
        if tokenizer is not None:
            raise ValueError("tokenizer was given without a text_encoder; pass both.")
        return None
    if num_classes is not None:
        raise ValueError(
            "a network cannot take both class labels and prompts; build the UNet with "
            "num_classes=None for a prompted model (put class names in the captions)."
        )
    if context_dim is None:
        raise ValueError(
            "a text_encoder needs a network that cross-attends to its features: build "
            "the UNet with context_dim equal to the encoder's feature width."
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(text_encoder, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            f"the text encoder {type(text_encoder).__name__} has no tokenizer; pass "
            "tokenizer=..., a callable mapping texts to (N, length) integer ids."
        )
    ids = tokenize(tokenizer, [""])
    # Called on a symbolic tensor (building it if it is not), not run: at SD
    # size running it here compiled dozens of eager ops under JAX (a second
    # of loading).
    ids = keras.KerasTensor(ops.shape(ids), dtype=keras.backend.standardize_dtype(ids.dtype))
    features = encoder_features(text_encoder(encoder_inputs(text_encoder, ids)))
    if ops.shape(features)[-1] != context_dim:
        raise ValueError(
            f"the text encoder makes features of width {ops.shape(features)[-1]} but the "
            f"network's context_dim is {context_dim}; make them equal."
        )
    return tokenizer


@keras.saving.register_keras_serializable(package="keras_diffusion", name="WordTokenizer")
class WordTokenizer:
    """Texts to fixed-length id sequences over a vocabulary of words.

    Args:
        vocabulary: the words, in id order after the special tokens (ids
            0-3 are `<pad>`, `<unknown>`, `<start>`, `<end>`).
        max_length: ids per text, start and end tokens included.

    Example:

    >>> tokenizer = WordTokenizer.from_texts(["a photo of a cat", "a dog"], max_length=8)
    >>> tokenizer(["a cat"])
    array([[2, 4, 5, 3, 0, 0, 0, 0]], dtype=int32)
    >>> tokenizer.decode(tokenizer(["a cat"]))
    ['a cat']
    """

    def __init__(self, vocabulary, max_length=16):
        check_tokenizer_arguments(max_length=max_length)
        vocabulary = list(vocabulary)
        bad = [word for word in vocabulary if not isinstance(word, str) or split_words(word) != [word]]
        if bad:
            raise ValueError(
                f"vocabulary entries must be single lower-case words or punctuation marks; "
                f"got {bad[0]!r}."
            )
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has repeated words; each word must appear once.")
        self.vocabulary = vocabulary
        self.max_length = int(max_length)
        self._ids = {word: index for index, word in enumerate(SPECIAL_TOKENS + tuple(vocabulary))}
        self._warned = False

    @classmethod
    def from_texts(cls, texts, max_length=16):
        """The tokenizer whose vocabulary is every word of `texts`, sorted."""
        texts = check_texts(texts, "captions")
        words = sorted({word for text in texts for word in split_words(text)})
        return cls(words, max_length=max_length)

    @property
    def vocabulary_size(self):
        """Ids in use, special tokens included: the text encoder's input range."""
        return len(SPECIAL_TOKENS) + len(self.vocabulary)

    def __call__(self, texts):
        """`(N, max_length)` int32 ids of `texts` (a string or a list).
        Words outside the vocabulary become `<unknown>`; texts longer than
        `max_length - 2` words are cut, with one warning per tokenizer."""
        texts = check_texts(texts)
        ids = np.full((len(texts), self.max_length), PAD, np.int32)
        room = self.max_length - 2
        for row, text in enumerate(texts):
            words = split_words(text)
            if len(words) > room and not self._warned:
                warnings.warn(
                    f"a text of {len(words)} words was cut to the tokenizer's {room} "
                    f"(max_length {self.max_length} with its start and end tokens): {text!r}",
                    stacklevel=2,
                )
                self._warned = True
            tokens = [START] + [self._ids.get(word, UNKNOWN) for word in words[:room]] + [END]
            ids[row, : len(tokens)] = tokens
        return ids

    def unknown_words(self, texts):
        """The words of `texts` that are not in the vocabulary, in order."""
        return [word for text in check_texts(texts) for word in split_words(text)
                if word not in self._ids]

    def decode(self, ids):
        """The texts of id rows, without special tokens (unknown words as
        `<unknown>`)."""
        names = SPECIAL_TOKENS + tuple(self.vocabulary)
        texts = []
        for row in np.asarray(ids):
            words = [names[i] for i in row if i not in (PAD, START, END)]
            texts.append(" ".join(words))
        return texts

    def get_config(self):
        return {"vocabulary": list(self.vocabulary), "max_length": self.max_length}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_diffusion", name="TextEncoder")
class TextEncoder(keras.Model):
    """Token ids `(B, max_length)` to features `(B, max_length, dim)`.

    Args:
        tokenizer: the `WordTokenizer` whose ids it reads (saved with it).
        dim: feature width.
        depth: transformer layers.
        heads: attention heads; must divide `dim`.

    Example:

    >>> tokenizer = WordTokenizer.from_texts(["a handwritten seven"], max_length=8)
    >>> encoder = TextEncoder(tokenizer, dim=32, depth=1, heads=2)
    >>> tuple(encoder.encode(["a handwritten seven", "seven"]).shape)
    (2, 8, 32)
    """

    def __init__(self, tokenizer, dim=128, depth=2, heads=4, **kwargs):
        if isinstance(tokenizer, dict):  # from a saved config
            tokenizer = keras.saving.deserialize_keras_object(tokenizer)
        if not isinstance(tokenizer, WordTokenizer):
            raise TypeError(f"tokenizer must be a WordTokenizer; got {type(tokenizer).__name__}.")
        check_text_encoder_arguments(dim=dim, depth=depth, heads=heads)
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.dim, self.depth, self.heads = int(dim), int(depth), int(heads)
        self.max_length = tokenizer.max_length
        self.token_embedding = layers.Embedding(
            tokenizer.vocabulary_size, dim, embeddings_initializer=HostInitializer("normal", 0.02),
            name="token_embedding")
        self.position_embedding = self.add_weight(
            shape=(self.max_length, dim), initializer=HostInitializer("normal", 0.01),
            name="position_embedding")
        self.blocks = [TransformerLayer(heads=heads, name=f"layer_{i}") for i in range(depth)]
        self.final_norm = layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self.build((None, self.max_length))

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        for block in self.blocks:
            block.build((None, self.max_length, self.dim))
        self.final_norm.build((None, self.max_length, self.dim))
        self.built = True

    def call(self, token_ids, training=None):
        x = self.token_embedding(ops.cast(token_ids, "int32")) + ops.cast(
            self.position_embedding, self.compute_dtype)
        for block in self.blocks:
            x = block(x, training=training)
        return self.final_norm(x)

    def encode(self, texts):
        """Features of `texts` (a string or a list), as the model sees them."""
        return self(self.tokenizer(texts))

    @property
    def output_dim(self):
        return self.dim

    def get_config(self):
        return {"tokenizer": keras.saving.serialize_keras_object(self.tokenizer), "dim": self.dim,
                "depth": self.depth, "heads": self.heads, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
