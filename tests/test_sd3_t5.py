"""SD 3's third text encoder and its tokenizer against transformers: T5's
encoder (`T5EncoderModel`) on tiny random configurations built here, the
real t5-v1_1-xxl size by its parameter count, and the T5 tokenizer on a
small Unigram `tokenizer.json` written here; run once per KERAS_BACKEND."""

import json
import sys

import keras
import numpy as np
import pytest
import torch
from keras import ops
from transformers import T5Config
from transformers import T5EncoderModel
from transformers import T5TokenizerFast
from transformers.models.t5.modeling_t5 import T5Attention

from conftest import once
from keras_diffusion import precision
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.t5 import T5Encoder
from keras_diffusion.stable_diffusion.t5 import T5Tokenizer
from keras_diffusion.stable_diffusion.t5 import relative_position_buckets
from keras_diffusion.stable_diffusion.t5 import t5_encoder_state_dict

TOLERANCE = 1e-4
# bfloat16 keeps 8 bits of mantissa: weights and activations rounded at each
# of the two blocks leave differences of a few hundredths on outputs of size ~1.
BFLOAT16_TOLERANCE = 0.1
TINY = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu")
RELU = dict(TINY, feed_forward_proj="relu", d_kv=6, relative_attention_num_buckets=12)
# google/t5-v1_1-xxl, SD 3's text_encoder_3.
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           relative_attention_num_buckets=32, relative_attention_max_distance=128,
           feed_forward_proj="gated-gelu")
XXL_PARAMETERS = 4_762_310_656


def reference(config, seed):
    """A transformers T5EncoderModel with every weight random, norms included."""
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def reference_state(model):
    return {key: value.float().numpy() for key, value in model.state_dict().items()}


def ported(model):
    encoder = T5Encoder.from_reference_config(model.config.to_dict())
    weights.load_state_dict(encoder, t5_encoder_state_dict(reference_state(model)), "T5 encoder")
    return encoder


def token_ids(length=256):
    """Prompts as SD 3 tokenizes them: tokens, `</s>` (1), `<pad>` (0) up to `length`."""
    rng = np.random.default_rng(0)
    ids = np.zeros((3, length), "int32")
    for row, count in enumerate((4, 40, length - 1)):
        ids[row, : count + 1] = [*rng.integers(3, 300, count), 1]
    return ids


def reference_output(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype("int64"))).last_hidden_state.float().numpy()


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def pair(request):
    model = reference(TINY if request.param == "gated-gelu" else RELU,
                      0 if request.param == "gated-gelu" else 1)
    return model, ported(model)


def test_last_hidden_state_matches_transformers(pair):
    model, encoder = pair
    ids = token_ids()
    features = ops.convert_to_numpy(encoder(ids))
    assert features.shape == (3, 256, 32) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference_output(model, ids), atol=TOLERANCE, rtol=0)
    # Any length: the positions are relative.
    np.testing.assert_allclose(ops.convert_to_numpy(encoder(ids[:, :7])),
                               reference_output(model, ids[:, :7]), atol=TOLERANCE, rtol=0)


@once
@pytest.mark.parametrize("num_buckets, max_distance", [(8, 16), (12, 16), (32, 128), (33, 40)])
def test_buckets_are_transformers(num_buckets, max_distance):
    """Every distance, the far ones and the bins' edges included."""
    distance = torch.arange(-4 * max_distance, 4 * max_distance + 1)
    expected = T5Attention._relative_position_bucket(distance, True, num_buckets, max_distance)
    table = relative_position_buckets(num_buckets, max_distance)
    ours = table[np.clip(distance.numpy(), -max_distance, max_distance) + max_distance]
    np.testing.assert_array_equal(ours, expected.numpy())


