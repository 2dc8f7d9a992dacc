"""SDXL's text encoders against transformers, on tiny random configurations:
`CLIPTextModel` read at its penultimate layer as SDXL reads it (no final
layer norm), and `CLIPTextModelWithProjection` (OpenCLIP bigG's class):
penultimate features and the projected pooled output, with the end token
found either way transformers finds it."""

import keras
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel
from transformers import CLIPTextModelWithProjection

from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
from keras_diffusion.stable_diffusion.clip import text_model_state_dict

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=0, pad_token_id=1)


def token_ids(eos):
    ids = np.full((2, 77), 1, "int32")
    ids[0, :6] = [0, 17, 400, 33, 999, 5][:6] if eos == 2 else [0, 17, 400, 33, 998, eos]
    ids[1, :4] = [0, 998, 21, eos if eos != 2 else 999]
    if eos == 2:
        ids[0, 6] = 999  # the largest id ends each sequence
    return ids


def ours_for(reference, **options):
    config = {**reference.config.to_dict(), "architectures": [type(reference).__name__]}
    encoder = CLIPTextTransformer.from_reference_config(config, **options)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    weights.load_state_dict(encoder, text_model_state_dict(state), what="text encoder")
    return encoder


def test_the_penultimate_layer_as_sdxl_reads_it():
    torch.manual_seed(0)
    reference = CLIPTextModel(CLIPTextConfig(**TINY, eos_token_id=2)).eval()
    ours = ours_for(reference, skip_layers=1, final_layer_norm=False)
    ids = token_ids(2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    got = keras.ops.convert_to_numpy(ours(ids))
    np.testing.assert_allclose(got, expected.hidden_states[-2].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("eos", [2, 998], ids=["largest id", "eos_token_id"])
def test_the_projected_pooled_output_and_features(eos):
    torch.manual_seed(1)
    reference = CLIPTextModelWithProjection(
        CLIPTextConfig(**TINY, eos_token_id=eos, projection_dim=24)).eval()
    ours = ours_for(reference, skip_layers=1, final_layer_norm=False)
    assert ours.projection_dim == 24 and ours.eos_token_id == eos
    ids = token_ids(eos)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    features, pooled = (keras.ops.convert_to_numpy(x) for x in ours(ids))
    np.testing.assert_allclose(features, expected.hidden_states[-2].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, expected.text_embeds.numpy(), atol=1e-4, rtol=0)
    # Every weight of the reference found its place, and the file form round-trips.
    assert len(ours.weights) == len(reference.state_dict())

    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert again.get_config() == ours.get_config()
