"""The SDXL UNet against diffusers' `UNet2DConditionModel` with SDXL's
options, on tiny random configurations built here as diffusers' own SDXL
tests build theirs: transformers several blocks deep (per level, and per
layer on the up path), the "text_time" added embedding of the pooled prompt
and the micro-conditioning time ids (6 for the base model, 5 for the
refiner), no attention at the first level."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.unet import StableDiffusionUNet
from test_sd_unet import evaluate_with
from test_sd_unet import reference_state

# diffusers' StableDiffusionXLPipelineFastTests' UNet, with 32 / 64 channels.
SDXL_TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "sample_size": 16,
}
# A refiner's: 5 time ids (the aesthetic score in place of the target size),
# attention at every level, per-layer depths on the up path.
REFINER_TINY = {
    **SDXL_TINY,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "projection_class_embeddings_input_dim": 5 * 8 + 24,
    "transformer_layers_per_block": [[1, 2], 3],
    "reverse_transformer_layers_per_block": [[3, 1, 2], [2, 1, 1]],
    "cross_attention_dim": 48,
}


def inputs_for(config, ids):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 8)).astype("float32")
    t = np.array([999.0, 23.5], "float32")
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype("float32")
    pooled = config["projection_class_embeddings_input_dim"] - ids * 8
    text_embeds = rng.standard_normal((2, pooled)).astype("float32")
    # Sizes, offsets and scores as SDXL passes them.
    time_ids = np.array([[1024, 768, 0, 16, 1024, 1024, 0, 0, 0, 0, 0][:ids],
                         [512, 512, 64, 0, 6.0, 512, 0, 0, 0, 0, 0][:ids]], "float32")
    return x, t, context, text_embeds, time_ids


@pytest.mark.parametrize("config, ids", [(SDXL_TINY, 6), (REFINER_TINY, 5)],
                         ids=["base", "refiner"])
def test_one_evaluation_equals_diffusers(config, ids):
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config).eval()
    ours = StableDiffusionUNet.from_reference_config(dict(reference.config))
    weights.load_state_dict(ours, reference_state(reference), what="UNet")
    x, t, context, text_embeds, time_ids = inputs_for(config, ids)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                             added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                "time_ids": torch.from_numpy(time_ids)}).sample
    got = evaluate_with(ours, [x.transpose(0, 2, 3, 1), t, context, text_embeds, time_ids])
    assert np.abs(expected.numpy()).max() > 0.1
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected.numpy(), atol=1e-4, rtol=0)
    # Every weight found its place, and the time ids matter.
    assert len(ours.weights) == len(reference.state_dict())
    moved = evaluate_with(ours, [x.transpose(0, 2, 3, 1), t, context, text_embeds, time_ids * 2])
    assert np.abs(moved - got).max() > 1e-3


def test_the_config_round_trips_and_bad_options_are_named():
    import keras

    ours = StableDiffusionUNet.from_reference_config(REFINER_TINY)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert again.config == ours.config and len(again.weights) == len(ours.weights)
    with pytest.raises(ValueError, match="needs addition_time_embed_dim, a positive integer"):
        StableDiffusionUNet.from_reference_config({**SDXL_TINY, "addition_time_embed_dim": None})
    with pytest.raises(ValueError, match="transformer_layers_per_block must give each level a "
                                         r"positive integer, or one per layer of the level \(2\)"):
        StableDiffusionUNet.from_reference_config({**SDXL_TINY,
                                                   "transformer_layers_per_block": [1, [2]]})
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block must have one "
                                         "entry per level"):
        StableDiffusionUNet.from_reference_config(
            {**SDXL_TINY, "reverse_transformer_layers_per_block": [1]})
