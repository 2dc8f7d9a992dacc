"""The SD 3 / 3.5 transformer (MMDiT) against diffusers'
`SD3Transformer2DModel`, on tiny random configurations built here as
diffusers' own SD3 tests build theirs: SD 3 (no query / key norm), SD 3.5
(RMS query / key norms), SD 3.5 medium (a second, image-only attention in
the first block), square and non-square latents, skipped blocks. The real
SD 3.5 medium is checked key by key against diffusers' on the meta device,
ours built with shapes and no values."""

import contextlib
import functools
import json
import re

import keras
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from conftest import once
from keras_diffusion.precision import policy_scope
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.mmdit import SD3Transformer
from keras_diffusion.stable_diffusion.mmdit import position_table
from test_sd_unet import reference_state

# diffusers' SD3Transformer2DModel tests' configuration.
SD3_TINY = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 96,
}
SD35_TINY = {**SD3_TINY, "patch_size": 2, "num_layers": 2, "qk_norm": "rms_norm"}
SD35_MEDIUM_TINY = {**SD35_TINY, "num_layers": 3, "dual_attention_layers": [0]}
STYLES = {"sd3": SD3_TINY, "sd35": SD35_TINY, "sd35_medium": SD35_MEDIUM_TINY}

# stabilityai/stable-diffusion-3.5-medium's transformer/config.json.
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# The other two releases' transformer/config.json, as they are published:
# SD 3 medium (no query / key norm) and SD 3.5 large (38 blocks of 38 heads).
SD3_MEDIUM_TRANSFORMER = {
    **{key: value for key, value in SD35_MEDIUM_TRANSFORMER.items()
       if key not in ("dual_attention_layers", "qk_norm")},
    "pos_embed_max_size": 192,
}
SD35_LARGE_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}
REAL_SIZES = {"sd35_medium": (SD35_MEDIUM_TRANSFORMER, 2_243_171_520),
              "sd3_medium": (SD3_MEDIUM_TRANSFORMER, 2_028_328_000),
              "sd35_large": (SD35_LARGE_TRANSFORMER, 8_056_627_520)}


def reference_model(config, seed=0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**config).eval()


@functools.cache
def built(style):
    """(style, diffusers' transformer, ours holding its weights), once per run."""
    reference = reference_model(STYLES[style])
    ours = SD3Transformer.from_reference_config(dict(reference.config))
    weights.load_state_dict(ours, reference_state(reference), what="transformer")
    return style, reference, ours


@pytest.fixture(params=list(STYLES))
def pair(request):
    return built(request.param)


@pytest.fixture
def medium():
    """The SD 3.5 medium style: every kind of block."""
    return built("sd35_medium")


def example_inputs(config, height=16, width=16, batch=2):
    """NCHW latents, timesteps as the flow scheduler gives them (1000 sigma),
    the prompt's features, the pooled prompt."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, config["in_channels"], height, width)).astype("float32")
    t = np.array([1000.0, 312.5, 3.0][:batch], "float32")
    context = rng.standard_normal((batch, 7, config["joint_attention_dim"])).astype("float32")
    pooled = rng.standard_normal((batch, config["pooled_projection_dim"])).astype("float32")
    return x, t, context, pooled


def expected_output(reference, inputs, **kwargs):
    x, t, context, pooled = (torch.from_numpy(a) for a in inputs)
    with torch.no_grad():
        return reference(x, context, pooled, t, **kwargs).sample.numpy()


def evaluate(model, inputs, **kwargs):
    """Ours on the NCHW inputs, its output NCHW. Under JAX one compiled call
    (stateless, so keyword options such as `skip_layers` pass through):
    JAX's eager mode compiles each operation on its own."""
    x, t, context, pooled = inputs
    inputs = [x.transpose(0, 2, 3, 1), t, context, pooled]
    if keras.backend.backend() == "jax":
        import jax

        def run(trainable, non_trainable, inputs):
            return model.stateless_call(trainable, non_trainable, inputs, **kwargs)[0]

        y = jax.jit(run)([v.value for v in model.trainable_variables],
                         [v.value for v in model.non_trainable_variables], inputs)
    else:
        y = model(inputs, **kwargs)
    return np.asarray(keras.ops.convert_to_numpy(y)).transpose(0, 3, 1, 2)


def check_equal(reference, ours, inputs, **kwargs):
    expected = expected_output(reference, inputs, **kwargs)
    got = evaluate(ours, inputs, **kwargs)
    assert got.shape == expected.shape == inputs[0].shape[:1] + (4,) + inputs[0].shape[2:]
    assert np.abs(expected).max() > 0.1  # the network does something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    return got


