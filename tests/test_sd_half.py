"""Stable Diffusion weights in half precision: a tiny pipeline that diffusers
saved in float16 (its `variant="fp16"` files only) loads with
`dtype="float16"` and `"bfloat16"`, its weights read as stored and kept in
that dtype, and draws diffusers' image at that dtype; a LoRA trains over
frozen bfloat16 weights in float32 and saves a file diffusers loads; the
dtype survives `save`; bad requests are one clear error."""

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import cli_main
from conftest import once
from sd_pipelines import write_pipeline

PROMPT = "a photo of a cat"
STEPS = 3
TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype("float32")


def _diffusers_image(pipeline, dtype, latents=None):
    import torch
    from diffusers import DDIMScheduler

    latents = _latents() if latents is None else latents
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        images = pipeline(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5,
                          height=16, width=16, output_type="np",
                          latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(
                              getattr(torch, TORCH_DTYPES[dtype]))).images
    return np.asarray(images, "float32")


def _pipeline(folder, dtype):
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        folder, variant="fp16", torch_dtype=getattr(torch, TORCH_DTYPES[dtype]))


def _ours(model, latents=None):
    return model.generate(1, prompts=PROMPT, steps=STEPS, guidance_scale=7.5, sampler="ddim",
                          noise=_latents() if latents is None else latents)


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """The float16 folder (only `*.fp16.safetensors` weights) and diffusers'
    images from it in float32, float16 and bfloat16."""
    import torch

    root = tmp_path_factory.mktemp("half")
    pipeline = write_pipeline(root / "float32", "sd1")
    pipeline.to(torch.float16).save_pretrained(root / "fp16", variant="fp16")
    images = {dtype: _diffusers_image(_pipeline(root / "fp16", dtype), dtype)
              for dtype in ("float32", "float16", "bfloat16")}
    return {"folder": root / "fp16", "root": root, "images": images}


def _dtypes(part):
    return {v.path: v.dtype for v in part.variables}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_float16_folder_loads_in_half_precision_to_diffusers_image(half, dtype):
    model = kd.load_model(half["folder"], dtype=dtype)
    assert set(_dtypes(model.network).values()) == {dtype}
    assert set(_dtypes(model.text_encoder).values()) == {dtype}
    vae = _dtypes(model.autoencoder)
    if dtype == "float16":  # force_upcast: diffusers decodes a float16 model in float32
        assert set(vae.values()) == {"float32"}
    else:  # the latent scale is a constant, kept exact
        assert [path.rsplit("/", 1)[-1] for path, d in vae.items() if d != dtype] == \
            ["scaling_factor"]
    image = _ours(model)
    reference, exact = half["images"][dtype], half["images"]["float32"]
    # bfloat16 keeps 8 bits: diffusers' own bfloat16 image is ~0.02 from its
    # float32 one, so two bfloat16 implementations agree to that order.
    np.testing.assert_allclose(image, reference, atol=2e-2 if dtype == "float16" else 3e-2)
    # and ours is no farther from the float32 image than diffusers' is.
    assert np.abs(image - exact).max() <= 1.5 * np.abs(reference - exact).max() + 2e-3


@once
def test_half_weights_are_read_as_stored(half):
    from safetensors.numpy import load_file

    stored = load_file(half["folder"] / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    model = kd.load_model(half["folder"], dtype="float16")
    layer = next(layer for layer in model.network._flatten_layers()
                 if getattr(layer, "module_path", None) == key.rsplit(".", 1)[0])
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    assert kernel.dtype == np.float16
    np.testing.assert_array_equal(kernel, stored[key].T)  # bit for bit


@once
def test_the_dtype_survives_save_and_load(half, tmp_path):
    model = kd.load_model(half["folder"], dtype="bfloat16")
    path = tmp_path / "half.keras"
    model.save(path)
    loaded = kd.load_model(path)
    assert set(_dtypes(loaded.network).values()) == {"bfloat16"}
    np.testing.assert_allclose(_ours(loaded), _ours(model), atol=1e-6)


def test_a_lora_trains_in_float32_over_frozen_bfloat16_weights(half, tmp_path):
    model = kd.load_model(half["folder"], dtype="bfloat16")
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.network.variables}
    base_image = _ours(model)
    model.enable_lora(rank=4, seed=0)
    lora = model.trainable_variables
    assert lora and {v.dtype for v in lora} == {"float32"}
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 1, (2, 16, 16, 3)).astype("float32"), [PROMPT, "a red dog"],
              batch_size=2, epochs=2, verbose=0)
    for variable in model.network.variables:
        value = keras.ops.convert_to_numpy(variable)
        if variable.path in before:  # every base weight, bit for bit
            np.testing.assert_array_equal(value, before[variable.path], err_msg=variable.path)
        elif "lora_kernel_b" in variable.path:
            assert value.dtype == np.float32 and np.abs(value).max() > 0
    image = _ours(model)
    assert np.abs(image - base_image).max() > 0.02  # the LoRA trained
    path = model.save_lora_weights(tmp_path / "lora")
    # The file is the LoRA trained: diffusers reads it to the image our model
    # reads it to (in float32, where the two agree to 2e-3) ...
    exact = kd.load_model(half["folder"])
    exact.load_lora_weights(path)
    pipeline = _pipeline(half["folder"], "float32")
    pipeline.load_lora_weights(path.parent)
    ours = _ours(exact)
    np.testing.assert_allclose(_diffusers_image(pipeline, "float32"), ours, atol=2e-3)
    assert np.abs(ours - half["images"]["float32"]).max() > 0.02  # the LoRA matters
    # ... and what the bfloat16 model computed with, to bfloat16's precision.
    assert np.abs(ours - image).max() < 5e-2


@once
def test_bad_dtype_requests_are_one_error(half, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16 or "
                                         "None \\(float32\\); got 'int8'"):
        kd.load_model(half["folder"], dtype="int8")
    with pytest.raises(ValueError, match="precision='mixed_bfloat16' asks for float32 weights "
                                         "with half computation: give one of them"):
        kd.load_model(half["folder"], dtype="float16", precision="mixed_bfloat16")
    model_file = tmp_path / "tiny.keras"
    kd.load_model(half["folder"]).save(model_file)
    with pytest.raises(ValueError, match="dtype is for Stable Diffusion checkpoints; .*tiny.keras "
                                         "is a Keras model"):
        kd.load_model(model_file, dtype="bfloat16")


@pytest.mark.skipif(BACKEND != "torch", reason="the command line's --dtype is the same code on "
                                               "each backend; load_model is tested on all three")
def test_dtype_on_the_command_line(half, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert cli_main("sample", "--model", half["folder"], "--dtype", "bfloat16", "--prompt",
                    PROMPT, "--num", "1", "--steps", "2", "--out", out) == 0
    assert out.is_file()
    converted = tmp_path / "half.keras"
    assert cli_main("convert", "--model", half["folder"], "--dtype", "float16", "--out",
                    converted) == 0
    assert set(_dtypes(kd.load_model(converted).network).values()) == {"float16"}
    capsys.readouterr()
    assert cli_main("sample", "--model", converted, "--dtype", "float16", "--num", "1",
                    "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype is for Stable Diffusion checkpoints" in err[0]
