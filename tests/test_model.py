import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import EAGER
from conftest import blobs
from conftest import one_level_model
from conftest import one_level_unet
from conftest import plumbing_optimizer
from conftest import squares
from conftest import tiny_unet


@pytest.fixture(scope="module")
def trained():
    """The smallest model trained one epoch (4 steps) on `blobs()`, shared by
    the tests that sample from it, save it or check errors with it: on
    TensorFlow and JAX each new model compiles its training and sampling
    anew, and a network with attention twice as long (sampling through
    attention: test_file_format's model). No test leaves it changed."""
    keras.utils.set_random_seed(0)
    model = one_level_model((16, 16, 1))
    model.fit(blobs(), batch_size=16, epochs=1, verbose=0)
    return model


def test_fit_lowers_loss_on_mnist(data_dir):
    images, _ = kd.load_dataset("mnist", data_dir=data_dir, limit=192)
    model = kd.DiffusionModel(one_level_unet((28, 28, 1)), kd.DiffusionSchedule("cosine", timesteps=1000), seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3))
    history = model.fit(images, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < 0.7 * history[0], history


def test_generate_shape_range_and_determinism(trained):
    model = trained
    a = model.generate(3, steps=4, seed=1)
    b = model.generate(3, steps=4, seed=1)
    c = model.generate(3, steps=4, seed=2)
    assert a.shape == (3, 16, 16, 1) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    ddpm = model.generate(3, steps=4, sampler="ddpm", seed=1)
    assert np.abs(ddpm - model.generate(3, steps=4, sampler="ddpm", seed=1)).max() == 0


# Batches of another size run other float32 kernels: oneDNN, Eigen and XLA
# pick their blocking by batch size and instruction set, so one UNet
# evaluation differs between batch sizes by up to ~8e-7 of its output scale
# (measured on all three backends, on AVX-512 and with AVX2 only). Allow 5x.
NETWORK_RTOL = 4e-6


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_generate_in_batches_matches_one_batch(prediction):
    """Batching changes no image beyond what float32 rounding allows.

    With epsilon prediction the first DDIM step estimates x0 by dividing by
    sqrt(alpha_bar(t0)), and the next multiplies by sqrt(alpha_bar(t1)), so an
    error in the network's output reaches x_t1 scaled by
    sqrt(alpha_bar(t1) / alpha_bar(t0)) (about 1400 here: t0 = 99 is almost
    pure noise) in pixels whose x0 estimate is not clipped. v-prediction has
    no such division. Errors add over the steps and halve on the way to [0, 1]."""
    model = one_level_model((16, 16, 1), prediction=prediction)
    steps = 3
    whole = model.generate(4, steps=steps, seed=5)
    parts = model.generate(4, steps=steps, seed=5, batch_size=3)
    t0, t1 = model.schedule.sampling_timesteps(steps)[:2]
    a = model.schedule.alphas_cumprod
    gain = np.sqrt(a[t1] / a[t0]) if prediction == "epsilon" else 1.0
    np.testing.assert_allclose(whole, parts, atol=0.5 * steps * NETWORK_RTOL * gain)


def test_ema_update_closed_form():
    # The default decay, 0.999: the model and batches of
    # test_dataset_and_pydataset_inputs, whose compiled step JAX reuses.
    model = one_level_model()
    before = [ops.convert_to_numpy(v) for v in model.network.trainable_variables]
    model.fit(squares(16), batch_size=16, epochs=1, verbose=0)
    after = [ops.convert_to_numpy(v) for v in model.network.trainable_variables]
    # First update: decay = min(0.999, (1 + 0) / (10 + 0)) = 0.1.
    for ema, w0, w1 in zip(model.ema_weights, before, after):
        np.testing.assert_allclose(ops.convert_to_numpy(ema), 0.1 * w0 + 0.9 * w1, rtol=1e-5, atol=1e-6)
    assert float(ops.convert_to_numpy(model.ema_updates)) == 1.0


def test_sampling_uses_ema_weights(trained):
    with_ema = trained
    assert with_ema.ema_decay == 0.999
    raw = with_ema.generate(2, steps=3, seed=0)
    saved = [ops.convert_to_numpy(ema).copy() for ema in with_ema.ema_weights]
    try:
        for ema, weight in zip(with_ema.ema_weights, with_ema.network.trainable_variables):
            ema.assign(ops.convert_to_numpy(weight))
        assert np.abs(with_ema.generate(2, steps=3, seed=0) - raw).max() > 1e-4
    finally:
        for ema, value in zip(with_ema.ema_weights, saved):
            ema.assign(value)
    np.testing.assert_array_equal(with_ema.generate(2, steps=3, seed=0), raw)
    without = one_level_model(ema_decay=None)
    assert not hasattr(without, "ema_weights")
    assert list(without.sampling_weights) == list(without.network.trainable_variables)


class _Zero(keras.layers.Layer):
    def call(self, x):
        return ops.zeros_like(x)


def test_x0_loss_closed_form():
    x = keras.Input((4, 4, 1))
    t = keras.Input((), dtype="int32")
    network = keras.Model([x, t], _Zero()(x))
    model = kd.DiffusionModel(network, kd.DiffusionSchedule(timesteps=10), prediction="x0", ema_decay=None)
    images = np.full((8, 4, 4, 1), 0.75, "float32")  # x0 = 0.5 in model range
    loss = ops.convert_to_numpy(model.compute_diffusion_loss(images))
    assert float(loss) == pytest.approx(0.25, rel=1e-6)
    uint8 = np.full((8, 4, 4, 1), 255, "uint8")  # x0 = 1
    assert float(ops.convert_to_numpy(model.compute_diffusion_loss(uint8))) == pytest.approx(1.0)


def test_sample_weights_weigh_each_example_of_the_loss():
    """Closed form: a zero network's x0 loss is x0^2 per example; weights
    (as fit's sample_weight, DreamBooth's prior-preservation weight) scale
    each example's term of the mean."""
    x = keras.Input((4, 4, 1))
    t = keras.Input((), dtype="int32")
    network = keras.Model([x, t], _Zero()(x))
    model = kd.DiffusionModel(network, kd.DiffusionSchedule(timesteps=10), prediction="x0",
                              ema_decay=None)
    images = np.stack([np.full((4, 4, 1), 0.75), np.full((4, 4, 1), 1.0)]).astype("float32")
    weights = np.array([2.0, 0.5], "float32")  # x0 = 0.5 and 1: terms 0.25 and 1
    loss = model.compute_diffusion_loss(images, sample_weight=weights)
    assert float(ops.convert_to_numpy(loss)) == pytest.approx((2.0 * 0.25 + 0.5 * 1.0) / 2)
    # Through a batch as fit hands it to the train step: (x, y, sample_weight).
    batch = model.unpack_batch((images, None, weights))
    again = model.compute_losses(batch)["loss"]
    assert float(ops.convert_to_numpy(again)) == pytest.approx((2.0 * 0.25 + 0.5 * 1.0) / 2)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_other_predictions_and_min_snr_train(prediction):
    model = one_level_model(prediction=prediction, min_snr_gamma=5.0)
    history = model.fit(squares(64), batch_size=16, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))


