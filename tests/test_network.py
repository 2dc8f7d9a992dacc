"""Tests for the UNet and its blocks; run once per KERAS_BACKEND.

conftest.py seeds Keras before every test."""

import json
import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.network import AttentionBlock, HostInitializer, ResidualBlock, SinusoidalEmbedding, UNet

TINY = dict(widths=(8, 16), blocks_per_level=1, attention_levels=(1,), groups=4)
DIFFUSERS_TINY_PARAMS = 44_969


def _inputs(shape, batch=2, num_classes=None, t=(3, 900), labels=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype("float32")
    inputs = [x, np.array(t, "int32")]
    if num_classes is not None:
        inputs.append(np.array(labels if labels is not None else [0, num_classes], "int32"))
    return inputs


def _predict(net, inputs, training=False):
    return ops.convert_to_numpy(net(inputs, training=training))


def _weight_gradients(net, inputs):
    """Gradients of mean(output**2) with respect to every trainable weight."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(net(inputs, training=True)))
        grads = tape.gradient(loss, net.trainable_variables)
    elif backend == "torch":
        import torch

        loss = ops.mean(ops.square(net(inputs, training=True)))
        grads = torch.autograd.grad(loss, [v.value for v in net.trainable_variables])
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in net.non_trainable_variables]

        def loss_fn(trainable):
            out, _ = net.stateless_call(trainable, non_trainable, inputs, training=True)
            return ops.mean(ops.square(out))

        grads = jax.jit(jax.grad(loss_fn))([v.value for v in net.trainable_variables])
    else:
        pytest.skip(f"no gradient helper for backend {backend!r}")
    return [ops.convert_to_numpy(g) for g in grads]


# MNIST's and CIFAR-10's shapes, one conditional: the two choices are
# independent (each new shape costs JAX a compilation of every operation).
@pytest.mark.parametrize("shape, num_classes", [((28, 28, 1), None), ((32, 32, 3), 10)])
def test_output_shape_matches_input(shape, num_classes):
    net = UNet(shape, num_classes=num_classes, **TINY)
    out = _predict(net, _inputs(shape, num_classes=num_classes))
    assert out.shape == (2,) + shape
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert len(net.inputs) == (2 if num_classes is None else 3)


def test_parameter_count_matches_diffusers():
    # diffusers' UNet2DModel(block_out_channels=(8, 16), layers_per_block=1,
    # norm_num_groups=4, attention in the last level) has exactly this many
    # parameters; for the default widths on 28x28x1 both have 3,939,393.
    assert UNet((16, 16, 1), **TINY).count_params() == DIFFUSERS_TINY_PARAMS


def test_bad_image_size_names_size_and_rule():
    with pytest.raises(ValueError, match=r"divisible by 4.*30x30"):
        UNet((30, 30, 1), widths=(8, 16, 32), groups=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_levels=(2,)), r"attention_levels.*0 to 1.*\(2,\)"),
        (dict(widths=(8, 18)), r"divisible by groups=4.*\(8, 18\)"),
        (dict(widths=()), r"widths must be a non-empty"),
        (dict(blocks_per_level=0), r"blocks_per_level.*got 0"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\); got 1.5"),
        (dict(num_classes=0), r"num_classes.*got 0"),
        (dict(attention_heads=3), r"attention_heads.*got attention_heads=3"),
        (dict(groups=0), r"groups must be a positive integer; got 0"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet((16, 16, 1), **{**TINY, **kwargs})


def test_config_round_trip_gives_same_output():
    net = UNet((16, 16, 3), num_classes=5, dropout=0.1, attention_heads=2, embedding_dim=24, **TINY)
    config = json.loads(json.dumps(net.get_config()))
    clone = UNet.from_config(config)
    assert clone.get_config() == net.get_config()
    clone.set_weights(net.get_weights())
    inputs = _inputs((16, 16, 3), num_classes=5)
    # The same kernels on the same shapes: bit for bit.
    np.testing.assert_array_equal(_predict(clone, inputs), _predict(net, inputs))


def test_keras_file_round_trip_gives_identical_output(tmp_path):
    net = UNet((16, 16, 1), num_classes=3, **TINY)
    path = tmp_path / "unet.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, UNet)
    inputs = _inputs((16, 16, 1), num_classes=3)
    np.testing.assert_array_equal(_predict(loaded, inputs), _predict(net, inputs))


def test_no_lambda_layers_and_blocks_are_real_layers():
    net = UNet((16, 16, 1), num_classes=3, **TINY)
    found = list(net._flatten_layers(include_self=False, recursive=True))
    assert not [layer.name for layer in found if isinstance(layer, keras.layers.Lambda)]
    kinds = {type(layer) for layer in found}
    assert {SinusoidalEmbedding, ResidualBlock, AttentionBlock} <= kinds
    # Nested sublayers are visited too, so the check above is not vacuous.
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in found)


def test_timestep_embedding_matches_closed_form():
    dim, t = 6, np.array([0, 1, 7, 999], "int32")
    emb = ops.convert_to_numpy(SinusoidalEmbedding(dim)(t))
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    phases = t[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.sin(phases), np.cos(phases)], axis=-1)
    assert emb.shape == (4, dim) and emb.dtype == np.float32
    # A float32 phase near 999 is only known to its ulp, 6e-5.
    np.testing.assert_allclose(emb, expected, atol=1e-4)
    # Every timestep gets its own embedding.
    assert len({row.tobytes() for row in emb}) == len(t)


def test_timestep_embedding_config_and_validation():
    layer = SinusoidalEmbedding(8, max_period=100.0)
    clone = SinusoidalEmbedding.from_config(layer.get_config())
    assert (clone.dim, clone.max_period) == (8, 100.0)
    with pytest.raises(ValueError, match="even integer >= 2; got 7"):
        SinusoidalEmbedding(7)


def test_class_labels_change_output():
    net = UNet((16, 16, 1), num_classes=4, **TINY)
    a = _predict(net, _inputs((16, 16, 1), num_classes=4, labels=[0, 0]))
    b = _predict(net, _inputs((16, 16, 1), num_classes=4, labels=[2, 4]))
    assert np.abs(a - b).max() > 1e-6


def test_class_embedding_starts_at_unit_scale():
    # On the scale of the timestep embedding from the start, so labels condition
    # the network early in training (Keras' default init is 20x smaller).
    net = UNet((16, 16, 1), num_classes=10, embedding_dim=256, **TINY)
    table = ops.convert_to_numpy(net.get_layer("class_embedding").embeddings)
    assert table.shape == (11, 256)
    assert abs(table.mean()) < 0.05
    assert 0.9 < table.std() < 1.1


@pytest.mark.parametrize("shape, fan_in, fan_out", [((3, 3, 16, 32), 144, 288), ((64, 128), 64, 128)])
def test_kernels_start_glorot_uniform(shape, fan_in, fan_out):
    # Keras' default kernel distribution: uniform on +-sqrt(6 / (fan_in + fan_out)),
    # whose standard deviation is that limit over sqrt(3).
    limit = math.sqrt(6 / (fan_in + fan_out))
    values = ops.convert_to_numpy(HostInitializer()(shape, dtype="float32"))
    assert values.shape == shape and values.dtype == np.float32
    assert np.abs(values).max() <= limit
    assert abs(values.mean()) < 0.02 * limit
    assert values.std() == pytest.approx(limit / math.sqrt(3), rel=0.03)


def test_network_weights_follow_the_seed():
    keras.utils.set_random_seed(3)
    first = UNet((16, 16, 1), num_classes=2, **TINY)
    keras.utils.set_random_seed(3)
    again = UNet((16, 16, 1), num_classes=2, **TINY)
    later = UNet((16, 16, 1), num_classes=2, **TINY)  # the generator has moved on
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    kernels = [ops.convert_to_numpy(net.get_layer("conv_in").kernel) for net in (first, later)]
    assert np.abs(kernels[0] - kernels[1]).max() > 1e-3


def test_host_initializer_config_and_validation():
    initializer = HostInitializer("normal", stddev=0.5)
    assert HostInitializer.from_config(initializer.get_config()).get_config() == {
        "distribution": "normal", "stddev": 0.5}
    with pytest.raises(ValueError, match=r"HostInitializer distribution must be 'glorot_uniform' "
                                         r"or 'normal'; got 'he_normal'\."):
        HostInitializer("he_normal")


def test_output_depends_on_timestep():
    net = UNet((16, 16, 1), **TINY)
    a = _predict(net, _inputs((16, 16, 1), t=(0, 0)))
    b = _predict(net, _inputs((16, 16, 1), t=(500, 999)))
    assert np.abs(a - b).max() > 1e-6


def test_gradients_reach_every_weight():
    net = UNet((16, 16, 1), num_classes=4, **TINY)
    grads = _weight_gradients(net, _inputs((16, 16, 1), num_classes=4, labels=[1, 4]))
    assert len(grads) == len(net.trainable_variables)
    for variable, grad in zip(net.trainable_variables, grads):
        assert np.all(np.isfinite(grad)), variable.path
        assert np.abs(grad).max() > 0, variable.path


def test_dropout_active_only_in_training():
    net = UNet((16, 16, 1), dropout=0.5, **TINY)
    inputs = _inputs((16, 16, 1))
    np.testing.assert_array_equal(_predict(net, inputs), _predict(net, inputs))
    assert np.abs(_predict(net, inputs, training=True) - _predict(net, inputs)).max() > 1e-6


def test_mixed_bfloat16_policy_gives_float32_output():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        net = UNet((16, 16, 1), num_classes=3, **TINY)
        embedding = net.get_layer("timestep_embedding")
        assert embedding.compute_dtype == "float32"
        assert net.get_layer("down_0_res_0").compute_dtype == "bfloat16"
        out = net(_inputs((16, 16, 1), num_classes=3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))
