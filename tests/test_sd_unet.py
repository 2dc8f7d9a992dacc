"""The Stable Diffusion UNet against diffusers' `UNet2DConditionModel`, on
tiny random configurations built here (as diffusers' own tests build theirs):
one evaluation, the state dict both ways, the config through `get_config`
and a `.keras` file, and the errors. The real SD 1.5 / 2.1 sizes are checked
by parameter count when `KD_SLOW_TESTS=1` (860M parameters each)."""

import json
import os
import re
import time

import keras
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import once
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.unet import StableDiffusionUNet

# SD 1.x style: 1x1-convolution projections, one head count for every level,
# the last level without attention (as SD's), a context shorter than 77.
SD1_TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
    "sample_size": 16,
}
# SD 2.x style: linear projections, one head count per level (2 heads of 16
# at 32 channels, 4 of 16 at 64), attention everywhere, 9 input channels as
# the inpainting UNets, a context of 77 tokens.
SD2_TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 24,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 8,
    "in_channels": 9,
    "out_channels": 4,
    "sample_size": 16,
}
# Every other option the UNet implements, away from SD's values: per-level
# layers, attention only below a plain level, heads that do not divide the
# channels (3 heads of 13 at 40 channels), asymmetric downsampling padding,
# centring, the time embedding's variants, other kernel sizes and channels.
OPTIONS_TINY = {
    "block_out_channels": [16, 40],
    "layers_per_block": [2, 1],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 12,
    "attention_head_dim": [2, 3],
    "norm_num_groups": 8,
    "norm_eps": 1e-3,
    "downsample_padding": 0,
    "center_input_sample": True,
    "mid_block_scale_factor": 2.0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "time_embedding_dim": 40,
    "conv_in_kernel": 5,
    "conv_out_kernel": 1,
    "in_channels": 3,
    "out_channels": 5,
}
# (latent shape NCHW, timesteps, context length); the fractional timesteps,
# which some schedulers give, would differ if the UNet truncated them.
INPUTS = {
    "sd1": ((2, 4, 16, 24), np.array([10, 999], "int32"), 7),
    "sd2": ((2, 9, 16, 24), np.array([1.5, 700.25], "float32"), 77),
    "options": ((2, 3, 20, 12), np.array([3, 640], "int32"), 5),
}

# The unet/config.json of runwayml/stable-diffusion-v1-5 and of
# stabilityai/stable-diffusion-2-1, as the Hub serves them.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    **SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD15_PARAMETERS = 859_520_964
SD21_PARAMETERS = 865_910_724


def reference_unet(config):
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def reference_state(reference):
    return {key: value.numpy() for key, value in reference.state_dict().items()}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    """(style, diffusers' UNet, ours holding its weights)."""
    reference = reference_unet(SD1_TINY if request.param == "sd1" else SD2_TINY)
    ours = StableDiffusionUNet.from_reference_config(dict(reference.config))
    weights.load_state_dict(ours, reference_state(reference), what="UNet")
    return request.param, reference, ours


def example_inputs(style, config):
    shape, t, length = INPUTS[style]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    context = rng.standard_normal((shape[0], length, config["cross_attention_dim"])).astype("float32")
    return x, t, context


def evaluate(unet, x, t, context):
    """Our UNet on NCHW latents, its output NCHW. Compiled under JAX, which
    eagerly compiles each operation on its own (25 s for the tiny UNet,
    against 5 s for the whole); eager elsewhere, where tracing costs more
    than the one call."""
    return evaluate_with(unet, [x.transpose(0, 2, 3, 1), t, context]).transpose(0, 3, 1, 2)


def evaluate_with(unet, inputs):
    """Our UNet on its NHWC inputs, as `evaluate` runs it."""
    if keras.backend.backend() == "jax":
        y = unet.predict(inputs, batch_size=len(inputs[0]), verbose=0)
    else:
        y = keras.ops.convert_to_numpy(unet(inputs))
    return np.asarray(y)


def check_one_evaluation(style, reference, ours, output_shape):
    x, t, context = example_inputs(style, reference.config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t),
                             torch.from_numpy(context)).sample.numpy()
    got = evaluate(ours, x, t, context)
    assert got.shape == expected.shape == output_shape
    assert np.abs(expected).max() > 0.1  # the network does something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_one_evaluation_equals_diffusers(pair):
    style, reference, ours = pair
    check_one_evaluation(style, reference, ours, (2, 4, 16, 24))


def test_every_other_option_equals_diffusers():
    reference = reference_unet(OPTIONS_TINY)
    ours = StableDiffusionUNet.from_reference_config(dict(reference.config))
    weights.load_state_dict(ours, reference_state(reference))
    check_one_evaluation("options", reference, ours, (2, 5, 20, 12))


