"""Stable Diffusion 3 against diffusers: tiny random `StableDiffusion3Pipeline`s
built offline as diffusers' own SD 3 tests build theirs (CLIP-L and CLIP-G
with projections, a tiny T5 and a tokenizer.json written here, or no T5),
their prompt encoding, and the flow-matching schedule their folder sets."""

import keras
import numpy as np
import pytest

from conftest import once
from sd_pipelines import write_pipeline

PROMPTS = ["a photo of a cat", "jackfruits hang from the tree"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipelines = {style: write_pipeline(root / style, style) for style in ("sd3", "sd3_no_t5")}
    return root, pipelines


def _clip(folder, part):
    from keras_diffusion import checkpoint_files
    from keras_diffusion.stable_diffusion import weights
    from keras_diffusion.stable_diffusion.clip import CLIPTextTransformer
    from keras_diffusion.stable_diffusion.clip import text_model_state_dict

    config = __import__("json").loads((folder / part / "config.json").read_text())
    encoder = CLIPTextTransformer.from_reference_config(config, skip_layers=1,
                                                        final_layer_norm=False)
    state = checkpoint_files.read_safetensors(folder / part / "model.safetensors")
    weights.load_state_dict(encoder, text_model_state_dict(state), part)
    return encoder


def test_prompts_without_t5_encode_as_diffusers(folders):
    """CLIP-L and CLIP-G penultimate features side by side, zero-padded to
    the joint width, then zeros where T5's 256 tokens would be; the pooled
    prompt both projections side by side."""
    import torch

    from keras_diffusion.stable_diffusion.sd3 import SD3TextEncoders
    from keras_diffusion.stable_diffusion.sd3 import SD3Tokenizer
    from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer

    root, pipelines = folders
    folder, reference = root / "sd3_no_t5", pipelines["sd3_no_t5"]
    tokenizer = SD3Tokenizer(CLIPTokenizer.from_folder(folder / "tokenizer"),
                             CLIPTokenizer.from_folder(folder / "tokenizer_2"))
    encoders = SD3TextEncoders(_clip(folder, "text_encoder"), _clip(folder, "text_encoder_2"),
                               joint_dim=96, t5_length=256)
    ids = tokenizer(PROMPTS)
    assert ids.shape == (2, 154)
    output = {key: keras.ops.convert_to_numpy(value) for key, value in encoders(ids).items()}
    with torch.no_grad():
        features, _, pooled, _ = reference.encode_prompt(PROMPTS, None, None,
                                                         do_classifier_free_guidance=False)
    assert tuple(output["sequence_output"].shape) == tuple(features.shape) == (2, 77 + 256, 96)
    np.testing.assert_allclose(output["sequence_output"], features.numpy(), atol=1e-4)
    np.testing.assert_allclose(output["pooled_output"], pooled.numpy(), atol=1e-4)


@once
def test_the_folder_scheduler_is_a_shifted_flow_schedule(folders):
    import json

    from keras_diffusion.stable_diffusion.sd3 import schedule_from_config

    root, pipelines = folders
    config = json.loads((root / "sd3" / "scheduler" / "scheduler_config.json").read_text())
    schedule = schedule_from_config(config)
    reference = pipelines["sd3"].scheduler
    reference.set_timesteps(5)
    np.testing.assert_allclose(schedule.sampling_sigmas(5), reference.sigmas.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="an SD 3 scheduler must be one of "
                                         "FlowMatchEulerDiscreteScheduler; got 'DDIMScheduler'"):
        schedule_from_config({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        schedule_from_config({**config, "use_karras_sigmas": True})


@pytest.fixture(scope="module")
def models(folders):
    import keras_diffusion as kd

    root, _ = folders
    return {style: kd.load_model(root / style) for style in ("sd3", "sd3_no_t5")}


def test_the_folder_loads_as_sd3(models):
    from keras_diffusion import FlowMatchSchedule
    from keras_diffusion.stable_diffusion.sd3 import StableDiffusion3

    model = models["sd3"]
    assert isinstance(model, StableDiffusion3) and model.prediction == "flow"
    assert isinstance(model.schedule, FlowMatchSchedule) and model.schedule.shift == 3.0
    assert model.sample_shape == (8, 8, 16) and model.image_shape == (16, 16, 3)
    assert model.tokenizer(PROMPTS).shape == (2, 77 + 77 + 256)
    assert models["sd3_no_t5"].text_encoder.third is None
    assert models["sd3_no_t5"].tokenizer(PROMPTS).shape == (2, 154)


@pytest.mark.parametrize("style", ["sd3", "sd3_no_t5"])
def test_guided_images_equal_diffusers(folders, models, style):
    """Euler on the shifted flow sigmas, guided away from negative prompts,
    with T5 and without (zeros of its shape), from the same latents."""
    import torch

    _, pipelines = folders
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype("float32")
    with torch.no_grad():
        expected = pipelines[style](
            prompt=PROMPTS, negative_prompt=["blurry", "a red dog"], height=16, width=16,
            num_inference_steps=3, guidance_scale=5.0, output_type="np",
            latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))).images
    images = models[style].generate(2, prompts=PROMPTS, negative_prompts=["blurry", "a red dog"],
                                    guidance_scale=5.0, steps=3, sampler="euler", noise=latents)
    assert images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_it_saves_as_one_keras_file_and_reloads_to_the_same_images(models, tmp_path):
    import keras_diffusion as kd
    from keras_diffusion.stable_diffusion.sd3 import StableDiffusion3

    model = models["sd3"]
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 16)).astype("float32")
    before = model.generate(1, prompts="a red dog", steps=2, guidance_scale=5.0, noise=latents,
                            sampler="euler")
    model.save(tmp_path / "sd3.keras")
    again = kd.load_model(tmp_path / "sd3.keras")
    assert isinstance(again, StableDiffusion3)
    np.testing.assert_array_equal(again.tokenizer(PROMPTS), model.tokenizer(PROMPTS))
    after = again.generate(1, prompts="a red dog", steps=2, guidance_scale=5.0, noise=latents,
                           sampler="euler")
    # Reloaded, PyTorch's kernels are in Keras' layout rather than views of
    # the folder's: its products may round in another order (1e-6 seen).
    np.testing.assert_allclose(after, before, atol=1e-5)


