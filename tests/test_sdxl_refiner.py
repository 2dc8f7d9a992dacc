"""SDXL's refiner and the ensemble of experts, against diffusers: a tiny
random `StableDiffusionXLImg2ImgPipeline` built as SDXL's refiner is (the
second text encoder alone, an aesthetic score in its time ids), its img2img
from the same latents and noise, and a base model's run handed over part way
(`denoising_end` / `denoising_start`) as diffusers' two pipelines hand it."""

import numpy as np
import pytest

import keras_diffusion as kd
from conftest import once
from sd_pipelines import write_pipeline

# The refiner's parts are the base's and the hand-over is the samplers' own
# code: its img2img and the hand-over run on each backend with Euler (the
# sampler SDXL ships), the rest once.
PROMPTS = ["a photo of a cat", "jackfruits hang from the tree"]
NEGATIVE = ["blurry", "a red dog"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("experts")
    write_pipeline(root / "base", "sdxl")
    write_pipeline(root / "refiner", "sdxl_refiner")
    return {"base": (StableDiffusionXLPipeline.from_pretrained(root / "base"),
                     kd.load_model(root / "base")),
            "refiner": (StableDiffusionXLImg2ImgPipeline.from_pretrained(root / "refiner"),
                        kd.load_model(root / "refiner"))}


def _scheduler(pipeline, sampler):
    from diffusers import DDIMScheduler
    from diffusers import EulerDiscreteScheduler

    kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler]
    pipeline.scheduler = kind.from_config(pipeline.scheduler.config)
    return pipeline


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _torch_noise(shape, seed):
    """The noise diffusers' img2img adds from `torch.Generator().manual_seed(
    seed)`, NHWC."""
    import torch

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return noise.numpy().transpose(0, 2, 3, 1)


def test_the_refiner_loads_with_its_one_encoder(experts):
    from keras_diffusion.stable_diffusion.model import StableDiffusionXL

    _, refiner = experts["refiner"]
    assert isinstance(refiner, StableDiffusionXL) and refiner.requires_aesthetics_score
    assert refiner.text_encoder.first is None and refiner.text_encoder.output_dim == 32
    assert refiner.tokenizer(["a cat"]).shape == (1, 77)
    assert not refiner.force_zeros_for_empty_prompt


@pytest.mark.parametrize("sampler", [pytest.param("ddim", marks=once), "euler"])
def test_refiner_img2img_equals_diffusers(experts, sampler):
    """From the same latents and the same added noise, at strength 0.6 of 5
    steps (3 run), guided away from negative prompts."""
    import torch

    reference, refiner = experts["refiner"]
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype("float32")
    with torch.no_grad():
        expected = _scheduler(reference, sampler)(
            prompt=PROMPTS, negative_prompt=NEGATIVE, image=_nchw(latents), strength=0.6,
            num_inference_steps=5, guidance_scale=5.0, output_type="np",
            generator=torch.Generator().manual_seed(3)).images
    noise = _torch_noise((2, 4, 8, 8), 3)
    images = refiner.img2img(latents, prompts=PROMPTS, negative_prompts=NEGATIVE, strength=0.6,
                             steps=5, guidance_scale=5.0, sampler=sampler, noise=noise)
    assert images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@pytest.mark.parametrize("sampler", [pytest.param("ddim", marks=once), "euler"])
def test_base_then_refiner_equals_diffusers_two_pipelines(experts, sampler):
    """The ensemble of experts: the base runs the first 70% of a 6-step plan
    and hands its latents to the refiner, which runs the rest."""
    import torch

    (reference_base, base), (reference_refiner, refiner) = experts["base"], experts["refiner"]
    start = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype("float32")
    options = dict(negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0)
    with torch.no_grad():
        handed = _scheduler(reference_base, sampler)(
            prompt=PROMPTS, latents=_nchw(start), denoising_end=0.7, output_type="latent",
            height=16, width=16, **options).images
        expected = _scheduler(reference_refiner, sampler)(
            prompt=PROMPTS, image=handed, denoising_start=0.7, output_type="np",
            **options).images
    latents = base.generate(2, prompts=PROMPTS, negative_prompts=NEGATIVE, steps=6,
                            guidance_scale=5.0, sampler=sampler, noise=start,
                            denoising_end=0.7, output="latents")
    if sampler == "ddim":  # the same noisy latents at the hand-over (Euler's are x_t / sqrt(a))
        np.testing.assert_allclose(latents, handed.numpy().transpose(0, 2, 3, 1), atol=2e-4)
    images = refiner.img2img(latents, prompts=PROMPTS, negative_prompts=NEGATIVE, steps=6,
                             guidance_scale=5.0, sampler=sampler, denoising_start=0.7)
    np.testing.assert_allclose(images, expected, atol=2e-3)


@once
def test_the_refiner_is_refused_text_to_image(experts):
    _, refiner = experts["refiner"]
    with pytest.raises(ValueError, match="this is an SDXL refiner .* refines images"):
        refiner.generate(1, prompts="a cat", steps=2)


@once
def test_hand_over_settings_are_checked(experts):
    _, base = experts["base"]
    _, refiner = experts["refiner"]
    latents = np.zeros((1, 8, 8, 4), "float32")
    with pytest.raises(ValueError, match=r"denoising_end / denoising_start must be a fraction in "
                                         r"\(0, 1\); got 1.5"):
        base.generate(1, steps=4, denoising_end=1.5, output="latents")
    with pytest.raises(ValueError, match="sampler 'heun' cannot stop part way"):
        base.generate(1, steps=4, sampler="heun", denoising_end=0.5)
    with pytest.raises(ValueError, match="output must be one of images, latents; got 'png'"):
        base.generate(1, steps=2, output="png")
    with pytest.raises(ValueError, match="no step is left to run of the 4 planned"):
        refiner.img2img(latents, steps=4, strength=0.1)


@once
def test_the_refiner_saves_as_a_diffusers_folder(experts, tmp_path):
    """Written as a `StableDiffusionXLImg2ImgPipeline` (no first encoder,
    aesthetic scores), which diffusers loads to our refined images."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, refiner = experts["refiner"]
    folder = refiner.save_diffusers(tmp_path / "written")
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    assert reference.text_encoder is None and reference.config.requires_aesthetics_score
    latents = np.random.default_rng(5).standard_normal((1, 8, 8, 4)).astype("float32")
    with torch.no_grad():
        expected = _scheduler(reference, "ddim")(
            prompt="a red dog", image=_nchw(latents), strength=0.5, num_inference_steps=4,
            guidance_scale=5.0, output_type="np",
            generator=torch.Generator().manual_seed(6)).images
    images = refiner.img2img(latents, prompts="a red dog", strength=0.5, steps=4,
                             guidance_scale=5.0, noise=_torch_noise((1, 4, 8, 8), 6))
    np.testing.assert_allclose(images, expected, atol=2e-3)