@once
def test_interface(pair):
    _, reference, ours = pair
    assert tuple(ours.inputs[0].shape[1:]) == (None, None, reference.config.in_channels)
    assert tuple(ours.inputs[2].shape[1:]) == (None, reference.config.cross_attention_dim)
    assert ours.context_dim == reference.config.cross_attention_dim
    assert ours.downsampling_factor == 2
    assert ours.config["attention_head_dim"] == reference.config.attention_head_dim


@once
def test_state_dict_round_trips_to_diffusers_keys_and_values(pair):
    _, reference, ours = pair
    expected = reference_state(reference)
    got = weights.state_dict(ours)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert ours.count_params() == sum(v.numel() for v in reference.parameters())


@once
def test_config_round_trips_through_get_config_and_a_keras_file(pair, tmp_path):
    _, _, ours = pair
    config = ours.get_config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = StableDiffusionUNet.from_config(config)
    assert rebuilt.get_config() == config
    assert sorted(weights.checkpoint_table(rebuilt)) == sorted(weights.checkpoint_table(ours))

    inputs = [keras.Input(tensor.shape[1:], dtype=tensor.dtype) for tensor in ours.inputs]
    wrapper = keras.Model(inputs, ours(inputs), name="wrapper")
    wrapper.save(tmp_path / "wrapper.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapper.keras")
    unet = loaded.get_layer(ours.name)
    assert isinstance(unet, StableDiffusionUNet)
    assert unet.get_config() == config
    saved, restored = weights.state_dict(ours), weights.state_dict(unet)
    assert sorted(restored) == sorted(saved)
    assert all(np.array_equal(restored[key], saved[key]) for key in saved)


def test_mixed_precision_output_is_float32_and_close():
    # One level: what mixed precision changes is in every block, and a
    # small graph compiles quickly under JAX.
    reference = reference_unet({**SD1_TINY, "block_out_channels": [32], "layers_per_block": 1,
                                "down_block_types": ["CrossAttnDownBlock2D"],
                                "up_block_types": ["CrossAttnUpBlock2D"]})
    x, t, context = example_inputs("sd1", reference.config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(t),
                             torch.from_numpy(context)).sample.numpy()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        ours = StableDiffusionUNet.from_reference_config(dict(reference.config))
    finally:
        keras.config.set_dtype_policy(previous)
    weights.load_state_dict(ours, reference_state(reference))
    assert ours.outputs[0].dtype == "float32"
    got = evaluate(ours, x, t, context)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("option, value", [
    ("addition_embed_type", "text"),
    ("class_embed_type", "projection"),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 768),
    ("only_cross_attention", True),
    ("num_class_embeds", 1000),
])
@once
def test_from_reference_config_rejects_other_families_options(option, value):
    with pytest.raises(ValueError, match=re.escape(f"does not support {option}={value!r}")) as error:
        StableDiffusionUNet.from_reference_config({**SD15_UNET, option: value})
    assert "SD 1.x / 2.x" in str(error.value)