@once
def test_a_folder_missing_an_encoder_names_it(folders, tmp_path):
    import shutil

    import keras_diffusion as kd

    root, _ = folders
    shutil.copytree(root / "sd3", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/ \(OpenCLIP ViT-bigG "
                                                r"with projection\)"):
        kd.load_model(tmp_path / "copy")


def test_skip_layer_guidance_equals_diffusers(folders, models):
    """SD 3.5's skip-layer guidance: on the steps between 1% and 60% of a
    5-step plan (steps 1 and 2), the conditional branch with block 0
    skipped steers the image, as diffusers' pipeline does."""
    import torch

    _, pipelines = folders
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 16)).astype("float32")
    options = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.8,
                   skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.6)
    with torch.no_grad():
        expected = pipelines["sd3"](
            prompt="a photo of a cat", negative_prompt="blurry", height=16, width=16,
            num_inference_steps=5, guidance_scale=5.0, output_type="np",
            latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
            **options).images
    model = models["sd3"]
    images = model.generate(1, prompts="a photo of a cat", negative_prompts="blurry",
                            guidance_scale=5.0, steps=5, sampler="euler", noise=latents,
                            **options)
    plain = model.generate(1, prompts="a photo of a cat", negative_prompts="blurry",
                           guidance_scale=5.0, steps=5, sampler="euler", noise=latents)
    assert np.abs(images - plain).max() > 1e-2  # the guidance changes the image
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_skip_layer_guidance_needs_a_network_that_skips(folders):
    import keras_diffusion as kd
    from sd_pipelines import write_pipeline as write

    root, _ = folders
    write(root / "sd1", "sd1")
    with pytest.raises(ValueError, match="skip-layer guidance needs a network that can skip "
                                         "blocks .*StableDiffusionUNet"):
        kd.load_model(root / "sd1").generate(1, prompts="a cat", guidance_scale=5.0, steps=2,
                                             skip_guidance_layers=[0])


@once
def test_img2img_equals_diffusers(folders, models):
    """From the same latents and noise, at a strength where SD 3's pipeline
    counts its steps otherwise than SD's (3 of 5 at 0.55, not 2)."""
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline

    _, pipelines = folders
    reference = StableDiffusion3Img2ImgPipeline(**pipelines["sd3"].components)
    latents = np.random.default_rng(4).standard_normal((1, 8, 8, 16)).astype("float32")
    with torch.no_grad():
        expected = reference(
            prompt="a red dog", negative_prompt="blurry", strength=0.55, num_inference_steps=5,
            guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(7),
            image=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))).images
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    images = models["sd3"].img2img(latents, prompts="a red dog", negative_prompts="blurry",
                                   strength=0.55, steps=5, guidance_scale=5.0, sampler="euler",
                                   noise=noise.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(images, expected, atol=2e-3)
