"""The autoencoder and latent diffusion; run once per KERAS_BACKEND.

One autoencoder (16x16 -> 4x4x2) and one class-conditional latent model are
trained once per session; the tests share them.

Two groups run under one backend only, because what they check does not
depend on it and TensorFlow and JAX would spend ~90 s each tracing the same
steps again: the config and command tests run under PyTorch (their models
train through the same backend steps the tests above check on all three),
and the SavedModel test under TensorFlow and JAX (under PyTorch the export is
TensorFlow's, re-run in a subprocess, a route `test_export.py` checks)."""

import contextlib
import io

import keras
import numpy as np
import pytest
from keras import ops
from matplotlib import image as mpimg

import keras_diffusion as kd
from conftest import BACKEND
from conftest import DATA_DIR
from conftest import ROOT
from conftest import blobs
from conftest import once
from conftest import one_level_unet
from conftest import plumbing_optimizer
from keras_diffusion import cli
from keras_diffusion import pipeline
from keras_diffusion.config import ConfigError
from keras_diffusion.config import load_config
from keras_diffusion.training import train_autoencoder

IMAGES = blobs(64)
LABELS = np.arange(64) % 3


def small_autoencoder(**kwargs):
    return kd.Autoencoder((16, 16, 1), widths=(8, 16), latent_channels=2, groups=4, seed=0,
                          **kwargs)


@pytest.fixture(scope="session")
def autoencoder():
    keras.utils.set_random_seed(0)
    ae = small_autoencoder()
    ae.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = ae.fit(IMAGES, batch_size=16, epochs=4, verbose=0, shuffle=False)
    return ae, history.history


@pytest.fixture(scope="session")
def latent_model(autoencoder):
    keras.utils.set_random_seed(0)
    ae, _ = autoencoder
    model = kd.LatentDiffusionModel(
        ae, one_level_unet(ae.latent_shape, num_classes=3),
        kd.DiffusionSchedule("cosine", timesteps=100), prediction="v", seed=0,
    )
    model.compile(optimizer=plumbing_optimizer())
    history = model.fit(IMAGES, LABELS, batch_size=16, epochs=1, verbose=0)
    return model, history.history


def test_losses_are_reconstruction_plus_weighted_kl():
    keras.utils.set_random_seed(1)
    ae = small_autoencoder(kl_weight=0.5, reconstruction="mse")
    losses = {k: float(ops.convert_to_numpy(v))
              for k, v in ae.compute_losses((IMAGES[:4],), training=False).items()}
    mean, logvar = (ops.convert_to_numpy(a) for a in ae.posterior(IMAGES[:4] * 2.0 - 1.0))
    # KL(N(m, e^lv) || N(0, 1)) = (m^2 + e^lv - 1 - lv) / 2 per latent element,
    # summed per image, averaged over images, divided by the 256 pixels.
    kl = np.mean(np.sum(0.5 * (mean**2 + np.exp(logvar) - 1 - logvar), axis=(1, 2, 3))) / 256
    assert losses["kl"] == pytest.approx(kl, rel=1e-4)
    assert losses["loss"] == pytest.approx(losses["reconstruction"] + 0.5 * kl, rel=1e-5)
    assert losses["reconstruction"] > 0


def test_autoencoder_learns_and_measures_its_scaling_factor(autoencoder):
    ae, history = autoencoder
    assert set(history) == {"loss", "reconstruction", "kl"}
    assert history["reconstruction"][-1] < 0.7 * history["reconstruction"][0], history
    # 1 / std of the sampled latents of the training images, as fit measured it.
    latents = ae.encode(IMAGES, sample=True, seed=0)
    assert latents.shape == (64, 4, 4, 2)
    factor = float(ops.convert_to_numpy(ae.scaling_factor))
    assert factor == pytest.approx(1 / np.std(latents), rel=1e-5)
    assert ae.measured
    reconstructed = ae.reconstruct(IMAGES[:8])
    assert reconstructed.shape == (8, 16, 16, 1) and reconstructed.dtype == np.float32
    assert 0 <= reconstructed.min() and reconstructed.max() <= 1


