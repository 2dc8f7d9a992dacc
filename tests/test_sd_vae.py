"""Stable Diffusion's VAE against diffusers' `AutoencoderKL`, on tiny random
configurations built here; run once per KERAS_BACKEND."""

import types

import keras
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from keras import ops

from conftest import once
from keras_diffusion import backend
from keras_diffusion import pipeline
from keras_diffusion.autoencoder import _split_moments
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.vae import StableDiffusionVAE

TOLERANCE = 1e-4
# Two levels, two resnets per level, mid-block attention: the SD layout at toy size.
CONFIG = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=8,
              latent_channels=4, scaling_factor=0.13025)
# Three levels, no quant convs, no attention: the options SD does not use.
BARE = dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
            latent_channels=2, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=False)


def reference(config, seed):
    """A diffusers AutoencoderKL with every weight random, norms included."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def ported(model):
    vae = StableDiffusionVAE.from_reference_config(dict(model.config))
    weights.load_state_dict(vae, {k: v.numpy() for k, v in model.state_dict().items()}, "VAE")
    return vae


@pytest.fixture(scope="module")
def pair():
    model = reference(CONFIG, 0)
    return model, ported(model)


@pytest.fixture(scope="module")
def images():
    # Non-square, and not a power of two: the sizes stay dynamic.
    return np.random.default_rng(0).uniform(size=(2, 24, 40, 3)).astype("float32")


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype="float32"))


def nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def reference_posterior(model, images):
    with torch.no_grad():
        distribution = model.encode(nchw(images * 2.0 - 1.0)).latent_dist
    return nhwc(distribution.mean), nhwc(distribution.logvar)


def moments(vae, x):
    """`(mean, logvar)` of `x` in [-1, 1] through the compiled encoder that
    `encode` runs (JAX runs an uncompiled model op by op, 5 s a call)."""
    mean, logvar = _split_moments(pipeline.call_network(vae, vae.encoder, x))
    return ops.convert_to_numpy(mean), ops.convert_to_numpy(logvar)


def test_encode_matches_diffusers(pair, images):
    model, vae = pair
    mean, logvar = reference_posterior(model, images)
    assert vae.factor == 2 and vae.latent_channels == 4
    ours = vae.encode(images)
    assert ours.shape == (2, 12, 20, 4) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, mean, atol=TOLERANCE, rtol=0)
    our_mean, our_logvar = moments(vae, images * 2.0 - 1.0)
    np.testing.assert_allclose(our_mean, mean, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(our_logvar, logvar, atol=TOLERANCE, rtol=0)
    # uint8 images are read as x / 255.
    as_bytes = np.round(images * 255).astype("uint8")
    expected = reference_posterior(model, as_bytes / 255.0)[0]
    np.testing.assert_allclose(vae.encode(as_bytes), expected, atol=TOLERANCE, rtol=0)


def test_decode_matches_diffusers(pair):
    model, vae = pair
    latents = np.random.default_rng(1).normal(size=(2, 6, 10, 4)).astype("float32")
    with torch.no_grad():
        expected = nhwc(model.decode(nchw(latents)).sample)
    raw = ops.convert_to_numpy(pipeline.call_network(vae, vae.decoder, latents))
    assert raw.shape == (2, 12, 20, 3)
    np.testing.assert_allclose(raw, expected, atol=TOLERANCE, rtol=0)
    images = vae.decode(latents)
    np.testing.assert_allclose(images, np.clip((expected + 1) / 2, 0, 1), atol=TOLERANCE, rtol=0)


def test_call_reconstructs_from_the_posterior_mean(pair, images):
    """`vae(x)`, through `posterior`: diffusers' forward pass without sampling."""
    model, vae = pair
    x = images[:1, :8, :16] * 2.0 - 1.0
    with torch.no_grad():
        expected = nhwc(model(nchw(x)).sample)
    np.testing.assert_allclose(vae.predict(x, verbose=0), expected, atol=TOLERANCE, rtol=0)


def test_bare_options_match_diffusers(images):
    model = reference(BARE, 1)
    vae = ported(model)
    assert vae.factor == 4 and vae.latent_shape == (None, None, 2)
    assert not any(layer.name in ("quant_conv", "post_quant_conv") or "attentions" in layer.name
                   for layer in vae._flatten_layers(recursive=True))
    np.testing.assert_allclose(vae.encode(images), reference_posterior(model, images)[0],
                               atol=TOLERANCE, rtol=0)
    latents = np.random.default_rng(2).normal(size=(1, 6, 10, 2)).astype("float32")
    with torch.no_grad():
        expected = nhwc(model.decode(nchw(latents)).sample)
    decoded = pipeline.call_network(vae, vae.decoder, latents)
    np.testing.assert_allclose(ops.convert_to_numpy(decoded), expected, atol=TOLERANCE, rtol=0)


def test_shifted_latents_as_sd3_scales_them(images):
    """SD 3's VAE (16 latent channels, no quant convs, a shift_factor): the
    samplers' latents are (mean - shift) * scale, and decoding undoes it
    before diffusers' decoder, as SD 3's pipeline does."""
    config = dict(BARE, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305)
    model = reference(config, 5)
    vae = ported(model)
    assert vae.shift_factor == pytest.approx(0.0609)
    assert StableDiffusionVAE.from_config(vae.get_config()).shift_factor == vae.shift_factor
    holder = types.SimpleNamespace(autoencoder=vae)
    scaled = ops.convert_to_numpy(pipeline.encode(holder, images))
    np.testing.assert_allclose(scaled, (reference_posterior(model, images)[0] - 0.0609) * 1.5305,
                               atol=TOLERANCE * 2, rtol=0)
    with torch.no_grad():
        expected = nhwc(model.decode(nchw(scaled / 1.5305 + 0.0609)).sample)
    np.testing.assert_allclose(pipeline.decode(holder, scaled), np.clip(expected + 1, 0, 2) / 2,
                               atol=TOLERANCE, rtol=0)
    decode = backend.current().compile_function(lambda x: pipeline.decode_tensor(holder, x))
    np.testing.assert_allclose(ops.convert_to_numpy(decode(ops.convert_to_tensor(scaled))),
                               pipeline.decode(holder, scaled), atol=1e-5, rtol=0)