def test_one_evaluation_equals_diffusers(pair):
    _, reference, ours = pair
    check_equal(reference, ours, example_inputs(reference.config))


@pytest.mark.parametrize("style", ["sd3", "sd35_medium"])
def test_non_square_latents_equal_diffusers(style):
    """The position table is cropped to the centre of the patch grid off the
    square: 12 x 20 latents, patches of 1 and of 2."""
    _, reference, ours = built(style)
    check_equal(reference, ours, example_inputs(reference.config, 12, 20))


def test_skipped_blocks_equal_diffusers(pair):
    """diffusers' `skip_layers` (skip-layer guidance): the blocks named are
    left out, their inputs passed on; the last block can be skipped too."""
    _, reference, ours = pair
    inputs = example_inputs(reference.config, batch=1)
    full = evaluate(ours, inputs)
    skipped = check_equal(reference, ours, inputs, skip_layers=[1])
    assert np.abs(skipped - full).max() > 1e-3
    last = reference.config.num_layers - 1
    check_equal(reference, ours, inputs, skip_layers=[0, last])


@once
def test_state_dict_round_trips_to_diffusers_keys_and_values(pair):
    _, reference, ours = pair
    expected, got = reference_state(reference), weights.state_dict(ours)
    assert sorted(got) == sorted(expected)
    assert [key for key in expected if not np.array_equal(got[key], expected[key])] == []
    # The position table is a buffer in diffusers, not a parameter.
    trainable = sum(int(np.prod(v.shape)) for v in ours.trainable_weights)
    assert trainable == sum(v.numel() for v in reference.parameters())
    assert [v.path for v in ours.non_trainable_weights] == ["pos_embed/table"]


@once
def test_interface(pair):
    _, reference, ours = pair
    config = reference.config
    assert [tuple(i.shape[1:]) for i in ours.inputs] == [
        (None, None, config.in_channels), (), (None, config.joint_attention_dim),
        (config.pooled_projection_dim,)]
    assert (ours.context_dim, ours.pooled_dim, ours.patch_size, ours.downsampling_factor) == (
        config.joint_attention_dim, config.pooled_projection_dim, config.patch_size,
        config.patch_size)
    assert ours.config["dual_attention_layers"] == list(config.dual_attention_layers)


@once
def test_the_initial_position_table_is_diffusers():
    """Built without a checkpoint, the table holds diffusers' values (its
    scale follows sample_size)."""
    config = {**SD35_TINY, "sample_size": 24, "pos_embed_max_size": 20}
    reference = reference_model(config)
    ours = SD3Transformer.from_reference_config(config)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours.get_layer("pos_embed").table),
                               reference.pos_embed.pos_embed.numpy(), atol=1e-6, rtol=0)
    assert position_table(32, 20, 12).shape == (1, 400, 32)


@once
def test_config_round_trips_and_a_keras_file_reloads_the_same_function(medium, tmp_path):
    _, reference, ours = medium
    config = ours.get_config()
    assert json.loads(json.dumps(config)) == config
    assert SD3Transformer.from_config(config).get_config() == config
    ours.save(tmp_path / "transformer.keras")
    loaded = keras.saving.load_model(tmp_path / "transformer.keras")
    assert isinstance(loaded, SD3Transformer) and loaded.get_config() == config
    inputs = example_inputs(reference.config, 8, 12, batch=1)
    np.testing.assert_array_equal(evaluate(loaded, inputs), evaluate(ours, inputs))


@once
def test_built_from_a_checkpoint_every_weight_is_taken_as_it_is_made():
    reference = reference_model(SD35_MEDIUM_TINY, seed=1)
    state = reference_state(reference)
    with weights.building_from(state) as taken:
        built = SD3Transformer.from_reference_config(SD35_MEDIUM_TINY)
    assert taken == set(state)  # the position table too
    weights.load_state_dict(built, state, what="transformer", taken=taken)
    got = weights.state_dict(built)
    assert all(np.array_equal(got[key], value) for key, value in state.items())


def test_gradient_checkpointing_changes_nothing_but_memory(medium):
    _, reference, ours = medium
    inputs = example_inputs(reference.config, batch=1)
    before = evaluate(ours, inputs)
    ours.enable_gradient_checkpointing()
    try:
        np.testing.assert_allclose(evaluate(ours, inputs), before, atol=1e-6, rtol=0)
    finally:
        ours.enable_gradient_checkpointing(False)