def test_encode_is_deterministic_unless_sampled(autoencoder):
    ae, _ = autoencoder
    # In batches or not: the same up to the kernels' float32 rounding.
    np.testing.assert_allclose(ae.encode(IMAGES[:4]), ae.encode(IMAGES[:4], batch_size=3),
                               atol=1e-5)
    a, b = (ae.encode(IMAGES[:4], sample=True, seed=s) for s in (1, 2))
    assert np.abs(a - b).max() > 1e-4


def test_autoencoder_file_round_trip(autoencoder, tmp_path):
    ae, _ = autoencoder
    ae.save(tmp_path / "ae.keras")
    loaded = keras.saving.load_model(tmp_path / "ae.keras")
    assert isinstance(loaded, kd.Autoencoder) and loaded.latent_shape == (4, 4, 2)
    assert float(ops.convert_to_numpy(loaded.scaling_factor)) == float(
        ops.convert_to_numpy(ae.scaling_factor))
    np.testing.assert_allclose(loaded.reconstruct(IMAGES[:4]), ae.reconstruct(IMAGES[:4]),
                               atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(30, 30, 1)), r"image height and width must be divisible by 4 \(2 \*\* "
                                    r"len\(widths\), one halving per level\); got "
                                    r"image_shape=\(30, 30, 1\), i\.e\. 30x30\. Set pad so that the padded size is a "
                                    r"multiple of 4"),
    (dict(reconstruction="l2"), r"reconstruction must be one of l1, mse; got 'l2'\."),
    (dict(kl_weight=-1), r"kl_weight must be a number >= 0; got -1\."),
    (dict(widths=(6, 16)), r"every entry of widths must be divisible by groups=4"),
    (dict(latent_channels=0), r"latent_channels must be a positive integer; got 0\."),
    (dict(widths=(8, 16, 32), image_shape=(28, 28, 1), pad=1),
     r"divisible by 8 \(2 \*\* len\(widths\), one halving per level, after padding by 1\); "
     r"got image_shape=\(30, 30, 1\)"),
])
def test_bad_autoencoder_arguments(kwargs, match):
    arguments = dict(image_shape=(16, 16, 1), widths=(8, 16), groups=4)
    with pytest.raises(ValueError, match=match):
        kd.Autoencoder(**{**arguments, **kwargs})


def test_decode_and_the_latent_model_check_shapes(autoencoder):
    ae, _ = autoencoder
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 4, 4, 2\) for this "
                                         r"autoencoder; got \(1, 4, 4, 3\)\."):
        ae.decode(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"the network takes \(8, 8, 2\) inputs but the "
                                         r"autoencoder makes \(4, 4, 2\) latents; build the UNet "
                                         r"with image_shape=\(4, 4, 2\)\."):
        kd.LatentDiffusionModel(ae, one_level_unet((8, 8, 2)))
    with pytest.raises(ValueError, match=r"autoencoder must be a keras_diffusion Autoencoder or "
                                         r"offer its protocol; UNet lacks encoder, decoder, "
                                         r"posterior"):
        kd.LatentDiffusionModel(one_level_unet((4, 4, 2)), one_level_unet((4, 4, 2)))


def test_an_untrained_autoencoder_is_refused():
    ae = small_autoencoder()
    model = kd.LatentDiffusionModel(ae, one_level_unet(ae.latent_shape))
    model.compile(optimizer=plumbing_optimizer())
    match = r"the autoencoder's latent scaling factor is not measured: train it with"
    with pytest.raises(ValueError, match=match):
        model.fit(IMAGES, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=match):
        model.generate(1, steps=2)


def test_latent_model_trains_only_its_network(latent_model):
    model, history = latent_model
    assert np.isfinite(history["loss"]).all()
    assert not model.autoencoder.trainable
    assert len(model.trainable_variables) == len(model.network.trainable_variables)
    assert model.image_shape == (16, 16, 1) and model.sample_shape == (4, 4, 2)
    assert not pipeline.clips(model)