@once
def test_from_reference_config_rejects_other_blocks_and_classes():
    config = {**SD15_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}
    with pytest.raises(ValueError, match="block type 'SimpleCrossAttnDownBlock2D' in down_block_types; "
                                         "supported: CrossAttnDownBlock2D, DownBlock2D"):
        StableDiffusionUNet.from_reference_config(config)
    with pytest.raises(ValueError, match="mid_block_type='UNetMidBlock2DSimpleCrossAttn'"):
        StableDiffusionUNet.from_reference_config(
            {**SD15_UNET, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(ValueError, match="_class_name='UNet2DModel'"):
        StableDiffusionUNet.from_reference_config({**SD15_UNET, "_class_name": "UNet2DModel"})


@pytest.mark.parametrize("options, message", [
    ({"block_out_channels": [32, 48], "norm_num_groups": 32}, "norm_num_groups=32 must divide"),
    ({"attention_head_dim": [2, 4, 8]}, "attention_head_dim has 3 entries"),
    ({"up_block_types": ["UpBlock2D"]}, "up_block_types must name one block per level"),
    ({"downsample_padding": 2}, "downsample_padding must be 0 or 1"),
])
@once
def test_bad_options_name_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        StableDiffusionUNet.from_reference_config({**SD1_TINY, **options})


@once
def test_the_constructor_takes_only_the_options_it_implements():
    with pytest.raises(ValueError, match=r"unknown options \['sample_size'\]"):
        StableDiffusionUNet(**SD1_TINY)


@once
@pytest.mark.parametrize("layout, shape", [("dense", (300, 130)), ("conv", (300, 20, 3, 3)),
                                           ("conv", (4, 300, 1, 1)), ("conv_as_dense", (300, 7, 1, 1)),
                                           ("conv_as_dense", (7, 300)), ("same", (5, 3))])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_banded_copies_are_the_layout_changes(layout, shape, dtype):
    """What loading and saving copy (in bands of rows, for speed) is exactly
    the layout change: the transposed view, cast, C-contiguous."""
    value = np.random.default_rng(0).standard_normal(shape).astype("float32")
    numpy_dtype = weights.numpy_dtype(dtype)
    made = weights.keras_array(value, layout, numpy_dtype)
    expected = weights.to_keras(value, layout).astype(numpy_dtype)
    assert made.flags.c_contiguous and made.dtype == numpy_dtype
    assert made.shape == weights.keras_shape(shape, layout)
    np.testing.assert_array_equal(made, expected)
    back = weights.reference_array(made, layout)
    assert back.flags.c_contiguous and back.dtype == np.float32
    np.testing.assert_array_equal(back, weights.to_reference(expected, layout).astype("float32"))
    if layout != "conv_as_dense" or len(shape) == 4:
        assert back.shape == shape


@once
@pytest.mark.parametrize("layout, shape", [("dense", (1100, 1000)), ("conv", (200, 640, 3, 3)),
                                           ("same", (1200, 1000))])
def test_large_copies_split_over_the_cores_from_a_mapped_file(tmp_path, layout, shape):
    """Weights of 4 MB and more are copied in parts side by side, into
    memory of their own (populated at mapping): the same layout change, from a
    mapped file into a new, writable, 64-byte-aligned array (what JAX takes
    without a copy), never the file's view itself."""
    import safetensors.numpy

    from keras_diffusion.checkpoint_files import read_safetensors

    value = np.random.default_rng(0).standard_normal(shape).astype("float32")
    safetensors.numpy.save_file({"w": value}, tmp_path / "w.safetensors")
    mapped = read_safetensors(tmp_path / "w.safetensors", lazy=True)["w"]
    made = weights.keras_array(mapped, layout)
    assert made.flags.writeable and made.flags.c_contiguous and made.ctypes.data % 64 == 0
    assert not np.shares_memory(made, mapped)
    np.testing.assert_array_equal(made, weights.to_keras(value, layout))
    np.testing.assert_array_equal(weights.reference_array(made, layout), value)


@once
@pytest.mark.parametrize("layout, shape", [("dense", (300, 200)), ("conv", (64, 48, 3, 3)),
                                           ("conv_as_dense", (64, 48, 1, 1)), ("same", (300,))])
def test_views_keep_a_mapped_tensor_and_make_convolutions_channels_last(tmp_path, layout, shape):
    """For PyTorch, whose variables may be strided, `keras_view` is
    `to_keras` without a transposing copy: a tensor mapped for itself alone,
    of the variable's dtype, is taken as it is (writing the view then
    leaves the file as it was); a 3x3 convolution is copied to PyTorch's
    channels-last `(out, kh, kw, in)`; a cast, or an array others may hold,
    is copied in its own layout."""
    import safetensors.numpy

    from keras_diffusion.checkpoint_files import read_safetensors

    value = np.random.default_rng(0).standard_normal(shape).astype("float32")
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file({"w": value}, path)
    expected = weights.to_keras(value, layout)
    mapped = read_safetensors(path, lazy=True)["w"]
    view = weights.keras_view(mapped, layout)
    np.testing.assert_array_equal(view, expected)
    if layout == "conv":
        assert not np.shares_memory(view, mapped)
        assert view.transpose(3, 0, 1, 2).flags.c_contiguous  # (out, kh, kw, in) in memory
    else:
        assert np.shares_memory(view, mapped)
        view[...] = 0
        np.testing.assert_array_equal(read_safetensors(path)["w"], value)
    for other in (weights.keras_view(value, layout), weights.keras_view(mapped, layout, "float16")):
        assert not np.shares_memory(other, value) and not np.shares_memory(other, mapped)
    np.testing.assert_array_equal(weights.keras_view(value, layout), expected)
    cast = weights.keras_view(read_safetensors(path, lazy=True)["w"], layout, "float16")
    assert cast.dtype == np.float16
    np.testing.assert_array_equal(cast, expected.astype("float16"))


@once
def test_a_state_dict_that_does_not_fit_is_refused_whole(pair):
    _, reference, ours = pair
    before = weights.state_dict(ours)
    state = reference_state(reference)
    key = "down_blocks.0.resnets.0.conv1.weight"
    wrong = dict(state, **{key: np.zeros((32, 16, 3, 3), "float32")})
    with pytest.raises(ValueError, match=f"the UNet weight '{key}' has shape \\(32, 16, 3, 3\\), "
                                         "which does not fit the architecture"):
        weights.load_state_dict(ours, wrong, what="UNet")
    missing = {k: v for k, v in state.items() if k != "conv_in.bias"}
    with pytest.raises(ValueError, match=r"1 missing \(conv_in.bias\)"):
        weights.load_state_dict(ours, missing, what="UNet")
    after = weights.state_dict(ours)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.skipif(os.environ.get("KD_SLOW_TESTS") != "1",
                    reason="builds two 860M-parameter UNets; set KD_SLOW_TESTS=1")
@pytest.mark.parametrize("config, parameters", [(SD15_UNET, SD15_PARAMETERS),
                                                (SD21_UNET, SD21_PARAMETERS)],
                         ids=["sd15", "sd21"])
def test_real_size_parameter_counts(config, parameters):
    start = time.perf_counter()
    unet = StableDiffusionUNet.from_reference_config(config)
    seconds = time.perf_counter() - start
    print(f"built {unet.count_params():,} parameters in {seconds:.1f} s")
    assert unet.count_params() == parameters
    # diffusers' UNet of the same config, on the meta device (no memory):
    # the same keys with the same shapes.
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    got = {key: weights.to_reference(np.empty(tuple(variable.shape), "float32"), layout).shape
           for key, (variable, layout) in weights.checkpoint_table(unet).items()}
    assert got == expected


@once
def test_weights_made_ahead_are_handed_over_once_in_the_layout_asked_for():
    """`_Ahead` makes the large weights on a thread of its own, in the
    layout their keys foretell; each is handed over as made, and one asked
    for in another layout or dtype (a 2-D `.weight` kept as it is, as an
    embedding's) is made again as asked. A weight too small to make ahead
    is made when asked."""
    rng = np.random.default_rng(0)
    state = {"proj.weight": rng.standard_normal((600, 500)).astype("float32"),
             "conv.weight": rng.standard_normal((128, 256, 3, 3)).astype("float32"),
             "table.weight": rng.standard_normal((700, 400)).astype("float32"),
             "norm.weight": rng.standard_normal((500,)).astype("float32")}
    float32 = np.dtype("float32")
    ahead = weights._Ahead(state, float32)
    ahead._thread.join()
    made = {key: future.result() for key, future in ahead._claimed.items()}
    assert {key: layout for key, (_, layout) in made.items()} == {
        "proj.weight": "dense", "conv.weight": "conv", "table.weight": "dense"}
    for key, layout in (("proj.weight", "dense"), ("conv.weight", "conv")):
        value = ahead.take(key, layout, float32)
        assert value is made[key][0]
        np.testing.assert_array_equal(value, weights.to_keras(state[key], layout))
    table = ahead.take("table.weight", "same", float32)
    assert table is not made["table.weight"][0]
    np.testing.assert_array_equal(table, state["table.weight"])
    norm = ahead.take("norm.weight", "same", np.dtype("float16"))
    assert norm.dtype == np.float16
    np.testing.assert_array_equal(norm, state["norm.weight"].astype("float16"))
    ahead.close()
    assert not ahead._thread.is_alive() and not ahead._claimed


@once
def test_a_weight_that_fails_ahead_raises_when_asked_for():
    """A weight the ahead thread could not read is read again by the
    caller, whose error is the one raised."""

    class Unreadable(dict):
        def shape(self, key):
            return (600, 500)

        def __getitem__(self, key):
            raise OSError(f"cannot read {key}")

    ahead = weights._Ahead(Unreadable({"proj.weight": None}), np.dtype("float32"))
    ahead._thread.join()
    assert isinstance(ahead._claimed["proj.weight"].exception(), OSError)
    with pytest.raises(OSError, match="cannot read proj.weight"):
        ahead.take("proj.weight", "dense", np.dtype("float32"))
    ahead.close()


@once
def test_loading_pauses_the_cycle_collector_and_restores_it():
    """Python's cycle collector is off while a checkpoint is built and back
    as it was after, whether the build ends or raises."""
    import gc

    from keras_diffusion.stable_diffusion import loader

    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with pytest.raises(KeyError):
                with loader._collector_paused():
                    assert not gc.isenabled()
                    raise KeyError("stop")
            assert gc.isenabled() == enabled
    finally:
        gc.enable()


def test_variables_made_after_the_block_hold_their_values():
    """`backend.variables_made_after`: the variables created in the block
    exist with their initial values once it ends (TensorFlow's made then,
    outside their layers' name scopes); a block that raises leaves none
    waiting to be made."""
    from keras_diffusion import backend

    with backend.variables_made_after():
        layer = keras.layers.Dense(3, kernel_initializer="ones", bias_initializer="zeros")
        layer.build((None, 2))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), np.ones((2, 3)))
    output = keras.ops.convert_to_numpy(layer(np.ones((1, 2), "float32")))
    np.testing.assert_array_equal(output, [[2.0, 2.0, 2.0]])
    if keras.backend.backend() == "tensorflow":
        assert layer.kernel.value.name.split(":")[0] == "kernel"
    from keras.src.backend.common import global_state

    with pytest.raises(RuntimeError, match="stop"):
        with backend.variables_made_after():
            keras.layers.Dense(3).build((None, 2))
            raise RuntimeError("stop")
    assert not global_state.get_global_attribute("uninitialized_variables", [])


