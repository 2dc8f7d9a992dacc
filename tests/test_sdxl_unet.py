"""The SDXL UNet against diffusers' `UNet2DConditionModel` with SDXL's
options, on tiny random configurations built here as diffusers' own SDXL
tests build theirs: transformers several blocks deep (per level, and per
layer on the up path), the "text_time" added embedding of the pooled prompt
and the micro-conditioning time ids (6 for the base model, 5 for the
refiner), no attention at the first level."""

import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import once
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


@once
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


# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, as the Hub serves it.
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
SDXL_BASE_PARAMETERS = 2_567_463_684


@once
def test_the_shipped_sdxl_config_at_small_widths_equals_diffusers():
    """Every key of SDXL base's config as the Hub serves it (nulls
    included), with the widths shrunk: ten-deep transformers at the last
    level, as SDXL's."""
    small = {**SDXL_BASE_UNET, "block_out_channels": [32, 32, 64], "attention_head_dim": [1, 2, 4],
             "norm_num_groups": 8, "cross_attention_dim": 64, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32}
    torch.manual_seed(2)
    reference = UNet2DConditionModel(**small).eval()
    ours = StableDiffusionUNet.from_reference_config(small)
    weights.load_state_dict(ours, reference_state(reference), what="UNet")
    x, t, context, text_embeds, time_ids = inputs_for(small, 6)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                             added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                "time_ids": torch.from_numpy(time_ids)}).sample
    got = evaluate_with(ours, [x.transpose(0, 2, 3, 1), t, context, text_embeds, time_ids])
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.skipif(os.environ.get("KD_SLOW_TESTS") != "1",
                    reason="builds SDXL's 2.57B-parameter UNet (5 GB in bfloat16); KD_SLOW_TESTS=1")
def test_real_size_parameter_count():
    import keras

    from keras_diffusion.precision import policy_scope

    with torch.device("meta"):
        reference = UNet2DConditionModel(**SDXL_BASE_UNET)
    assert sum(p.numel() for p in reference.parameters()) == SDXL_BASE_PARAMETERS
    with policy_scope("bfloat16"):
        ours = StableDiffusionUNet.from_reference_config(SDXL_BASE_UNET)
    assert sum(int(np.prod(v.shape)) for v in ours.weights) == SDXL_BASE_PARAMETERS
    assert keras.backend.standardize_dtype(ours.weights[0].dtype) == "bfloat16"
