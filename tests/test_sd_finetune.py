"""Fine-tuning a loaded Stable Diffusion model with `fit`, and writing it back
as a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads to
the same image. Gradient checkpointing gives the same step; the options of
diffusers' training scripts (noise offset, min-SNR, global gradient-norm
clipping) run through a compiled step on every backend.
"""

import json

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import once
from keras_diffusion.stable_diffusion import diffusers_folder
from keras_diffusion.stable_diffusion.unet import ResnetBlock2D
from keras_diffusion.stable_diffusion.unet import Transformer2D
from sd_pipelines import reference_images
from sd_pipelines import write_pipeline

PROMPT = "a photo of a cat"
CAPTIONS = ["a photo of a cat", "a red dog"]
LEARNING_RATE, CLIP_NORM = 4.0, 0.5


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype("float32")


def _ours(model, latents):
    return model.generate(1, prompts=PROMPT, steps=3, guidance_scale=7.5, noise=latents)


def _diffusers(folder, latents):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    return reference_images(pipeline, latents, prompts=[PROMPT], steps=3)


def _values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def _fit_step(model, images):
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, global_clipnorm=CLIP_NORM))
    return model.fit(images, CAPTIONS, batch_size=2, epochs=1, verbose=0,
                     shuffle=False).history["loss"][0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full fit step (every UNet weight trains) of the SD-1 style model
    with a noise offset, min-SNR weighting and global gradient clipping,
    saved as a diffusers folder; then the same step again, from the same
    weights and seed, with gradient checkpointing."""
    root = tmp_path_factory.mktemp("finetune")
    write_pipeline(root / "pipeline", "sd1")
    model = kd.load_model(root / "pipeline")
    variables = model.network.trainable_variables
    assert len(variables) == len(model.network.weights)  # a full fine-tune
    model.configure_fine_tuning(noise_offset=0.1, min_snr_gamma=5.0)
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    start, seed = _values(variables), _values([model.seed_generator.state])[0]
    loss = _fit_step(model, images)
    steps = [after - before for after, before in zip(_values(variables), start)]
    image = _ours(model, _latents())
    folder = model.save_diffusers(root / "saved")
    saved = _values(model.network.weights)

    calls = []
    remat = keras.remat

    def counting_remat(function):
        calls.append(function)
        return remat(function)

    for variable, value in zip(variables, start):
        variable.assign(value)
    model.seed_generator.state.assign(seed)
    model.enable_gradient_checkpointing()
    keras.remat = counting_remat
    try:
        checkpointed_loss = _fit_step(model, images)
    finally:
        keras.remat = remat
        model.enable_gradient_checkpointing(False)
    checkpointed_steps = [after - before for after, before in zip(_values(variables), start)]
    return {"root": root, "model": model, "folder": folder, "image": image, "saved": saved,
            "loss": loss,
            "steps": steps, "checkpointed_loss": checkpointed_loss,
            "checkpointed_steps": checkpointed_steps, "remat_calls": len(calls)}


def test_a_fine_tuned_model_saves_as_a_diffusers_folder(trained):
    latents = _latents()
    expected = _diffusers(trained["folder"], latents)
    np.testing.assert_allclose(trained["image"], expected, atol=2e-3)
    # The step moved the model: the original pipeline's image is another.
    original = _diffusers(trained["root"] / "pipeline", latents)
    assert np.abs(original - expected).max() > 0.05
    names = sorted(path.relative_to(trained["folder"]).as_posix()
                   for path in trained["folder"].rglob("*") if path.is_file())
    assert names == ["model_index.json", "scheduler/scheduler_config.json",
                     "text_encoder/config.json", "text_encoder/model.safetensors",
                     "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                     "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


@once
def test_the_saved_folder_loads_back_as_the_same_model(trained):
    model = kd.load_model(trained["folder"])
    config, expected = model.schedule.get_config(), trained["model"].schedule.get_config()
    assert {k: v for k, v in config.items() if k != "name"} == \
        {k: v for k, v in expected.items() if k != "name"}
    assert model.prediction == "epsilon" and model.image_shape == (16, 16, 3)
    texts = ["a photo of the tree", ""]
    np.testing.assert_array_equal(model.tokenizer(texts), trained["model"].tokenizer(texts))
    for loaded, saved in zip(model.network.weights, trained["saved"]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded), saved)


def test_gradient_checkpointing_gives_the_same_step(trained):
    blocks = [layer for layer in trained["model"].network._flatten_layers()
              if isinstance(layer, (ResnetBlock2D, Transformer2D))]
    # Every block went through keras.remat, in each trace of the step.
    assert trained["remat_calls"] > 0 and trained["remat_calls"] % len(blocks) == 0
    np.testing.assert_allclose(trained["checkpointed_loss"], trained["loss"], rtol=1e-5)
    for step, checkpointed in zip(trained["steps"], trained["checkpointed_steps"]):
        np.testing.assert_allclose(checkpointed, step, atol=1e-6)


def test_the_step_is_clipped_to_the_global_norm(trained):
    norm = np.sqrt(sum(np.sum(np.square(step, dtype="float64")) for step in trained["steps"]))
    np.testing.assert_allclose(norm, LEARNING_RATE * CLIP_NORM, rtol=1e-3)


def test_the_noise_offset_adds_a_constant_per_image_and_channel(trained):
    model = trained["model"]
    means = {}
    for offset in (0.0, 0.5):
        model.configure_fine_tuning(noise_offset=offset)
        noise = keras.ops.convert_to_numpy(model.training_noise((2000, 4, 4, 3)))
        means[offset] = noise.mean(axis=(1, 2))
    model.configure_fine_tuning(noise_offset=0.1, min_snr_gamma=5.0)
    # The mean of 16 unit normals has variance 1/16; the offset adds 0.25.
    np.testing.assert_allclose(means[0.0].var(), 1 / 16, rtol=0.1)
    np.testing.assert_allclose(means[0.5].var(), 1 / 16 + 0.25, rtol=0.1)


@once
def test_an_sd2_model_with_lora_saves_merged_and_as_a_lora(tmp_path):
    """SD-2 style (v prediction, linear projections, gelu, "!" padding): a
    model with a LoRA on the UNet's linear proj_in and the text encoder (B
    set at random) saves as a diffusers folder with the LoRA in its kernels,
    and as a LoRA file diffusers loads onto the original pipeline."""
    from diffusers import StableDiffusionPipeline

    write_pipeline(tmp_path / "pipeline", "sd2")
    model = kd.load_model(tmp_path / "pipeline")
    model.enable_lora(rank=2, alpha=3, targets=("to_q", "to_v", "proj_in"), text_encoder=True,
                      seed=0)
    rng = np.random.default_rng(3)
    for variable in model.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    latents = _latents(1)
    image = _ours(model, latents)
    folder = model.save_diffusers(tmp_path / "saved")
    np.testing.assert_allclose(_diffusers(folder, latents), image, atol=2e-3)
    assert np.abs(_diffusers(tmp_path / "pipeline", latents) - image).max() > 0.02
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["pad_token_id"] == model.tokenizer.pad_id
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    pipeline.load_lora_weights(model.save_lora_weights(tmp_path / "lora").parent)
    np.testing.assert_allclose(reference_images(pipeline, latents, prompts=[PROMPT], steps=3),
                               image, atol=2e-3)


# ------------------------------------------------------------- bad input
@once
def test_save_diffusers_writes_nothing_half_way(trained, tmp_path, monkeypatch):
    model = trained["model"]
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True to replace it"):
        model.save_diffusers(trained["folder"])

    def broken(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(diffusers_folder, "scheduler_config", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_diffusers(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary one
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_diffusers(trained["folder"], overwrite=True)
    assert (trained["folder"] / "scheduler" / "scheduler_config.json").is_file()
    assert [p.name for p in trained["folder"].parent.iterdir() if p.name.startswith(".")] == []


@once
def test_training_images_of_a_size_the_unet_cannot_divide_are_refused(trained):
    model = trained["model"]
    images = np.zeros((2, 18, 16, 3), "float32")  # the tiny model's sides: multiples of 4
    message = (r"the training images are 18x16, a size this model cannot divide: both sides "
               r"must be multiples of 4 \(its own size is 16x16\); resize or crop them first")
    with pytest.raises(ValueError, match=message):
        model.fit(images, CAPTIONS)
    with pytest.raises(ValueError, match=message):
        model.encode_latents(images)
    with pytest.raises(ValueError, match="captions must be one per image: got 1 captions for 2 "
                                         "images"):
        model.fit(np.zeros((2, 16, 16, 3), "float32"), ["a photo of a cat"])


@once
def test_fine_tuning_options_are_checked(trained):
    model = trained["model"]
    with pytest.raises(ValueError, match=r"noise_offset must be a number in \[0, 1\); got -0.1"):
        model.configure_fine_tuning(noise_offset=-0.1)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0 or None; got 0"):
        model.configure_fine_tuning(min_snr_gamma=0)
    with pytest.raises(ValueError, match=r"prompt_dropout must be in \[0, 1\); got 1.5"):
        model.configure_fine_tuning(prompt_dropout=1.5)
    assert model.noise_offset == 0.1 and model.min_snr_gamma == 5.0  # unchanged
    assert kd.load_model(trained["folder"]).prompt_dropout == 0.0  # captions kept by default


@once
def test_fit_trains_at_another_size_the_unet_divides(trained):
    """Images of another size the UNet divides train as they are (diffusers'
    scripts' `--resolution`), and so do their latents: the LoRA moves."""
    model = kd.load_model(trained["root"] / "pipeline")
    model.enable_lora(rank=2, seed=0)
    lora_b = [v for v in model.network.trainable_variables if "lora_kernel_b" in v.path]
    images = np.random.default_rng(4).uniform(0, 1, (2, 32, 24, 3)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    loss = model.fit(images, CAPTIONS, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)
    moved = _values(lora_b)
    assert any(np.abs(value).max() > 0 for value in moved)
    latents = model.encode_latents(images)
    assert latents.shape == (2, 16, 12, 4) and model.is_latents(latents)
    loss = model.fit(latents, CAPTIONS, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)
    assert any(np.abs(after - before).max() > 0 for after, before in zip(_values(lora_b), moved))


@once
def test_latents_encoded_once_train_without_the_vae(trained):
    """`encode_latents` runs the frozen VAE once; `fit` on its latents trains
    the LoRA without calling the VAE in the step."""
    model = kd.load_model(trained["root"] / "pipeline")
    model.enable_lora(rank=2, seed=0)
    images = np.random.default_rng(3).uniform(0, 1, (3, 16, 16, 3)).astype("float32")
    latents = model.encode_latents(images, batch_size=2)
    assert latents.shape == (3, 8, 8, 4) and latents.dtype == np.float32
    assert model.is_latents(latents) and not model.is_latents(images)
    # One posterior sample each, times the scaling factor: standardised by
    # the posterior of the images in [-1, 1], standard normal noise.
    mean, logvar = (keras.ops.convert_to_numpy(a) for a in model.autoencoder.posterior(
        keras.ops.convert_to_tensor(images * 2 - 1)))
    noise = (latents / float(model.autoencoder.scaling_factor) - mean) / np.exp(0.5 * logvar)
    assert abs(noise.mean()) < 0.15 and 0.85 < noise.std() < 1.15  # 768 draws
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.diffusion_inputs(keras.ops.convert_to_tensor(latents))),
        latents)

    calls = []
    posterior = model.autoencoder.posterior
    model.autoencoder.posterior = lambda *args, **kwargs: calls.append(1) or posterior(
        *args, **kwargs)
    lora_b = [v for v in model.network.trainable_variables if "lora_kernel_b" in v.path]
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    model.fit(images[:2], CAPTIONS, batch_size=2, epochs=1, verbose=0)  # a step for images
    calls.clear()
    history = model.fit(latents[:2], CAPTIONS, batch_size=2, epochs=1, verbose=0)
    assert calls == [] and np.isfinite(history.history["loss"][0])
    assert np.isfinite(model.fit(images[:2], CAPTIONS, batch_size=2, epochs=1,
                                 verbose=0).history["loss"][0])  # and back
    assert any(np.abs(keras.ops.convert_to_numpy(v)).max() > 0 for v in lora_b)
    with pytest.raises(ValueError, match="the latents hold NaN or infinite values"):
        model.fit(np.full((2, 8, 8, 4), np.nan, "float32"), CAPTIONS)
    with pytest.raises(ValueError, match="captions must be one per image: got 1 captions for 2"):
        model.fit(latents[:2], CAPTIONS[:1])
