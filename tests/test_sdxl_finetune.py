"""Fine-tuning SDXL with `fit`: the whole UNet, with SDXL's conditioning in
the training step (the pooled prompt and each image's time ids, as
diffusers' SDXL training scripts compute them), the fine-tuning options of
Stable Diffusion, and DreamBooth with prior preservation through
`keras-diffusion finetune`. The pipeline is `sd_pipelines`' tiny SDXL one."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import BACKEND
from conftest import cli_main
from conftest import once
from sd_pipelines import write_pipeline

CAPTIONS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_finetune") / "pipeline"
    write_pipeline(folder, "sdxl")
    return folder


@pytest.fixture(scope="module")
def model(folder):
    return kd.load_model(folder)


def _images(count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, 16, 16, 3)).astype("float32")


def _loss(model, labels, images):
    """The loss of one batch from the same draws: the seed's state restored."""
    state = ops.convert_to_numpy(model.seed_generator.state).copy()
    loss = float(ops.convert_to_numpy(model.compute_diffusion_loss(images, labels,
                                                                   training=False)))
    model.seed_generator.state.assign(state)
    return loss


@once
def test_the_time_ids_are_each_images_and_reach_the_unet(model):
    ids = model.tokenize_captions(CAPTIONS)
    x0 = ops.zeros((2, 8, 8, 4))
    given = {"prompts": ids, "original_size": np.array([[40, 24], [16, 16]], "float32"),
             "crop_top_left": np.array([[3, 0], [0, 5]], "float32")}
    features, pooled, time_ids = model.training_conditions(given, x0, training=False)
    assert tuple(features.shape) == (2, 77, 64) and tuple(pooled.shape) == (2, 32)
    np.testing.assert_array_equal(ops.convert_to_numpy(time_ids),
                                  [[40, 24, 3, 0, 16, 16], [16, 16, 0, 5, 16, 16]])
    # Captions alone: images made at the model's size, as diffusers' pipeline samples.
    np.testing.assert_array_equal(ops.convert_to_numpy(model.training_conditions(ids, x0)[2]),
                                  [[16, 16, 0, 0, 16, 16]] * 2)
    images = _images()
    plain = _loss(model, ids, images)
    assert _loss(model, {"prompts": ids, "original_size": np.full((2, 2), 16.0),
                         "crop_top_left": np.zeros((2, 2))}, images) == pytest.approx(plain)
    assert abs(_loss(model, given, images) - plain) > 1e-6
    assert abs(_loss(model, {"prompts": ids, "crop_top_left": np.full((2, 2), 8.0)}, images)
               - plain) > 1e-6


def _values(part):
    return [ops.convert_to_numpy(v).copy() for v in part.variables]


@once
def test_fit_fine_tunes_the_whole_unet_with_the_options(folder):
    model = kd.load_model(folder)
    frozen = _values(model.text_encoder) + _values(model.autoencoder)
    unet = _values(model.network)
    model.configure_fine_tuning(noise_offset=0.05, min_snr_gamma=5.0, prompt_dropout=0.5)
    model.enable_gradient_checkpointing()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    latents = model.encode_latents(_images(4))
    history = model.fit(latents, {"prompts": CAPTIONS * 2, "original_size": [[32, 32]] * 4,
                                  "crop_top_left": [[0, 0], [4, 4]] * 2},
                        batch_size=2, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    history = model.fit(_images(), CAPTIONS, batch_size=2, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[0] != losses[1]
    changed = [not np.array_equal(a, b) for a, b in zip(unet, _values(model.network))]
    assert sum(changed) > len(changed) // 2  # the UNet trains
    for before, after in zip(frozen, _values(model.text_encoder) + _values(model.autoencoder)):
        np.testing.assert_array_equal(after, before)


@once
def test_bad_per_image_conditions_are_one_line(model):
    images = _images()
    cases = [({"prompts": CAPTIONS, "original_size": [[16, 16]]}, "original_size"),
             ({"prompts": CAPTIONS, "crop_top_left": [[-1, 0], [0, 0]]}, "crop_top_left"),
             ({"prompts": CAPTIONS, "original_size": [[16.5, 16], [16, 16]]}, "original_size"),
             ({"prompts": CAPTIONS, "aesthetic_score": [6, 6]}, "'prompts' \\(the captions\\)"),
             ({"original_size": [[16, 16]] * 2}, "'prompts' \\(the captions\\)")]
    for y, expected in cases:
        with pytest.raises(ValueError, match=expected) as error:
            model.fit(images, y, epochs=1, verbose=0)
        assert "\n" not in str(error.value)


@once
def test_a_dict_of_conditions_is_refused_by_sd1(tmp_path):
    write_pipeline(tmp_path / "sd1", "sd1")
    sd = kd.load_model(tmp_path / "sd1")
    with pytest.raises(ValueError, match="takes its captions or labels as y, not a dict"):
        sd.fit(_images(), {"prompts": CAPTIONS, "original_size": [[16, 16]] * 2}, verbose=0)


@pytest.mark.skipif(BACKEND != "torch", reason="the command is the same code on every backend; "
                    "test_sdxl_lora.py trains SDXL LoRAs with fit on each")
def test_dreambooth_with_prior_preservation_through_the_command(folder, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "instance"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = (rng.uniform(0, 0.3, (20, 24, 3)) * 255).astype("uint8")
        pixels[6:14, 8:16, 0] = 230
        Image.fromarray(pixels).save(data / f"{index}.png")
    from keras_diffusion.stable_diffusion.finetuning import read_training_images

    # 20x24 scaled to 16x19, its middle 16 columns kept: what the time ids record.
    _, _, sizes, crops = read_training_images(data, (16, 16), "x", geometry=True)
    np.testing.assert_array_equal(sizes, [[20, 24]] * 2)
    np.testing.assert_array_equal(crops, [[0, 1]] * 2)
    output = tmp_path / "run"
    assert cli_main("finetune", "--model", folder, "--data-dir", data, "--output", output,
                    "--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of a dog",
                    "--num-class-images", "2", "--lora-rank", "2", "--epochs", "1",
                    "--batch-size", "2", "--learning-rate", "1e-2", "--sample-steps", "2",
                    "--cache-latents") == 0
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    model = kd.load_model(folder)
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype("float32")
    before = model.generate(1, prompts="a photo of sks dog", steps=2, noise=latents)
    model.load_lora_weights(output)
    after = model.generate(1, prompts="a photo of sks dog", steps=2, noise=latents)
    assert np.abs(after - before).max() > 1e-4