@once
def test_built_from_a_checkpoint_every_weight_is_taken_as_it_is_made(pair, tmp_path):
    """Inside `building_from`, each weight is created with its checkpoint
    value (no placeholder assigned later), read lazily from the file; the
    model equals one loaded the slow way, and a value of the wrong shape is
    left to `load_state_dict`, which names it."""
    import safetensors.numpy

    from keras_diffusion import checkpoint_files

    style, reference, ours = pair
    state = reference_state(reference)
    path = tmp_path / "unet.safetensors"
    safetensors.numpy.save_file(state, path)
    lazy = checkpoint_files.read_safetensors(path, lazy=True)
    assert sorted(lazy) == sorted(state) and not isinstance(lazy, dict)
    key = "down_blocks.0.resnets.0.conv1.weight"
    assert lazy.shape(key) == state[key].shape
    with weights.building_from(lazy) as taken:
        built = StableDiffusionUNet.from_reference_config(dict(reference.config))
    assert taken == set(state)  # every weight, none assigned afterwards
    weights.load_state_dict(built, lazy, what="UNet", taken=taken)
    got = weights.state_dict(built)
    for name, value in state.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    wrong = dict(state, **{key: np.zeros((32, 16, 3, 3), "float32")})
    with weights.building_from(wrong) as taken:
        built = StableDiffusionUNet.from_reference_config(dict(reference.config))
    assert key not in taken and len(taken) == len(state) - 1
    with pytest.raises(ValueError, match=f"the UNet weight '{key}' has shape \\(32, 16, 3, 3\\)"):
        weights.load_state_dict(built, wrong, what="UNet", taken=taken)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's own fast paths")