def test_generate_decodes_and_round_trips(latent_model, tmp_path):
    model, _ = latent_model
    kwargs = dict(steps=4, sampler="dpmpp_2m", labels=[0, 1, 2], guidance_scale=2.0, seed=0)
    images = model.generate(3, **kwargs)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images, model.generate(3, **kwargs))
    # The decoded latents of the very same sampler run.
    x0 = pipeline.sample(model, 3, **{k: v for k, v in kwargs.items()})
    factor = float(ops.convert_to_numpy(model.autoencoder.scaling_factor))
    np.testing.assert_allclose(images, model.autoencoder.decode(ops.convert_to_numpy(x0) / factor),
                               atol=1e-6)
    model.save(tmp_path / "latent.keras")
    loaded = kd.load_model(tmp_path / "latent.keras")
    assert isinstance(loaded, kd.LatentDiffusionModel) and not loaded.autoencoder.trainable
    np.testing.assert_allclose(loaded.generate(3, **kwargs), images, atol=1e-5)


def test_latent_mask_keeps_a_cell_only_when_its_whole_patch_is_known(latent_model):
    model, _ = latent_model
    known = np.ones((1, 16, 16, 1), bool)
    known[0, 5, 9] = False  # one pixel, in latent cell (1, 2)
    cells = pipeline.encode_mask(model, known)
    assert cells.shape == (1, 4, 4, 2)
    expected = np.ones((4, 4), "float32")
    expected[1, 2] = 0
    np.testing.assert_array_equal(cells[0, ..., 0], expected)
    np.testing.assert_array_equal(cells[0, ..., 1], expected)


def test_inpaint_keeps_known_pixels_exactly(latent_model):
    model, _ = latent_model
    mask = np.ones((16, 16), "float32")
    mask[4:12, 4:12] = 0
    out = model.inpaint(IMAGES[:2], mask, steps=3, resamples=2, jump_length=1, seed=0,
                        labels=[0, 1])
    assert out.shape == (2, 16, 16, 1)
    known = mask.astype(bool)
    np.testing.assert_array_equal(out[:, known], IMAGES[:2][:, known])


def test_img2img_and_interpolate(latent_model):
    model, _ = latent_model
    edited = model.img2img(IMAGES[:2], strength=0.6, steps=3, seed=0)
    assert edited.shape == (2, 16, 16, 1) and 0 <= edited.min() and edited.max() <= 1
    path = model.interpolate(3, 4, num=3, steps=3)
    # The ends are what generate draws from those seeds.
    np.testing.assert_allclose(path[0], model.generate(1, steps=3, seed=3)[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], model.generate(1, steps=3, seed=4)[0], atol=1e-5)
    from_image = model.interpolate(IMAGES[0], 4, num=2, steps=3)
    assert from_image.shape == (2, 16, 16, 1)


def test_denoise_says_why_not(latent_model):
    model, _ = latent_model
    with pytest.raises(ValueError, match=r"denoise needs a pixel-space model: the autoencoder .* "
                                         r"denoise with a DiffusionModel\."):
        model.denoise(IMAGES[:1], sigma=0.1)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="PyTorch exports through TensorFlow "
                    "(test_export.py); under JAX, decoding inside the exported generate is "
                    "test_stable_diffusion's export test")
def test_export_decodes_inside_generate(latent_model, tmp_path):
    import tensorflow as tf

    model, _ = latent_model
    model.export(tmp_path / "saved_model", steps=3, sampler="ddim")  # PyTorch: via TensorFlow
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    assert not hasattr(served, "denoise")
    # The noise generate draws from seed 5, in the latents' shape.
    noise = ops.convert_to_numpy(keras.random.normal((2, 4, 4, 2), seed=5))
    images = served.generate(noise).numpy()
    assert images.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(images, model.generate(2, steps=3, seed=5), atol=1e-4)
    guided = served.generate_conditional(noise, np.array([0, 2], "int32"), 2.0).numpy()
    np.testing.assert_allclose(
        guided, model.generate(2, steps=3, seed=5, labels=[0, 2], guidance_scale=2.0), atol=1e-4)


# ------------------------------------------------- the config and commands
SMOKE_LATENT = ROOT / "configs" / "smoke_latent.yaml"
needs_mnist = pytest.mark.skipif(not (DATA_DIR / "mnist.npz").exists(),
                                 reason="needs the shared MNIST file")


