"""LoRA on Stable Diffusion, both ways: LoRAs made by peft / diffusers (and
the same weights under kohya's keys) load into our model and give
diffusers' image; a LoRA trained here with `fit` loads into diffusers and
gives ours. The pipelines are the tiny random ones of `sd_pipelines`.
"""

import json

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import once
from keras_diffusion.stable_diffusion.lora import module_layers
from sd_pipelines import write_pipeline

PROMPT = "a photo of a cat"
STEPS = 3
GUIDANCE = 7.5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype("float32")


def _diffusers_image(pipeline, latents, **kwargs):
    """diffusers' DDIM image (NHWC in [0, 1]) from NHWC `latents`."""
    import torch
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        images = pipeline(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                          height=16, width=16, output_type="np", **kwargs).images
    return np.asarray(images, "float32")


def _ours(model, latents):
    return model.generate(1, prompts=PROMPT, steps=STEPS, guidance_scale=GUIDANCE, noise=latents)


def _fresh_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def _kohya_file(peft_file, path, unet_alpha, text_alpha):
    """The peft file's weights under kohya's keys (`lora_unet_` / `lora_te_`,
    module paths with `_`, `lora_down` / `lora_up`, `.alpha`)."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    kohya = {}
    for key, value in load_file(peft_file).items():
        part, rest = key.split(".", 1)
        module, matrix = rest.rsplit(".lora_", 1)
        if part == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + module.replace(".", "_")
        kohya[f"{name}.lora_{ {'A.weight': 'down', 'B.weight': 'up'}[matrix] }.weight"] = value
        alpha = unet_alpha if part == "unet" else text_alpha
        kohya[f"{name}.alpha"] = np.asarray(alpha, "float32")
    save_file(kohya, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny SD-1 folder, a peft LoRA of its UNet (attention and the 1x1
    convolution proj_in; rank 4, alpha 8) and text encoder (rank 2, alpha
    6), random A and B, saved with diffusers' `save_lora_weights` and its
    adapter metadata (how diffusers keeps an alpha other than the rank),
    the same LoRA with kohya keys, and diffusers' images."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    folder = root / "pipeline"
    write_pipeline(folder, "sd1")
    pipeline = _fresh_pipeline(folder)
    torch.manual_seed(1)
    pipeline.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                                         init_lora_weights=False))
    # transformers' own add_adapter asks for a newer peft: peft injects it.
    text_config = LoraConfig(r=2, lora_alpha=6, target_modules=TEXT_TARGETS,
                             init_lora_weights=False)
    inject_adapter_in_model(text_config, pipeline.text_encoder)
    text_lora = {key.replace(".default", ""): value
                 for key, value in pipeline.text_encoder.state_dict().items() if ".lora_" in key}
    StableDiffusionPipeline.save_lora_weights(
        root / "peft", unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
        text_encoder_lora_layers=text_lora,
        unet_lora_adapter_metadata=pipeline.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    peft_file = root / "peft" / "pytorch_lora_weights.safetensors"
    kohya_file = _kohya_file(peft_file, root / "kohya.safetensors", unet_alpha=8, text_alpha=6)
    latents = _latents()
    loaded = _fresh_pipeline(folder)
    loaded.load_lora_weights(root / "peft")
    expected = _diffusers_image(loaded, latents)
    # The pipeline scales the UNet's and the text encoder's LoRA layers by it.
    half = _diffusers_image(loaded, latents, cross_attention_kwargs={"scale": 0.5})
    return {"folder": folder, "root": root, "peft": root / "peft", "kohya": kohya_file,
            "latents": latents, "expected": expected, "half": half,
            "direct": _diffusers_image(pipeline, latents),
            "base": _diffusers_image(_fresh_pipeline(folder), latents)}


@pytest.fixture(scope="module")
def loaded(setup):
    """Our model with the peft LoRA loaded, and its image."""
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["peft"])
    return model, _ours(model, setup["latents"])


def test_a_peft_lora_loads_to_diffusers_image(setup, loaded):
    # The metadata carried the alphas: diffusers' loaded pipeline is the one
    # the adapters were added to.
    np.testing.assert_allclose(setup["expected"], setup["direct"], atol=1e-5)
    _, image = loaded
    np.testing.assert_allclose(image, setup["expected"], atol=2e-3)
    assert np.abs(image - setup["base"]).max() > 0.05  # the LoRA matters


@once
def test_the_same_lora_with_kohya_keys_gives_the_same_image(setup, loaded):
    # diffusers reads the test's kohya file to the same image: the file is right.
    pipeline = _fresh_pipeline(setup["folder"])
    pipeline.load_lora_weights(setup["kohya"])
    np.testing.assert_allclose(_diffusers_image(pipeline, setup["latents"]), setup["expected"],
                               atol=1e-5)
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["kohya"])
    np.testing.assert_allclose(_ours(model, setup["latents"]), setup["expected"], atol=2e-3)


@once
def test_scale_at_load_matches_diffusers_lora_scale(setup):
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["peft"] / "pytorch_lora_weights.safetensors", scale=0.5)
    image = _ours(model, setup["latents"])
    np.testing.assert_allclose(image, setup["half"], atol=2e-3)
    assert np.abs(image - setup["expected"]).max() > 0.02


@once
def test_only_lora_matrices_are_trainable_after_loading(loaded):
    model, _ = loaded
    names = {v.path.rsplit("/", 1)[-1] for v in model.trainable_variables}
    assert names == {"lora_kernel_a", "lora_kernel_b"}
    # 4 attention projections in each of 4 transformers' 2 attentions (proj_in,
    # a convolution, is added to its kernel), and 4 in each of 3 text layers.
    assert len(model.trainable_variables) == 2 * (4 * 2 * 4 + 4 * 3)


@once
def test_fuse_and_unfuse(setup, loaded):
    model, image = loaded
    kernel = module_layers(model.network)["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    before = keras.ops.convert_to_numpy(kernel._kernel).copy()
    model.fuse_lora()
    assert not np.array_equal(keras.ops.convert_to_numpy(kernel._kernel), before)
    np.testing.assert_allclose(_ours(model, setup["latents"]), image, atol=1e-4)
    with pytest.raises(ValueError, match=r"the LoRA is fused already; unfuse_lora\(\) first"):
        model.fuse_lora()
    model.unfuse_lora()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel._kernel), before, atol=1e-6)
    assert kernel.lora_alpha == 8  # the LoRA is added in the forward pass again
    with pytest.raises(ValueError, match="no LoRA is fused into the model's weights"):
        model.unfuse_lora()


def _values(parts):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for part in parts for v in part.variables}


def test_a_lora_trained_with_fit_loads_into_diffusers(setup):
    model = kd.load_model(setup["folder"])
    before = _values([model.network, model.text_encoder, model.autoencoder])
    model.enable_lora(rank=4, alpha=8, text_encoder=True, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    model.fit(images, ["a photo of a cat", "a red dog"], batch_size=2, epochs=2, verbose=0)
    after = _values([model.network, model.text_encoder, model.autoencoder])
    for path, value in before.items():  # every base weight, biases too, bit for bit
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    image = _ours(model, setup["latents"])
    assert np.abs(image - setup["base"]).max() > 0.02  # the LoRA trained
    trained = [keras.ops.convert_to_numpy(v) for part in (model.network, model.text_encoder)
               for v in part.trainable_variables if "lora_kernel_b" in v.path]
    assert len(trained) == 4 * 2 * 4 + 4 * 3 and all(np.abs(b).max() > 0 for b in trained)
    for format in ("peft", "kohya"):
        path = model.save_lora_weights(setup["root"] / f"ours_{format}", format=format)
        assert path.name == "pytorch_lora_weights.safetensors"
        pipeline = _fresh_pipeline(setup["folder"])
        pipeline.load_lora_weights(path.parent)
        np.testing.assert_allclose(_diffusers_image(pipeline, setup["latents"]), image,
                                   atol=2e-3, err_msg=format)


@once
def test_the_saved_file_is_peft_format(setup, loaded, tmp_path):
    from safetensors import safe_open

    model, _ = loaded
    path = model.save_lora_weights(tmp_path / "one.safetensors")
    assert path == tmp_path / "one.safetensors"
    with safe_open(str(path), framework="np") as file:
        keys = list(file.keys())
        a = file.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
                            ".lora_A.weight")
        b = file.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
                            ".lora_B.weight")
    assert a.shape == (4, 32) and b.shape == (32, 4)  # (rank, in), (out, rank)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------- bad input
def _write(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, "float32") for k, v in tensors.items()}, str(path))
    return path


@once
def test_enable_lora_twice_is_one_error(setup):
    model = kd.load_model(setup["folder"])
    model.enable_lora(rank=2)
    with pytest.raises(ValueError, match=r"the model already has LoRA layers \(enable_lora was "
                                         r"called\); enable_lora is called once per model"):
        model.enable_lora(rank=2)


@once
def test_enable_lora_checks_its_arguments(setup):
    model = kd.load_model(setup["folder"])
    with pytest.raises(ValueError, match="rank must be a positive integer; got 0"):
        model.enable_lora(rank=0)
    with pytest.raises(ValueError, match="target 'to_z' names no layer of the unet"):
        model.enable_lora(targets=("to_q", "to_z"))
    with pytest.raises(ValueError, match="target 'proj_in' names convolutions of the unet"):
        model.enable_lora(targets=("proj_in",))
    with pytest.raises(ValueError, match="targets must be a non-empty list of module-path"):
        model.enable_lora(targets="to_q")
    assert not any(getattr(layer, "lora_enabled", False)
                   for layer in module_layers(model.network).values())


@once
def test_a_lora_for_another_architecture_is_one_error(setup, tmp_path):
    model = kd.load_model(setup["folder"])
    sdxl = _write(tmp_path / "sdxl.safetensors", {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            np.zeros((4, 64)),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight":
            np.zeros((4, 640)),
    })
    with pytest.raises(ValueError, match=r"the LoRA does not fit this SD 1.x / 2.x model: "
                                         r"lora_te2_text_model_.*lora_down.weight \(a key of "
                                         r"SDXL LoRAs\); lora_unet_input_blocks.*lora_down."
                                         r"weight \(a key of SDXL LoRAs\)"
                                         r"\. Its keys look like a LoRA for SDXL \(lora_te2_\)"):
        model.load_lora_weights(sdxl)
    unknown = _write(tmp_path / "unknown.safetensors", {
        "unet.down_blocks.3.attentions.0.proj_in.lora_A.weight": np.zeros((4, 32))})
    with pytest.raises(ValueError, match=r"unet.down_blocks.3.attentions.0.proj_in.lora_A.weight "
                                         r"\(names no module of the unet\)"):
        model.load_lora_weights(unknown)
    wrong = _write(tmp_path / "wrong.safetensors", {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
            np.zeros((4, 320)),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight":
            np.zeros((320, 4)),
    })
    with pytest.raises(ValueError, match=r"unet mid_block.attentions.0.transformer_blocks.0.attn1"
                                         r".to_q \(shapes \(4, 320\) and \(320, 4\) do not fit "
                                         r"its "
                                         r"weight of shape \(32, 32\)\)"):
        model.load_lora_weights(wrong)
    assert not any("lora" in v.path for v in model.network.variables)  # nothing changed


@once
def test_other_bad_lora_files(setup, tmp_path):
    model = kd.load_model(setup["folder"])
    with pytest.raises(FileNotFoundError, match="no LoRA file at"):
        model.load_lora_weights(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no .safetensors files"):
        model.load_lora_weights(tmp_path)
    dora = _write(tmp_path / "dora.safetensors", {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale":
            np.ones((1, 32))})
    with pytest.raises(ValueError, match=r"the file is a DoRA \(weight-decomposed LoRA\) adapter "
                                         r"\(dora_scale in lora_unet_mid_block"):
        model.load_lora_weights(dora)
    half = _write(tmp_path / "half.safetensors", {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
            np.zeros((4, 32))})
    with pytest.raises(ValueError, match="its up matrix is missing"):
        model.load_lora_weights(half)
    with pytest.raises(ValueError, match="scale must be a finite number; got 'strong'"):
        model.load_lora_weights(setup["peft"], scale="strong")
    with pytest.raises(ValueError, match="the model has no LoRA to save"):
        model.save_lora_weights(tmp_path / "none")
    with pytest.raises(ValueError, match="the model has no LoRA layers to fuse"):
        model.fuse_lora()


@once
def test_a_lora_of_another_rank_does_not_fit_enabled_layers(setup):
    model = kd.load_model(setup["folder"])
    model.enable_lora(rank=2)
    with pytest.raises(ValueError, match=r"the LoRA does not fit the model's LoRA layers "
                                         r".*rank 4, the layer's 2"):
        model.load_lora_weights(setup["peft"])


@once
def test_peft_metadata_alpha_patterns(setup, tmp_path):
    """An alpha_pattern entry gives its modules their own alpha; without
    metadata or alpha keys, alpha is the rank (diffusers' reading)."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    tensors = load_file(setup["peft"] / "pytorch_lora_weights.safetensors")
    tensors = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_v": 2}}
    save_file(tensors, str(tmp_path / "pattern.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps(metadata)})
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(tmp_path / "pattern.safetensors")
    layers = {path: layer for path, layer in module_layers(model.network).items()
              if getattr(layer, "lora_enabled", False)}
    alphas = {path.rsplit(".", 2)[-2] + "." + path.rsplit(".", 1)[-1]: layer.lora_alpha
              for path, layer in layers.items()}
    assert alphas["attn2.to_v"] == 2 and alphas["attn2.to_k"] == 8
    plain = kd.load_model(setup["folder"])
    plain.load_lora_weights(tmp_path / "plain.safetensors")
    assert {layer.lora_alpha for layer in module_layers(plain.network).values()
            if getattr(layer, "lora_enabled", False)} == {4.0}