def test_torch_fast_paths_follow_the_variables():
    """Dense runs as one `linear`, a convolution's kernel is kept in
    PyTorch's layout while sampling: the same outputs as Keras' own layers,
    and an assigned kernel is used at once."""
    from keras_diffusion.stable_diffusion.layers import Conv2D
    from keras_diffusion.stable_diffusion.layers import Dense

    rng = np.random.default_rng(0)
    dense, conv = Dense(6, "proj"), Conv2D(5, 3, "conv")
    x = rng.standard_normal((2, 7, 4)).astype("float32")
    image = rng.standard_normal((1, 6, 6, 4)).astype("float32")
    dense.build(x.shape)
    conv.build(image.shape)
    for layer in (dense, conv):
        for variable in layer.weights:
            variable.assign(rng.standard_normal(variable.shape).astype("float32"))
    with torch.no_grad():
        np.testing.assert_allclose(keras.ops.convert_to_numpy(dense(x)), keras.ops.convert_to_numpy(
            keras.layers.Dense.call(dense, keras.ops.convert_to_tensor(x))), atol=1e-6)
        first = keras.ops.convert_to_numpy(conv(image))
        np.testing.assert_allclose(first, keras.ops.convert_to_numpy(keras.layers.Conv2D.call(
            conv, keras.ops.convert_to_tensor(image))), atol=1e-5)
        conv.kernel.assign(2 * conv.kernel.value)
        second = keras.ops.convert_to_numpy(conv(image))
    bias = keras.ops.convert_to_numpy(conv.bias.value)
    np.testing.assert_allclose(second - bias, 2 * (first - bias), atol=1e-5)
    # Training: a trainable kernel gets its gradient; a frozen one (LoRA
    # training) runs from the kept copy, to the same output.
    conv(keras.ops.convert_to_tensor(image)).sum().backward()
    assert conv.kernel.value.grad is not None
    conv.trainable = False
    frozen = conv(keras.ops.convert_to_tensor(image))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(frozen.detach()), second, atol=1e-6)
