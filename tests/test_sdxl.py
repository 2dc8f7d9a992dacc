"""An SDXL base pipeline built offline by diffusers (tiny, random, as its own
SDXL tests build theirs), loaded from its folder and run against diffusers'
`StableDiffusionXLPipeline` from the same starting latents: guided DDIM with
negative prompts, and without one, where SDXL guides away from zeros
(`force_zeros_for_empty_prompt`)."""

import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import once
from sd_pipelines import reference_images
from sd_pipelines import write_pipeline


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("sdxl") / "pipeline"
    write_pipeline(folder, "sdxl")
    return StableDiffusionXLPipeline.from_pretrained(folder), kd.load_model(folder), folder


def test_it_loads_as_sdxl(xl):
    from keras_diffusion.stable_diffusion.model import StableDiffusionXL

    _, model, _ = xl
    assert isinstance(model, StableDiffusionXL) and model.force_zeros_for_empty_prompt
    assert float(np.asarray(model.autoencoder.scaling_factor)) == pytest.approx(0.13025)
    assert model.tokenizer(["a cat"]).shape == (1, 154)


@pytest.mark.parametrize("sampler, negative", [("ddim", ["blurry", "a red dog"]),
                                               pytest.param("ddim", None, marks=once),
                                               pytest.param("euler", ["blurry", "a red dog"],
                                                            marks=once)],
                         ids=["ddim-negative", "ddim-zeros", "euler-negative"])
def test_guided_images_equal_diffusers(xl, sampler, negative):
    """DDIM, and Euler as SDXL ships it (EulerDiscreteScheduler from the
    folder's config: "leading" spacing, no Karras sigmas)."""
    reference, model, _ = xl
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype("float32")
    prompts = ["a photo of a cat", "jackfruits hang from the tree"]
    expected = reference_images(reference, latents, prompts=prompts, negative_prompts=negative,
                                steps=3, guidance_scale=5.0, scheduler=sampler)
    images = model.generate(2, prompts=prompts, negative_prompts=negative, guidance_scale=5.0,
                            steps=3, sampler=sampler, noise=latents)
    assert images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_a_folder_missing_the_second_encoder_is_named(xl, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(xl[2], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/config.json is missing"):
        kd.load_model(folder)


@once
def test_it_saves_as_one_keras_file_and_reloads_to_the_same_images(xl, tmp_path):
    from keras_diffusion.stable_diffusion.model import StableDiffusionXL

    _, model, _ = xl
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype("float32")
    before = model.generate(1, prompts="a red dog", steps=2, guidance_scale=5.0, noise=latents)
    model.save(tmp_path / "xl.keras")
    again = kd.load_model(tmp_path / "xl.keras")
    assert isinstance(again, StableDiffusionXL) and again.force_zeros_for_empty_prompt
    np.testing.assert_array_equal(again.tokenizer(["a red dog"]), model.tokenizer(["a red dog"]))
    after = again.generate(1, prompts="a red dog", steps=2, guidance_scale=5.0, noise=latents)
    np.testing.assert_allclose(after, before, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the export traces under TensorFlow on every "
                    "backend (a subprocess under the others); test_stable_diffusion checks the "
                    "SD export under JAX too")
def test_export_serves_both_token_sequences_to_an_image(xl, tmp_path):
    """`generate_from_tokens` takes the two tokenizers' ids side by side and
    gives `generate`'s image; the tokenizers' folders are written as
    diffusers names them, and transformers reads them to the same ids."""
    import tensorflow as tf
    from transformers import CLIPTokenizer as Reference

    _, model, _ = xl
    path = tmp_path / "exported"
    model.export(path, steps=2, sampler="euler")
    prompts = ["a photo of a cat", "a red dog"]
    ids = np.concatenate([np.asarray(Reference.from_pretrained(str(path / "assets" / folder))(
        prompts, padding="max_length", max_length=77, truncation=True).input_ids, "int32")
        for folder in ("tokenizer", "tokenizer_2")], axis=1)
    np.testing.assert_array_equal(ids, model.tokenizer(prompts))
    noise = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype("float32")
    served = tf.saved_model.load(str(path))
    images = served.generate_from_tokens(noise, ids, tf.constant(5.0)).numpy()
    expected = model.generate(2, prompts=prompts, guidance_scale=5.0, steps=2, sampler="euler",
                              noise=noise)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_save_diffusers_writes_a_folder_diffusers_loads_to_our_images(xl, tmp_path):
    """Both encoders whole (SDXL's pipeline reads their penultimate layers
    itself), the second with its projection, both tokenizers, SDXL's
    model_index options."""
    from diffusers import StableDiffusionXLPipeline

    _, model, _ = xl
    folder = model.save_diffusers(tmp_path / "written")
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    assert reference.config.force_zeros_for_empty_prompt
    assert type(reference.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    latents = np.random.default_rng(4).standard_normal((1, 8, 8, 4)).astype("float32")
    expected = reference_images(reference, latents, prompts=["a red dog"],
                                negative_prompts=["blurry"], steps=2, guidance_scale=5.0)
    images = model.generate(1, prompts="a red dog", negative_prompts="blurry", steps=2,
                            guidance_scale=5.0, noise=latents)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@pytest.mark.skipif(BACKEND != "torch", reason="registration is the same on every backend")
def test_a_saved_sdxl_model_loads_in_a_fresh_process(xl, tmp_path):
    """Its tokenizers and text encoders are registered by `import
    keras_diffusion` alone, not only once a checkpoint was read."""
    import subprocess
    import sys

    _, model, _ = xl
    model.save(tmp_path / "xl.keras")
    code = ("import keras_diffusion as kd; "
            f"print(type(kd.load_model({str(tmp_path / 'xl.keras')!r})).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "StableDiffusionXL"


@pytest.mark.skipif(BACKEND != "torch", reason="the page's functions are the same on every "
                    "backend (test_demo drives the page itself)")
def test_the_demo_page_serves_an_sdxl_model(xl):
    from keras_diffusion import demo

    _, model, _ = xl
    grid, line = demo.generate(model, prompt="a photo of a cat", num=2, guidance=5.0, steps=2)
    assert grid.dtype == np.uint8 and grid.shape[0] >= 16 and "2 images" in line
    photo = (np.random.default_rng(5).uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
    edited, line = demo.img2img(model, photo, strength=0.5, steps=4, prompt="a cat")
    assert edited.dtype == np.uint8 and line.startswith("strength 0.5, 4 steps")


@pytest.mark.skipif(BACKEND != "torch", reason="the check is the pipeline's, the same on every "
                    "backend")
def test_a_size_the_unet_cannot_divide_is_one_line(xl):
    _, model, _ = xl
    with pytest.raises(ValueError, match=r"image_size 18x20 does not divide: both sides must be "
                                         r"multiples of 4 for this model"):
        model.generate(1, prompts="a cat", steps=2, image_size=(18, 20))
