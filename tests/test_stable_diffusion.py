"""Stable Diffusion checkpoints: a diffusers folder loads into our parts and
generates diffusers' images, on every backend.

The pipelines are tiny and random, built offline by `sd_pipelines` and saved
with `save_pretrained`; the same starting latents go to both libraries.
"""

import json
import shutil

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import once
from sd_pipelines import reference_images
from sd_pipelines import write_pipeline

PROMPTS = ["a photo of a cat", "jackfruits hang from the branches of the tree"]
NEGATIVE = ["blurry", "a red dog"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request, tmp_path_factory):
    """`(folder, diffusers pipeline, our model)` of one style, the pipeline
    read back from the folder as a user's would be. The SD-1 style's
    scheduler config names no timestep spacing (as SD 1.5's file), so each
    diffusers scheduler keeps its own default; the SD-2 style's names one,
    which every scheduler made from it inherits."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    write_pipeline(folder, request.param)
    if request.param == "sd1":
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        del config["timestep_spacing"]
        path.write_text(json.dumps(config))
    return folder, StableDiffusionPipeline.from_pretrained(folder), kd.load_model(folder)


def _latents(seed=0, shape=(2, 8, 12, 4)):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def test_a_diffusers_folder_loads_as_a_latent_model(sd):
    folder, pipeline, model = sd
    assert isinstance(model, kd.LatentDiffusionModel)
    config = pipeline.scheduler.config
    assert model.prediction == {"epsilon": "epsilon", "v_prediction": "v"}[config.prediction_type]
    np.testing.assert_allclose(model.schedule.alphas_cumprod,
                               pipeline.scheduler.alphas_cumprod.numpy(), atol=1e-6)
    assert model.image_shape == (16, 16, 3)  # sample_size 8 times the VAE's factor 2
    assert model.ema_decay is None and not model.train_text_encoder
    if BACKEND == "torch":  # kernels are views of the folder's layouts (weights.keras_view)
        import torch

        unet = model.network
        dense = next(layer for layer in unet._flatten_layers()
                     if isinstance(layer, keras.layers.Dense))
        conv = next(layer for layer in unet._flatten_layers()
                    if isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[0] == 3)
        assert dense.kernel.value.t().is_contiguous() and not dense.kernel.value.is_contiguous()
        assert conv.kernel.value.permute(3, 2, 0, 1).is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("dpmpp_2m", marks=once)])
def test_guided_sampling_equals_diffusers(sd, sampler):
    _, pipeline, model = sd
    latents = _latents()
    expected = reference_images(pipeline, latents, prompts=PROMPTS, negative_prompts=NEGATIVE,
                                steps=4, guidance_scale=7.5, scheduler=sampler)
    images = model.generate(2, prompts=PROMPTS, negative_prompts=NEGATIVE, guidance_scale=7.5,
                            steps=4, sampler=sampler, noise=latents)
    assert images.shape == (2, 16, 24, 3)
    np.testing.assert_allclose(images, expected, atol=2e-3)
    # The prompts matter: other prompts move the image by far more than that.
    other = model.generate(2, prompts="a dog", guidance_scale=7.5, steps=4, sampler=sampler,
                           noise=latents)
    assert np.abs(other - images).max() > 0.05


@once
def test_the_model_saves_as_one_keras_file(sd, tmp_path):
    _, _, model = sd
    model.save(tmp_path / "sd.keras")
    loaded = kd.load_model(tmp_path / "sd.keras")
    latents = _latents(1, (1, 8, 8, 4))
    kwargs = dict(prompts="a photo of a dog", guidance_scale=3.0, steps=3, noise=latents)
    np.testing.assert_allclose(loaded.generate(1, **kwargs), model.generate(1, **kwargs),
                               atol=1e-5)
    assert loaded.schedule.get_config() == model.schedule.get_config()


@once
def test_a_model_saves_over_the_folder_it_was_loaded_from(sd, tmp_path):
    """Under PyTorch the loaded weights are views of the folder's files
    (`weights.keras_view`): saving over that folder replaces the files, and
    the model still holds its own weights, fine-tuned ones included."""
    folder, _, _ = sd
    shutil.copytree(folder, tmp_path / "copy")
    model = kd.load_model(tmp_path / "copy")
    kwargs = dict(prompts="a photo of a dog", guidance_scale=3.0, steps=2,
                  noise=_latents(1, (1, 8, 8, 4)))
    before = model.generate(1, **kwargs)
    bias = next(v for v in model.network.weights if v.path.endswith("bias"))
    bias.assign(bias.numpy() + 1.0)  # written to the model's memory, never to the file
    changed = model.generate(1, **kwargs)
    assert np.abs(changed - before).max() > 1e-3
    np.testing.assert_allclose(kd.load_model(tmp_path / "copy").generate(1, **kwargs), before,
                               atol=1e-6)
    model.save_diffusers(tmp_path / "copy", overwrite=True)
    np.testing.assert_allclose(model.generate(1, **kwargs), changed, atol=1e-6)
    np.testing.assert_allclose(kd.load_model(tmp_path / "copy").generate(1, **kwargs), changed,
                               atol=1e-5)


@once
def test_the_vocab_and_merges_layout_tokenizes_as_tokenizer_json(sd, tmp_path):
    folder, _, model = sd
    copy = tmp_path / "vocab_layout"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer")
    shutil.copytree(folder.parent / f"{folder.name}_tokenizer", copy / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / "tokenizer" / name).is_file():
            shutil.copy(folder / "tokenizer" / name, copy / "tokenizer" / name)
    texts = PROMPTS + ["", "A Photo, of: THE dog's tree!!"]
    np.testing.assert_array_equal(kd.load_model(copy).tokenizer(texts), model.tokenizer(texts))


@once
def test_generate_takes_any_size_the_model_divides(sd):
    _, _, model = sd
    images = model.generate(1, prompts="a cat", steps=2, image_size=(8, 20), seed=0)
    assert images.shape == (1, 8, 20, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="image_size 10x20 does not divide: both sides must be "
                                         "multiples of 4"):
        model.generate(1, prompts="a cat", steps=2, image_size=(10, 20))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 8, 8, 4\)"):
        model.generate(2, prompts="a cat", steps=2, noise=_latents(0, (1, 8, 8, 4)))


@once
def test_img2img_and_inpaint_run_on_an_sd_model(sd):
    _, _, model = sd
    photo = np.random.default_rng(2).uniform(0, 1, (1, 16, 16, 3)).astype("float32")
    edited = model.img2img(photo, strength=0.5, steps=4, prompts="a cat", seed=0)
    assert edited.shape == photo.shape
    mask = np.ones((1, 16, 16, 1), "float32")
    mask[:, 4:12, 4:12] = 0
    filled = model.inpaint(photo, mask, steps=4, prompts="a cat", seed=0, resamples=1)
    known = np.broadcast_to(mask, photo.shape) > 0
    np.testing.assert_array_equal(filled[known], photo[known])


# ------------------------------------------------------------- bad input
@once
def test_a_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="is a folder without model_index.json"):
        kd.load_model(tmp_path)


def _copy_with_json_edit(folder, copy, name, key, value):
    """A copy of the pipeline `folder` whose JSON file `name` has `key` set to `value`."""
    shutil.copytree(folder, copy)
    data = json.loads((copy / name).read_text())
    data[key] = value
    (copy / name).write_text(json.dumps(data))
    return copy


@once
def test_an_unsupported_pipeline_is_named(sd, tmp_path):
    copy = _copy_with_json_edit(sd[0], tmp_path / "flux", "model_index.json", "_class_name",
                                "FluxPipeline")
    with pytest.raises(ValueError, match="holds a FluxPipeline, which keras_diffusion does not "
                                         "load; supported: StableDiffusionPipeline"):
        kd.load_model(copy)


@once
def test_a_truncated_weights_file_is_named(sd, tmp_path):
    folder, _, _ = sd
    copy = tmp_path / "truncated"
    shutil.copytree(folder, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        kd.load_model(copy)


@once
def test_weights_of_another_architecture_list_the_keys(sd, tmp_path):
    copy = _copy_with_json_edit(sd[0], tmp_path / "other", "unet/config.json",
                                "layers_per_block", 2)
    with pytest.raises(ValueError, match=r"the UNet weights do not match its architecture: "
                                         r"\d+ missing \(down_blocks\.0\.attentions\.1"):
        kd.load_model(copy)


# ------------------------------------------------------------- single files
@once
def test_an_original_single_file_loads_to_the_same_image(sd, tmp_path):
    """The tiny pipeline written in the original layout: diffusers'
    `from_single_file` and ours, with the folder as the configuration, make
    the same image."""
    import safetensors.numpy
    from diffusers import StableDiffusionPipeline

    from keras_diffusion.stable_diffusion import single_file

    folder, pipeline, _ = sd
    family = "sd2" if pipeline.unet.config.use_linear_projection else "sd1"
    parts = {part: {key: value.numpy() for key, value in getattr(pipeline, part).state_dict().items()}
             for part in ("unet", "vae", "text_encoder")}
    configs = dict(unet_config=dict(pipeline.unet.config), vae_config=dict(pipeline.vae.config),
                   text_config=pipeline.text_encoder.config.to_dict())
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(single_file.to_original(parts, family=family, **configs), path)
    reference = StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                         local_files_only=True)
    latents = _latents(3, (1, 8, 8, 4))
    expected = reference_images(reference, latents, prompts=PROMPTS[:1], steps=3)
    model = kd.load_model(path, config=folder)
    images = model.generate(1, prompts=PROMPTS[0], guidance_scale=7.5, steps=3, noise=latents)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_a_single_file_of_another_model_is_named(tmp_path):
    import safetensors.numpy

    path = tmp_path / "sd3.safetensors"
    safetensors.numpy.save_file({"text_encoders.clip_l.transformer.text_model.final_layer_norm"
                                 ".weight": np.zeros(4, "float32")}, path)
    with pytest.raises(ValueError, match="Stable Diffusion 3"):
        kd.load_model(path)


@once
def test_the_shipped_tokenizer_is_clips():
    """CLIP's own vocabulary, built from the shipped merges: the ids of the
    Stable Diffusion tokenizer, and what transformers reads back."""
    from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer

    ours = CLIPTokenizer.shipped("sd1")
    assert len(ours.vocabulary) == 49408
    np.testing.assert_array_equal(ours(["a photo of an astronaut"])[0, :8],
                                  [49406, 320, 1125, 539, 550, 18376, 49407, 49407])
    assert CLIPTokenizer.shipped("sd2")(["a cat"])[0, -1] == 0  # padded with "!"


@once
def test_the_shipped_tokenizer_round_trips_through_transformers(tmp_path):
    from transformers import CLIPTokenizer as Reference

    from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer

    ours = CLIPTokenizer.shipped("sd2")
    folder = ours.save_folder(tmp_path / "tokenizer")
    texts = ["A cat, sitting on the mat!", "don't panic: 42 jackfruits"]
    reference = Reference.from_pretrained(str(folder))
    expected = reference(texts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours(texts), expected)
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(folder)(texts), expected)


# ------------------------------------------------------ command line, export
@once
def test_the_command_line_samples_and_converts(sd, tmp_path, capsys):
    from conftest import cli_main

    from keras_diffusion.images import read_images

    folder, _, model = sd
    out = tmp_path / "x.png"
    assert cli_main("sample", "--model", folder, "--prompt", PROMPTS[0], "--negative-prompt",
                    "blurry", "--guidance", "7.5", "--steps", "3", "--size", "16x24", "--num", "1",
                    "--sampler", "dpmpp_2m", "--seed", "0", "--out", out,
                    "--npz", tmp_path / "x.npz") == 0
    assert out.is_file() and read_images(tmp_path / "x.npz").shape == (1, 16, 24, 3)
    converted = tmp_path / "sd.keras"
    assert cli_main("convert", "--model", folder, "--out", converted) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = kd.load_model(converted)
    assert type(loaded).__name__ == "StableDiffusion"
    latents = _latents(4, (1, 8, 8, 4))
    np.testing.assert_allclose(loaded.generate(1, prompts="a cat", steps=2, noise=latents),
                               model.generate(1, prompts="a cat", steps=2, noise=latents),
                               atol=1e-5)


@once
def test_command_line_errors_are_one_line(sd, tmp_path, capsys):
    from conftest import cli_main

    folder, _, _ = sd
    capsys.readouterr()
    assert cli_main("sample", "--model", folder, "--prompt", "a cat", "--size", "10x20",
                    "--num", "1", "--steps", "2", "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_size 10x20 does not divide" in err
    assert cli_main("sample", "--model", folder, "--size", "big", "--out", tmp_path / "x.png") == 2
    assert "expected HxW" in capsys.readouterr().err
    assert cli_main("convert", "--model", tmp_path / "missing", "--out", tmp_path / "x.keras") == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.keras").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.skipif(BACKEND == "torch", reason="under PyTorch, export is the TensorFlow run's code "
                    "in a subprocess (test_export checks that hand-over); run under TF and JAX")
def test_export_serves_prompt_ids_to_an_image(sd, tmp_path):
    """The SavedModel's `generate_from_tokens` (prompt ids -> image) gives
    what `generate` gives, and its tokenizer folder is one transformers reads."""
    import tensorflow as tf
    from transformers import CLIPTokenizer as Reference

    _, _, model = sd
    if model.prediction == "v":
        pytest.skip("the export is the same code for SD 2; exported for SD 1")
    path = tmp_path / "exported"
    model.export(path, steps=3, sampler="ddim")
    reference = Reference.from_pretrained(str(path / "assets" / "tokenizer"))
    ids = np.asarray(reference(PROMPTS, padding="max_length", max_length=77,
                               truncation=True).input_ids, "int32")
    np.testing.assert_array_equal(ids, model.tokenizer(PROMPTS))
    noise = _latents(5, (2,) + model.sample_shape)
    served = tf.saved_model.load(str(path))
    images = served.generate_from_tokens(noise, ids, tf.constant(7.5)).numpy()
    expected = model.generate(2, prompts=PROMPTS, guidance_scale=7.5, steps=3, sampler="ddim",
                              noise=noise)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_the_demo_page_serves_an_sd_model(sd):
    from keras_diffusion import demo

    folder, _, model = sd
    with pytest.warns(UserWarning, match="comes up without test images"):
        assert demo.test_images(str(folder)) is None
    grid, line = demo.generate(model, prompt="a photo of a cat", num=2, guidance=7.5, steps=2)
    scale = demo.display_scale(model)
    # Two 16x16 images side by side, enlarged `scale` times, with the grid's borders.
    assert grid.dtype == np.uint8 and grid.shape[0] >= 16 * scale and grid.shape[1] >= 32 * scale
    assert "2 images" in line
    photo = (np.random.default_rng(5).uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
    shown, _ = demo.img2img(model, photo, strength=0.5, prompt="a cat", guidance=3.0, steps=2)
    assert shown.shape == grid.shape
    demo.build_app(model)  # the page's layout for a prompted latent model