def test_dataset_and_pydataset_inputs():
    import tensorflow as tf

    images = squares(32)
    model = one_level_model()
    ds = tf.data.Dataset.from_tensor_slices(images).batch(16)
    assert np.isfinite(model.fit(ds, epochs=1, verbose=0).history["loss"][0])

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return images[i * 16:(i + 1) * 16]

    assert np.isfinite(model.fit(Batches(), epochs=1, verbose=0).history["loss"][0])
    assert np.isfinite(model.evaluate(images, batch_size=16, verbose=0))


def test_conditional_training_and_label_errors(trained):
    model = one_level_model(num_classes=3)
    labels = np.arange(32) % 3
    model.fit(squares(32), labels, batch_size=16, epochs=1, verbose=0)
    out = model.generate(3, steps=2, seed=0, labels=[0, 1, 2], guidance_scale=2.0)
    assert out.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="class-conditional .* so fit needs labels"):
        model.fit(squares(16), batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="label 3 is out of range; accepted: 0 to 2"):
        model.generate(1, steps=2, labels=[3])
    with pytest.raises(ValueError, match="unknown class name 'cat'"):
        model.generate(1, steps=2, labels=["cat"])
    unconditional = trained  # each error comes before any training or sampling
    with pytest.raises(ValueError, match="network is unconditional"):
        unconditional.fit(blobs(16), labels[:16], batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="this model is unconditional"):
        unconditional.generate(1, steps=2, labels=[0])
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a class-conditional model"):
        unconditional.generate(1, steps=2, guidance_scale=2.0)


def test_class_names_select_labels():
    model = one_level_model(num_classes=2, class_names=["cat", "dog"])
    by_name = model.generate(2, steps=2, seed=0, labels=["Dog", "cat"])
    by_index = model.generate(2, steps=2, seed=0, labels=[1, 0])
    np.testing.assert_array_equal(by_name, by_index)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sampler": "euler_a"}, "sampler must be one of"),
        ({"steps": 0}, r"steps must be an integer from 1 to the schedule's timesteps \(100\); got 0"),
        ({"steps": 101}, "got 101"),
    ],
)
def test_generate_bad_arguments(kwargs, match, trained):
    with pytest.raises(ValueError, match=match):
        trained.generate(2, **kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="prediction must be one of epsilon, v, x0; got 'eps'"):
        kd.DiffusionModel(tiny_unet(), prediction="eps")
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\) or None; got 1.5"):
        kd.DiffusionModel(tiny_unet(), ema_decay=1.5)


def test_save_load_round_trip_keeps_the_training_state(trained, tmp_path):
    """Training on after a load: test_file_format (the 0.1 file) and
    test_resume (the CLI's checkpoints)."""
    model = trained
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kd.DiffusionModel)
    np.testing.assert_array_equal(model.generate(2, steps=3, seed=4), loaded.generate(2, steps=3, seed=4))
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 4
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_load_model_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        kd.load_model(tmp_path / "missing.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a Keras model archive"):
        kd.load_model(bad)
    good = tmp_path / "good.keras"
    trained.save(good)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.keras"):
        kd.load_model(truncated)


def one_level_attention_model():
    """The smallest UNet with attention: one level, attending at 8x8."""
    network = kd.UNet((8, 8, 1), widths=(8,), blocks_per_level=1, attention_levels=(0,), groups=4)
    model = kd.DiffusionModel(network, kd.DiffusionSchedule("cosine", timesteps=100), seed=0)
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    return model


# float16 through attention, where its range is tightest; bfloat16 (float32's
# range) through the smallest UNet.
@pytest.mark.parametrize("policy, build", [("mixed_float16", one_level_attention_model),
                                           ("mixed_bfloat16", one_level_model)])
def test_mixed_precision_training(policy, build):
    images = squares(32)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = build()
        history = model.fit(images, batch_size=16, epochs=1, verbose=0).history["loss"]
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert np.all(np.isfinite(history))
        images = model.generate(2, steps=2, seed=0)
        assert images.dtype == np.float32 and np.isfinite(images).all()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