def _cli(*argv):
    """`keras-diffusion ARGV` in this process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(arg) for arg in argv])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory):
    """configs/smoke_latent.yaml trained once: the autoencoder, then the latent model."""
    output = tmp_path_factory.mktemp("smoke_latent")
    code, stdout, stderr = _cli("train", "--config", SMOKE_LATENT, "--data-dir", DATA_DIR,
                                "--output", output)
    assert code == 0, stderr[-3000:]
    return output, stdout


@once
@needs_mnist
def test_the_latent_config_trains_both_stages(latent_run):
    output, stdout = latent_run
    assert f"wrote {output / 'model.keras'}, {output / 'autoencoder.keras'}, " in stdout
    with open(output / "autoencoder_history.csv") as f:
        assert f.readline().strip().split(",") == ["epoch", "kl", "loss", "reconstruction"]
    assert (output / "autoencoder_reconstructions.png").is_file()
    assert not (output / "autoencoder_backup").exists()
    with open(output / "history.csv") as f:
        assert {"loss", "fid", "kid"} <= set(f.readline().strip().split(","))
    assert (output / "samples" / "epoch_0001.png").is_file()
    model = kd.load_model(output / "model.keras")
    assert isinstance(model, kd.LatentDiffusionModel)
    assert model.image_shape == (28, 28, 1) and model.sample_shape == (8, 8, 2)  # padded by 2


@once
@needs_mnist
def test_commands_work_on_a_latent_model(latent_run, tmp_path):
    output, _ = latent_run
    model = output / "model.keras"
    code, stdout, stderr = _cli("sample", "--model", model, "--num", 2, "--steps", 2,
                                "--out", tmp_path / "s.png", "--npz", tmp_path / "s.npz")
    assert code == 0, stderr
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 28, 28, 1)
    code, _, stderr = _cli("inpaint", "--model", model, "--input", tmp_path / "s.npz",
                           "--mask", "center", "--steps", 2, "--resamples", 1,
                           "--out", tmp_path / "i.npz")
    assert code == 0, stderr
    code, _, stderr = _cli("denoise", "--model", model, "--input", tmp_path / "s.npz",
                           "--sigma", 0.1, "--out", tmp_path / "d.npz")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "denoise needs a pixel-space model" in stderr
    assert not (tmp_path / "d.npz").exists()


@once
@needs_mnist
def test_a_named_autoencoder_is_reused_or_refused(latent_run, tmp_path):
    output, _ = latent_run
    config = load_config(SMOKE_LATENT, [f"autoencoder.path={output / 'autoencoder.keras'}"])
    reused = train_autoencoder(config, None, (28, 28, 1), tmp_path / "reuse")
    trained = kd.load_model(output / "model.keras").autoencoder
    assert reused.get_config() == trained.get_config()
    assert float(ops.convert_to_numpy(reused.scaling_factor)) == float(
        ops.convert_to_numpy(trained.scaling_factor))
    assert not (tmp_path / "reuse").exists()  # nothing trained, nothing written
    # A resumed run takes the autoencoder it saved before it stopped (x=None:
    # training one would fail).
    resumed = train_autoencoder(load_config(SMOKE_LATENT), None, (28, 28, 1), output, resume=True)
    assert resumed.get_config() == trained.get_config()
    base = ["train", "--config", SMOKE_LATENT, "--data-dir", DATA_DIR, "--set", "data.limit=32"]
    for path, message in (
        (tmp_path / "missing.keras", "autoencoder.path: file not found: "),
        (output / "model.keras", "holds a LatentDiffusionModel, not an Autoencoder"),
    ):
        code, _, stderr = _cli(*base, "--output", tmp_path / "bad", "--set", f"autoencoder.path={path}")
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr, stderr
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match=r"autoencoder.path: the autoencoder in .* takes "
                                          r"\(28, 28, 1\) images, but the data are \(32, 32, 3\)"):
        train_autoencoder(config, None, (32, 32, 3), tmp_path / "reuse")


@once
@needs_mnist
def test_train_autoencoder_command(tmp_path):
    output = tmp_path / "ae"
    code, stdout, stderr = _cli("train-autoencoder", "--config", SMOKE_LATENT, "--data-dir", DATA_DIR,
                                "--output", output, "--set", "data.limit=64")
    assert code == 0, stderr[-3000:]
    assert f"wrote {output / 'autoencoder.keras'}, " in stdout
    assert "autoencoder: 28x28x1 -> 8x8x2, scaling factor " in stdout
    assert "reconstruction PSNR " in stdout and " dB on 1,000 test images" in stdout
    assert f"--set autoencoder.path={output / 'autoencoder.keras'}" in stdout
    autoencoder = keras.saving.load_model(output / "autoencoder.keras")
    assert isinstance(autoencoder, kd.Autoencoder) and autoencoder.measured
    assert load_config(output / "config.yaml")["autoencoder"]["widths"] == [8, 16]
    assert sorted(path.name for path in output.iterdir()) == [
        "autoencoder.keras", "autoencoder_history.csv", "autoencoder_reconstructions.png",
        "config.yaml"]  # no backup left
    grid = mpimg.imread(output / "autoencoder_reconstructions.png")
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]  # two rows of eight
    code, _, stderr = _cli("train-autoencoder", "--config", SMOKE_LATENT, "--data-dir", DATA_DIR,
                           "--output", tmp_path / "again",
                           "--set", f"autoencoder.path={output / 'autoencoder.keras'}")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "autoencoder.path names a trained autoencoder" in stderr
    assert not (tmp_path / "again").exists()


@once
@needs_mnist
def test_an_interrupted_autoencoder_resumes_from_its_backup(tmp_path, monkeypatch):
    config = load_config(SMOKE_LATENT, [f"data.data_dir={DATA_DIR}", "data.limit=64"])

    def killed(model, path):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:  # dies after its epoch, before the file is written
        patch.setattr(kd.training, "save_model", killed)
        with pytest.raises(RuntimeError, match="killed"):
            kd.training.train_autoencoder_stage(config, tmp_path, verbose=0)
    assert not (tmp_path / "autoencoder.keras").exists()
    with open(tmp_path / "autoencoder_history.csv") as f:
        first_epoch = f.read().splitlines()[1]
    for train in (kd.training.train_autoencoder_stage, kd.training.train):
        with pytest.raises(ValueError, match=r"holds an autoencoder backed up after epoch 1: "
                                             r"continue it with resume=True"):
            train(config, tmp_path, verbose=0)
    config["autoencoder"]["epochs"] = 2
    autoencoder = kd.training.train_autoencoder_stage(config, tmp_path, verbose=0, resume=True)
    assert autoencoder.measured
    with open(tmp_path / "autoencoder_history.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 3 and rows[1] == first_epoch  # epoch 1 kept, only epoch 2 trained
    assert int(ops.convert_to_numpy(autoencoder.optimizer.iterations)) == 4  # 2 x 64 / 32
    assert not (tmp_path / kd.training.AUTOENCODER_BACKUP).exists()


@once
def test_the_image_folder_config_makes_16x16_latents_of_64x64_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(blobs(8, size=64, channels=3)):
        # 80x72 files, which the config resizes to 64x64
        Image.fromarray((image * 255).astype("uint8")).resize((80, 72)).save(folder / f"{index}.png")
    small = ["autoencoder.widths=[8,16]", "autoencoder.groups=4", "autoencoder.epochs=1",
             "autoencoder.batch_size=4", "network.widths=[8,16]", "network.groups=4",
             "network.blocks_per_level=1", "network.attention_levels=[]", "training.epochs=1",
             "training.batch_size=4", "sampling.every_n_epochs=1", "sampling.num_images=2",
             "sampling.steps=2", f"data.image_folder={folder}"]
    config = load_config(ROOT / "configs" / "folder64_latent.yaml", small)
    model = kd.training.train(config, tmp_path / "run", verbose=0)
    assert model.image_shape == (64, 64, 3) and model.sample_shape == (16, 16, 4)
    assert model.autoencoder.latent_shape == (16, 16, 4)
    assert (tmp_path / "run" / "samples" / "epoch_0001.png").is_file()
    assert model.generate(1, steps=2, seed=0).shape == (1, 64, 64, 3)