@once
def test_state_dict_layouts(pair):
    model, encoder = pair
    reference_weights = reference_state(model)
    ours = weights.state_dict(encoder)
    # The tied embedding is written once, as `shared.weight`.
    assert set(ours) == set(reference_weights) - {"encoder.embed_tokens.weight"}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, reference_weights[key], err_msg=key)
    # A file with the encoder's own spelling only loads too.
    encoder_only = {k: v for k, v in reference_weights.items() if k != "shared.weight"}
    assert set(t5_encoder_state_dict(encoder_only)) == set(ours)
    reloaded = T5Encoder.from_config(encoder.get_config())
    weights.load_state_dict(reloaded, t5_encoder_state_dict(encoder_only), "T5 encoder")
    ids = token_ids()[:1, :20]
    np.testing.assert_array_equal(ops.convert_to_numpy(reloaded(ids)),
                                  ops.convert_to_numpy(encoder(ids)))


@once
def test_keras_file_round_trip(pair, tmp_path):
    _, encoder = pair
    path = tmp_path / "t5.keras"
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, T5Encoder) and loaded.get_config() == encoder.get_config()
    assert loaded.dim == loaded.output_dim == 32
    ids = token_ids()[:, :30]
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(ids)),
                                  ops.convert_to_numpy(encoder(ids)))


def test_bfloat16_weights():
    model = reference(TINY, 2)
    ids = token_ids()
    expected = reference_output(model.to(torch.bfloat16), ids)
    with precision.policy_scope("bfloat16"):
        encoder = ported(model)
    assert encoder.get_config()["weights_dtype"] == "bfloat16"
    assert {v.dtype for v in encoder.weights} == {"bfloat16"}
    features = ops.convert_to_numpy(ops.cast(encoder(ids), "float32"))
    np.testing.assert_allclose(features, expected, atol=BFLOAT16_TOLERANCE, rtol=0)


def test_float16_keeps_the_stream_in_float32():
    """Feed-forward outputs beyond float16's range (T5 v1.1's habit) are
    kept: the stream is float32 and `wo` multiplies in float32. (A model
    wholly in float16 clamps them and is off by more than 1 here.)"""
    model = reference(TINY, 3)
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
        ids = token_ids()[:, :40]
        output = model(torch.from_numpy(ids.astype("int64")), output_hidden_states=True)
    assert output.hidden_states[1].abs().max() > np.finfo(np.float16).max
    expected = output.last_hidden_state.numpy()
    with precision.policy_scope("float16"):
        encoder = ported(model)
    features = ops.convert_to_numpy(ops.cast(encoder(ids), "float32"))
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features, expected, atol=0.05, rtol=0)


@once
def test_real_size_parameter_count():
    """t5-v1_1-xxl's encoder as transformers builds it (on the meta device)
    and as ours lays out its checkpoint, counted from shapes: variables made
    in a stateless scope get no values."""
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**XXL))
    assert sum(p.numel() for p in model.parameters()) == XXL_PARAMETERS
    try:
        with keras.StatelessScope(initialize_variables=False):
            encoder = T5Encoder(**XXL)
        table = weights.checkpoint_table(encoder)
        assert sum(int(np.prod(variable.shape)) for variable, _ in table.values()) == (
            XXL_PARAMETERS)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: weights.keras_shape(expected[k], layout) for k, (_, layout) in table.items()} \
            == {k: tuple(variable.shape) for k, (variable, _) in table.items()}
    finally:
        keras.utils.clear_session()  # forget the variables left without values


@pytest.mark.parametrize("change, message", [
    ({"feed_forward_proj": "gated-silu"},
     r"feed_forward_proj must be one of gated-gelu, relu .*; got 'gated-silu'"),
    ({"model_type": "umt5"}, r"model_type='umt5'; supported: 't5'"),
    ({"relative_attention_max_distance": 2},
     r"relative_attention_max_distance must be above .* \(2, .*got 2"),
    ({"num_heads": 0}, r"num_heads must be a positive integer; got 0"),
])
@once
def test_refused_configs(change, message):
    config = T5Config(**TINY).to_dict()
    assert T5Encoder.from_reference_config(config).get_config()["d_model"] == 32
    with pytest.raises(ValueError, match=message):
        T5Encoder.from_reference_config(dict(config, **change))


