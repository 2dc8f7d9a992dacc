"""CLIP's text transformer against transformers' `CLIPTextModel`, on tiny
random configurations built here; run once per KERAS_BACKEND."""

import types

import keras
import numpy as np
import pytest
import torch
from keras import ops
from transformers import CLIPTextConfig
from transformers import CLIPTextModel

from conftest import once
from keras_diffusion import text
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
from keras_diffusion.stable_diffusion.clip import text_model_state_dict

TOLERANCE = 1e-4
BOS, EOS = 998, 999
# SD 1.x style (OpenAI CLIP) and SD 2.x style (OpenCLIP) at toy size.
SD1 = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
           num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
           bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
SD2 = dict(SD1, num_hidden_layers=4, hidden_act="gelu", intermediate_size=64, pad_token_id=0)


def reference(config, seed):
    """A transformers CLIPTextModel with every weight random, norms included."""
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def ported(model, skip_layers=0):
    encoder = CLIPTextTransformer.from_reference_config(model.config.to_dict(),
                                                        skip_layers=skip_layers)
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    weights.load_state_dict(encoder, text_model_state_dict(state), "text encoder")
    return encoder


def token_ids(pad, rows=3, length=77):
    """Prompts of different lengths as a tokenizer pads them: bos, tokens,
    eos, then `pad` up to `length`."""
    rng = np.random.default_rng(0)
    ids = np.full((rows, length), pad, "int32")
    for row, count in enumerate((5, 20, length - 2)[:rows]):
        ids[row, : count + 2] = [BOS, *rng.integers(1, 990, count), EOS]
    return ids


def reference_states(model, ids):
    with torch.no_grad():
        output = model(torch.from_numpy(ids.astype("int64")), output_hidden_states=True)
    return output.last_hidden_state.numpy(), [h.numpy() for h in output.hidden_states]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    config = SD1 if request.param == "sd1" else SD2
    model = reference(config, 0 if request.param == "sd1" else 1)
    return config, model, ported(model)


def test_hidden_states_match_transformers(pair):
    config, model, encoder = pair
    ids = token_ids(config["pad_token_id"])
    expected, _ = reference_states(model, ids)
    features = ops.convert_to_numpy(encoder(ids))
    assert features.shape == (3, 77, 32) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=TOLERANCE, rtol=0)
    # Causal: a prompt's features do not depend on the padding after it.
    short = ops.convert_to_numpy(encoder(ids[:1, :10]))
    np.testing.assert_allclose(short, features[:1, :10], atol=TOLERANCE, rtol=0)


def test_skip_layers_is_clip_skip(pair):
    """diffusers' clip_skip=1: the penultimate hidden state, final layer norm applied."""
    config, model, _ = pair
    ids = token_ids(config["pad_token_id"])
    _, hidden_states = reference_states(model, ids)
    with torch.no_grad():
        expected = model.final_layer_norm(torch.from_numpy(hidden_states[-2])).numpy()
    encoder = ported(model, skip_layers=1)
    np.testing.assert_allclose(ops.convert_to_numpy(encoder(ids)), expected, atol=TOLERANCE,
                               rtol=0)
    # The skipped layer keeps its weights: the state dict still round-trips.
    assert len(encoder.skipped_layers) == 1
    assert set(weights.state_dict(encoder)) == set(text_model_state_dict(model.state_dict()))


@once
def test_state_dict_layouts(pair):
    _, model, encoder = pair
    reference_weights = {key: value.numpy() for key, value in model.state_dict().items()}
    ours = weights.state_dict(encoder)
    assert set(ours) == {f"text_model.{key}" for key in reference_weights}
    for key, value in reference_weights.items():
        np.testing.assert_array_equal(ours[f"text_model.{key}"], value, err_msg=key)
    # The layout older transformers wrote: prefixed keys plus a position_ids buffer.
    older = {f"text_model.{key}": value for key, value in reference_weights.items()}
    older["text_model.embeddings.position_ids"] = np.arange(77)[None]
    assert set(text_model_state_dict(older)) == set(ours)


def test_text_encoder_slot(pair):
    """What a prompted model asks of its text encoder."""
    config, _, encoder = pair
    assert encoder.dim == encoder.output_dim == 32 and encoder.max_length == 77
    assert encoder.tokenizer is None

    def tokenizer(texts):
        return token_ids(config["pad_token_id"], rows=len(texts))

    network = types.SimpleNamespace(context_dim=32)
    assert text.check_prompted_parts(network, encoder, tokenizer, None) is tokenizer
    with pytest.raises(ValueError, match="features of width 32 but the network's context_dim"):
        text.check_prompted_parts(types.SimpleNamespace(context_dim=64), encoder, tokenizer, None)


@once
def test_keras_file_round_trip(pair, tmp_path):
    config, model, _ = pair
    encoder = ported(model, skip_layers=1)
    path = tmp_path / "clip.keras"
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, CLIPTextTransformer)
    assert loaded.get_config() == encoder.get_config()
    ids = token_ids(config["pad_token_id"], rows=2)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(ids)),
                                  ops.convert_to_numpy(encoder(ids)))
    for key, value in weights.state_dict(encoder).items():
        np.testing.assert_array_equal(weights.state_dict(loaded)[key], value, err_msg=key)


@once
def test_too_long_ids(pair):
    _, _, encoder = pair
    with pytest.raises(ValueError, match="length 78 are longer than .* 77 positions"):
        encoder(np.zeros((1, 78), "int32"))


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu_new"}, r"hidden_act must be one of quick_gelu, gelu; got 'gelu_new'"),
    ({"model_type": "clip"}, r"model_type='clip'; supported: 'clip_text_model'"),
    ({"num_attention_heads": 5}, r"hidden_size=32, num_attention_heads=5"),
])
@once
def test_refused_configs(change, message):
    config = CLIPTextConfig(**SD1).to_dict()
    assert CLIPTextTransformer.from_reference_config(config).get_config()["hidden_size"] == 32
    with pytest.raises(ValueError, match=message):
        CLIPTextTransformer.from_reference_config(dict(config, **change))
    with pytest.raises(ValueError, match=r"skip_layers must be below num_hidden_layers \(3\)"):
        CLIPTextTransformer.from_reference_config(config, skip_layers=3)
