"""The word tokenizer, the text encoder, and the UNet's cross-attention to a
context; run once per KERAS_BACKEND."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from keras_diffusion.network import SpatialTransformer
from keras_diffusion.text import END
from keras_diffusion.text import PAD
from keras_diffusion.text import START
from keras_diffusion.text import UNKNOWN
from keras_diffusion.text import TextEncoder
from keras_diffusion.text import WordTokenizer
from test_network import _weight_gradients

CAPTIONS = ["a photo of a cat.", "A blurry photo of a dog", "a handwritten seven"]


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_texts(CAPTIONS, max_length=8)


def test_the_vocabulary_is_the_captions_words(tokenizer):
    assert tokenizer.vocabulary == [".", "a", "blurry", "cat", "dog", "handwritten", "of", "photo",
                                    "seven"]
    assert tokenizer.vocabulary_size == 4 + 9


def test_texts_become_start_words_end_padding(tokenizer):
    ids = tokenizer(["a cat.", "seven"])
    a, cat, dot, seven = (4 + tokenizer.vocabulary.index(w) for w in ("a", "cat", ".", "seven"))
    np.testing.assert_array_equal(ids, [[START, a, cat, dot, END, PAD, PAD, PAD],
                                        [START, seven, END, PAD, PAD, PAD, PAD, PAD]])
    assert ids.dtype == np.int32
    assert tokenizer("A CAT .").tolist() == tokenizer(["a cat."]).tolist()  # case, spacing
    assert tokenizer.decode(tokenizer(CAPTIONS)) == ["a photo of a cat .", "a blurry photo of a dog",
                                                    "a handwritten seven"]
    assert tokenizer([""]).tolist() == [[START, END] + [PAD] * 6]  # the empty prompt


def test_unknown_words_and_truncation(tokenizer):
    assert tokenizer.unknown_words(["a red cat", "zebra"]) == ["red", "zebra"]
    assert tokenizer(["a red cat"])[0, :5].tolist() == [START, 5, UNKNOWN, 7, END]
    long = "a photo of a cat of a dog of a cat"
    with pytest.warns(UserWarning, match=r"a text of 11 words was cut to the tokenizer's 6 "
                                         r"\(max_length 8 with its start and end tokens\)"):
        ids = tokenizer([long, long])
    assert ids.shape == (2, 8) and ids[0, -1] == END
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tokenizer
        tokenizer([long])


@pytest.mark.parametrize("texts, error, match", [
    ([], ValueError, r"prompts is empty; expected at least one string"),
    (["a cat", 3], TypeError, r"prompts must be strings; item 1 is 3 \(int\)"),
    (7, TypeError, r"prompts must be a string or a list of strings; got int"),
])
def test_bad_prompts(tokenizer, texts, error, match):
    with pytest.raises(error, match=match):
        tokenizer(texts)


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match=r"captions is empty"):
        WordTokenizer.from_texts([])
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 3 \(a start and an "
                                         r"end token and a word\); got 2"):
        WordTokenizer(["a"], max_length=2)
    with pytest.raises(ValueError, match=r"single lower-case words .* got 'two words'"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match=r"vocabulary has repeated words"):
        WordTokenizer(["a", "a"])


def test_tokenizer_serialises(tokenizer):
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tokenizer))
    assert isinstance(again, WordTokenizer) and again.get_config() == tokenizer.get_config()
    np.testing.assert_array_equal(again(CAPTIONS), tokenizer(CAPTIONS))


def test_text_encoder_features_and_file_round_trip(tokenizer, tmp_path):
    keras.utils.set_random_seed(0)
    encoder = TextEncoder(tokenizer, dim=16, depth=1, heads=2)
    features = ops.convert_to_numpy(encoder.encode(["a cat", "a dog"]))
    assert features.shape == (2, 8, 16) and features.dtype == np.float32
    # Every position sees every other: the word after "a" changes the
    # features of "a" and of the padding.
    assert np.abs(features[0, 1] - features[1, 1]).max() > 1e-4
    assert np.abs(features[0, 6] - features[1, 6]).max() > 1e-4
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.tokenizer.get_config() == tokenizer.get_config()
    np.testing.assert_allclose(ops.convert_to_numpy(loaded.encode(["a cat", "a dog"])), features,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"dim must be divisible by heads; got dim=10, heads=4"):
        TextEncoder(tokenizer, dim=10, heads=4)
    with pytest.raises(TypeError, match=r"tokenizer must be a WordTokenizer; got list"):
        TextEncoder(["a"])


# One level, attending at it: every kind of block with a context, at the
# smallest size (JAX compiles each operation of an eager call on its own).
PROMPTED = dict(widths=(8,), blocks_per_level=1, attention_levels=(0,), groups=4, context_dim=6)


def _context(length, seed):
    return np.random.default_rng(seed).normal(size=(2, length, 6)).astype("float32")


def test_a_prompted_unet_cross_attends_to_its_context(tmp_path):
    keras.utils.set_random_seed(0)
    net = kd.UNet((4, 4, 1), num_classes=3, **PROMPTED)
    assert [layer.name for layer in net.layers if "attn" in layer.name] == [
        "down_0_attn_0", "mid_attn", "up_0_attn_0", "up_0_attn_1"]
    assert all(isinstance(net.get_layer(name), SpatialTransformer)
               for name in ("down_0_attn_0", "mid_attn", "up_0_attn_0", "up_0_attn_1"))
    # One call for two contexts (a batch of 4), as each new call costs JAX a
    # compile of every operation.
    x = np.tile(np.random.default_rng(1).normal(size=(2, 4, 4, 1)).astype("float32"), (2, 1, 1, 1))
    t, labels = np.array([5, 90, 5, 90], "int32"), np.array([0, 3, 0, 3], "int32")
    inputs = [x, t, labels, np.concatenate([_context(5, 2), _context(5, 3)])]
    out = ops.convert_to_numpy(net(inputs))
    assert out.shape == (4, 4, 4, 1)
    assert np.abs(out[:2] - out[2:]).max() > 1e-4  # the context matters
    assert tuple(net.inputs[-1].shape) == (None, None, 6)  # of any length
    grads = _weight_gradients(net, inputs)
    for variable, grad in zip(net.trainable_variables, grads):
        assert np.abs(grad).max() > 0, variable.path  # cross-attention weights included
    path = tmp_path / "net.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.context_dim == 6 and loaded.get_config() == net.get_config()
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(inputs)), out, atol=1e-6)
    assert "context_dim" not in kd.UNet((8, 8, 1), widths=(8,), groups=4,
                                        attention_levels=()).get_config()
    with pytest.raises(ValueError, match=r"context_dim must be a positive integer or None; got 0"):
        kd.UNet((4, 4, 1), **dict(PROMPTED, context_dim=0))