# ------------------------------------------------------------------ tokenizer
PIECES = ["▁a", "▁photo", "▁of", "▁an", "▁astro", "naut", "▁riding", "▁horse", "▁on", "▁the",
          "▁moon", "▁", ",", ".", "s", "ing", "▁t", "▁h", "e", "r", "▁c", "at"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
SENTINELS = ["<extra_id_2>", "<extra_id_1>", "<extra_id_0>"]
PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "  spaces   between\twords\nand lines  ",
    "unknown: ☃ 漢字 Ünïcödé and UPPER case",
    "a cat with <extra_id_0> in it",
    " ".join(["the horse"] * 200),  # more than 256 tokens: cut
]


def t5_like_tokenizer_json():
    """A small tokenizer.json laid out as T5's: `<pad>`, `</s>`, `<unk>`
    first, a Unigram model, whitespace then Metaspace pre-tokenizing,
    `</s>` appended, the sentinels last."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import Unigram

    rng = np.random.default_rng(0)
    vocabulary = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocabulary += [(piece, float(-rng.uniform(2, 8))) for piece in PIECES + LETTERS]
    vocabulary += [("▁" + letter, -9.0) for letter in LETTERS] + [(s, 0.0) for s in SENTINELS]
    tokenizer = Tokenizer(Unigram(vocabulary, unk_id=2, byte_fallback=False))
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>", *SENTINELS])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tokenizer.to_str()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_tokenizer") / "tokenizer.json"
    path.write_text(t5_like_tokenizer_json(), encoding="utf-8")
    return path


def as_sd3_calls_it(tokenizer, prompts, max_length=256):
    """diffusers' `_get_t5_prompt_embeds`' call of the tokenizer."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="np").input_ids


@once
def test_tokenizer_ids_match_transformers(tokenizer_file):
    expected = as_sd3_calls_it(T5TokenizerFast(tokenizer_file=str(tokenizer_file),
                                               extra_ids=len(SENTINELS)), PROMPTS)
    ours = T5Tokenizer.from_folder(tokenizer_file.parent)
    with pytest.warns(UserWarning, match="1 of 6 prompts were cut to T5's 255 tokens"):
        ids = ours(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (6, 256)
    np.testing.assert_array_equal(ids, expected)
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all()  # the empty prompt: `</s>`, then padding
    assert (ids[3] == 2).any()  # unknown characters
    assert ids[-1, -1] == 1  # cut, then the end token
    ours.max_length = 16
    np.testing.assert_array_equal(ours(PROMPTS[0]), as_sd3_calls_it(
        T5TokenizerFast(tokenizer_file=str(tokenizer_file), extra_ids=len(SENTINELS)),
        PROMPTS[:1], max_length=16))
    assert ours.decode(ours(PROMPTS[0]))[0] == PROMPTS[0]


@once
def test_tokenizer_folder_and_config_round_trip(tokenizer_file, tmp_path):
    ours = T5Tokenizer.from_folder(tokenizer_file.parent)
    ours.max_length = 64
    folder = ours.save_folder(tmp_path / "tokenizer_3")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    short = PROMPTS[:-1]
    expected = ours(short)
    reread = T5TokenizerFast.from_pretrained(folder)
    np.testing.assert_array_equal(as_sd3_calls_it(reread, short, max_length=64), expected)
    assert len(reread) == ours.vocabulary_size  # the folder's sentinels, none added
    assert T5Tokenizer.from_folder(folder).max_length == 256  # SD 3's, not the folder's
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert isinstance(again, T5Tokenizer) and again.max_length == 64
    np.testing.assert_array_equal(again(short), expected)


@once
def test_tokenizer_refusals(tokenizer_file, tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="holds spiece.model but no tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        T5Tokenizer.from_folder(tmp_path / "missing")
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="its model is 'BPE'; expected 'Unigram'"):
        T5Tokenizer(json.dumps(dict(data, model={"type": "BPE", "vocab": {}, "merges": []})))
    with pytest.raises(ValueError, match="no token '<s>' for its pad_token"):
        T5Tokenizer(tokenizer_file.read_text(encoding="utf-8"), pad_token="<s>")
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        T5Tokenizer(tokenizer_file.read_text(encoding="utf-8"), max_length=0)


@once
def test_tokenizer_without_the_tokenizers_library(tokenizer_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'keras-diffusion\[sd\]'"):
        T5Tokenizer.from_folder(tokenizer_file.parent)