def test_sampled_latents(pair, images):
    _, vae = pair
    mean = vae.encode(images)
    first = vae.encode(images, sample=True, seed=3)
    np.testing.assert_array_equal(first, vae.encode(images, sample=True, seed=3))
    assert np.abs(first - mean).max() > 1e-3


@once
def test_state_dict_round_trip(pair):
    model, vae = pair
    reference_weights = model.state_dict()
    ours = weights.state_dict(vae)
    assert set(ours) == set(reference_weights)
    for key, value in reference_weights.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_latent_slot_protocol(pair, images):
    """What the pipeline asks of an autoencoder: scaled latents in, images out."""
    model, vae = pair
    assert vae.measured and vae.check_measured() is None
    assert vae.pad == 0 and vae.image_shape == (None, None, 3)
    assert float(ops.convert_to_numpy(vae.scaling_factor)) == pytest.approx(0.13025)
    assert not vae.scaling_factor.trainable
    holder = types.SimpleNamespace(autoencoder=vae)
    scaled = ops.convert_to_numpy(pipeline.encode(holder, images))
    np.testing.assert_allclose(scaled, reference_posterior(model, images)[0] * 0.13025,
                               atol=TOLERANCE, rtol=0)
    # Traced, as an exported endpoint runs it.
    decode = backend.current().compile_function(lambda x: pipeline.decode_tensor(holder, x))
    decoded = ops.convert_to_numpy(decode(ops.convert_to_tensor(scaled)))
    np.testing.assert_allclose(decoded, pipeline.decode(holder, scaled), atol=1e-5, rtol=0)
    assert decoded.shape == images.shape


@once
def test_keras_file_round_trip(pair, tmp_path):
    _, vae = pair
    path = tmp_path / "vae.keras"
    vae.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, StableDiffusionVAE)
    assert loaded.get_config() == vae.get_config()
    latents = np.random.default_rng(4).normal(size=(1, 4, 6, 4)).astype("float32")
    np.testing.assert_array_equal(loaded.decode(latents), vae.decode(latents))
    assert float(ops.convert_to_numpy(loaded.scaling_factor)) == pytest.approx(0.13025)


@once
def test_config(pair):
    model, vae = pair
    config = vae.get_config()
    assert config["block_out_channels"] == [32, 64] and config["scaling_factor"] == pytest.approx(
        0.13025)
    assert StableDiffusionVAE.from_config(config).get_config() == config
    # diffusers' defaults fill what a config leaves out.
    assert StableDiffusionVAE.from_reference_config({}).get_config()["block_out_channels"] == [64]


@once
def test_bad_images_and_latents(pair):
    _, vae = pair
    with pytest.raises(ValueError, match=r"25x40 pixels .* multiples of 2"):
        vae.encode(np.zeros((1, 25, 40, 3), "float32"))
    with pytest.raises(ValueError, match=r"\(N, height, width, 4\).*\(1, 4, 4, 3\)"):
        vae.decode(np.zeros((1, 4, 4, 3), "float32"))


@pytest.mark.parametrize("change, message", [
    ({"latents_mean": [0.1] * 4}, r"latents_mean=\[0\.1.*supported: latents_mean unset"),
    ({"shift_factor": "0.1"}, r"shift_factor must be a number or None; got '0.1'"),
    ({"norm_type": "spatial"}, r"does not support: norm_type; supported: in_channels"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     r"down_block_types must be 'DownEncoderBlock2D' once per level .*AttnDownEncoderBlock2D"),
    ({"act_fn": "gelu"}, r"act_fn must be one of silu, swish; got 'gelu'"),
    ({"norm_num_groups": 24}, r"divisible by norm_num_groups=24"),
    ({"out_channels": 4}, r"in_channels \(3\) and out_channels \(4\) must be equal"),
])
@once
def test_refused_configs(change, message):
    config = dict(CONFIG, down_block_types=list(CONFIG["down_block_types"]),
                  up_block_types=list(CONFIG["up_block_types"]),
                  _class_name="AutoencoderKL", sample_size=512, force_upcast=False,
                  shift_factor=None, latents_mean=None)
    StableDiffusionVAE.from_reference_config(config)  # accepted as it is
    with pytest.raises(ValueError, match=message):
        StableDiffusionVAE.from_reference_config(dict(config, **change))


def test_a_layer_chain_computes_its_graph_and_frees_as_it_goes():
    """`LayerChain` (the VAE's encoder and decoder) gives what Keras' graph
    runner gives, eagerly and symbolically, and refuses layers that are not
    one chain."""
    from keras_diffusion.stable_diffusion.layers import LayerChain

    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", name="first")(inputs)
    outputs = keras.layers.Conv2D(2, 1, name="second")(keras.layers.Activation("silu")(hidden))
    chain = LayerChain(inputs, outputs, name="chain")
    graph = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 3)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(chain(x)), ops.convert_to_numpy(graph(x)),
                               atol=1e-6)
    assert chain(keras.KerasTensor((None, 5, 6, 3))).shape == (None, 5, 6, 2)
    branch = keras.layers.Add()([hidden, keras.layers.Conv2D(4, 1, name="side")(hidden)])
    with pytest.raises(ValueError, match="the layers of fork are not one chain"):
        LayerChain(inputs, branch, name="fork")