@pytest.mark.parametrize("policy, weights_dtype", [("mixed_bfloat16", "float32"),
                                                   ("bfloat16", "bfloat16")])
def test_half_precision_output_is_float32_and_close(policy, weights_dtype):
    """Mixed precision (float32 weights) and weights in bfloat16, as
    `load_model(dtype=...)` builds a part."""
    reference = reference_model(SD35_MEDIUM_TINY)
    inputs = example_inputs(reference.config)
    expected = expected_output(reference, inputs)
    with policy_scope(policy):
        ours = SD3Transformer.from_reference_config(dict(reference.config))
    weights.load_state_dict(ours, reference_state(reference))
    assert ours.outputs[0].dtype == "float32"
    kernel, _ = weights.checkpoint_table(ours)["transformer_blocks.0.attn.to_q.weight"]
    assert keras.backend.standardize_dtype(kernel.dtype) == weights_dtype
    # A part in half precision says so in its config, to be rebuilt so.
    assert ours.get_config().get("weights_dtype", "float32") == weights_dtype
    got = evaluate(ours, inputs)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


# ----------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, message", [
    ({"qk_norm": "layer_norm"}, re.escape("does not support qk_norm='layer_norm'; supported: "
                                          "None (SD 3) and 'rms_norm' (SD 3.5).")),
    ({"pos_embed_max_size": None}, "does not support pos_embed_max_size=None"),
    ({"caption_projection_dim": 48}, r"caption_projection_dim \(48\) must equal "
                                     r"num_attention_heads \* attention_head_dim \(32\)"),
    ({"dual_attention_layers": [0, 4]}, r"dual_attention_layers must list block indices below "
                                        r"num_layers \(4\); got \[0, 4\]"),
    ({"num_layers": 0}, "num_layers must be a positive integer; got 0"),
    ({"attention_head_dim": 6, "num_attention_heads": 3, "caption_projection_dim": 18},
     r"must be a multiple of 4 .*; got 18"),
    ({"_class_name": "FluxTransformer2DModel"}, "_class_name='FluxTransformer2DModel'"),
])
@once
def test_bad_configs_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        SD3Transformer.from_reference_config({**SD3_TINY, **options})
    assert "\n" not in str(error.value)


@once
def test_the_constructor_takes_only_diffusers_options():
    with pytest.raises(ValueError, match=r"unknown options \['_class_name'\]"):
        SD3Transformer(**SD35_MEDIUM_TRANSFORMER)


@pytest.mark.parametrize("shape, skip, message", [
    ((1, 15, 16, 4), None, r"height \(15\) must be a multiple of the transformer's "
                           r"patch_size \(2\)"),
    ((1, 16, 194, 4), None, r"width \(194\) is more than the transformer's 96 patches of 2"),
    ((1, 16, 16, 4), [3], r"skip_layers must list block indices below num_layers \(3\)"),
])
@once
def test_bad_calls_are_refused(medium, shape, skip, message):
    _, reference, ours = medium
    _, t, context, pooled = example_inputs(reference.config, batch=1)
    with pytest.raises(ValueError, match=message):
        ours([np.zeros(shape, "float32"), t, context, pooled], skip_layers=skip)


# ------------------------------------------------------------------ real size
@contextlib.contextmanager
def shapes_only():
    """Keras variables made in it have their shapes and no values (a
    stateless scope defers them), and are never given any: a real-size
    model's table of keys and shapes, without its memory. Keras keeps
    deferred variables in a global list it would initialize later; they are
    taken back out of it."""
    from keras.src.backend.common import global_state

    before = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute("uninitialized_variables", before)


@once
@pytest.mark.parametrize("release", list(REAL_SIZES))
def test_real_size_keys_shapes_and_parameter_count(release):
    """The released transformers (2.0B, 2.2B and 8.1B parameters): the same
    keys as diffusers' state dict, each at its shape, and the same
    parameter count."""
    config, parameters = REAL_SIZES[release]
    with torch.device("meta"):
        reference = SD3Transformer2DModel.from_config(config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    with shapes_only():
        ours = SD3Transformer.from_reference_config(config)
        table = weights.checkpoint_table(ours)
        trainable = sum(int(np.prod(v.shape)) for v in ours.trainable_weights)
    assert sorted(table) == sorted(expected)
    for key, (variable, layout) in table.items():
        assert tuple(variable.shape) == weights.keras_shape(expected[key], layout), key
    assert trainable == sum(p.numel() for p in reference.parameters()) == parameters
