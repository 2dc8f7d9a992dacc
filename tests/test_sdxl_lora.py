"""SDXL LoRA files: written by diffusers' SDXL save path (the UNet and both
text encoders, as `train_dreambooth_lora_sdxl.py` saves them) and with
kohya's SDXL keys (`lora_te1_`, `lora_te2_`, the UNet's original SGM module
names, resnets' convolutions included), loaded to diffusers' image; a LoRA
trained with `fit` on the UNet and both encoders, saved in both formats,
loaded by diffusers to our image; and LoRAs of the other family refused in
one line, the model unchanged. The pipelines are `sd_pipelines`' tiny ones.
"""

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import once
from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion.layers import keras_name
from sd_pipelines import reference_images
from sd_pipelines import write_pipeline

PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' SDXL LoRA scripts
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# kohya's LoCon besides: resnets' convolutions, their time projections, the added embedding.
KOHYA_UNET = UNET_TARGETS + ["conv1", "conv2", "time_emb_proj", "proj_in",
                             "add_embedding.linear_1"]


def _latents():
    return np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype("float32")


def _pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def _theirs(pipeline):
    return reference_images(pipeline, _latents(), prompts=[PROMPT], negative_prompts=[NEGATIVE],
                            steps=3, guidance_scale=5.0)


def _ours(model):
    return model.generate(1, prompts=PROMPT, negative_prompts=NEGATIVE, guidance_scale=5.0,
                          steps=3, sampler="ddim", noise=_latents())


def _with_adapters(folder, seed, unet_targets, rank):
    """The pipeline with peft's LoRA, random A and B, on its UNet and both
    text encoders (peft injects the encoders' as the scripts' transformers does)."""
    import torch
    from peft import LoraConfig
    from peft import inject_adapter_in_model

    pipeline = _pipeline(folder)
    torch.manual_seed(seed)
    pipeline.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=unet_targets,
                                         init_lora_weights=False))
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS,
                                           init_lora_weights=False), encoder)
    return pipeline


def _lora_layers(module):
    """`{module path: (A, B)}` of a module's peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return {name: (layer.lora_A["default"].weight.detach().numpy().copy(),
                   layer.lora_B["default"].weight.detach().numpy().copy())
            for name, layer in module.named_modules()
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A}


def _script_file(pipeline, folder):
    """What diffusers' `train_dreambooth_lora_sdxl.py` saves."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def text(encoder):
        return convert_state_dict_to_diffusers(
            {key.replace(".default", ""): value for key, value in encoder.state_dict().items()
             if ".lora_" in key})

    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipeline.unet)),
        text_encoder_lora_layers=text(pipeline.text_encoder),
        text_encoder_2_lora_layers=text(pipeline.text_encoder_2))
    return folder / "pytorch_lora_weights.safetensors"


def _kohya_file(pipeline, path):
    """The pipeline's LoRAs as kohya's sd-scripts names SDXL's: the UNet's
    modules by their SGM names, `lora_te1_` / `lora_te2_`, alpha = rank."""
    from safetensors.numpy import save_file

    original = single_file.unet_module_names(pipeline.unet.config)
    parts = (("lora_unet_", pipeline.unet, original), ("lora_te1_", pipeline.text_encoder, {}),
             ("lora_te2_", pipeline.text_encoder_2, {}))
    tensors = {}
    for prefix, module, names in parts:
        for name, (down, up) in _lora_layers(module).items():
            if prefix != "lora_unet_" and not name.startswith("text_model."):
                name = "text_model." + name
            key = prefix + keras_name(names.get(name, name))
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.asarray(down.shape[0], "float32")})
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny SDXL folder, a LoRA of each layout with diffusers' image of
    the adapters it came from and of the file loaded, and the base image."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    folder = root / "pipeline"
    write_pipeline(folder, "sdxl")
    files, direct, images = {}, {}, {}
    for layout, seed, targets, write in (("script", 1, UNET_TARGETS, _script_file),
                                         ("kohya", 2, KOHYA_UNET, _kohya_file)):
        trained = _with_adapters(folder, seed, targets, rank=4)
        direct[layout] = _theirs(trained)
        files[layout] = write(trained, root / (layout if layout == "script"
                                               else "kohya.safetensors"))
        pipeline = _pipeline(folder)
        pipeline.load_lora_weights(files[layout])
        images[layout] = _theirs(pipeline)
    images["base"] = _theirs(_pipeline(folder))
    return {"root": root, "folder": folder, "files": files, "direct": direct, "images": images}


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        return list(file.keys())


@once
def test_the_files_are_in_the_layouts_their_tools_write(made):
    script, kohya = _keys(made["files"]["script"]), _keys(made["files"]["kohya"])
    assert any(k.startswith("text_encoder_2.") and ".lora_linear_layer.down" in k for k in script)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora.down.weight" \
        in script
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight" in kohya  # a resnet's conv1
    assert "lora_unet_label_emb_0_0.alpha" in kohya
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in kohya)
    # diffusers reads each to the image of the adapters it was written from.
    for layout in ("script", "kohya"):
        np.testing.assert_allclose(made["images"][layout], made["direct"][layout], atol=1e-5)


@once
@pytest.mark.parametrize("layout", ["script", "kohya"])
def test_each_layout_loads_to_diffusers_image(made, layout):
    model = kd.load_model(made["folder"])
    model.load_lora_weights(made["files"][layout])
    image = _ours(model)
    np.testing.assert_allclose(image, made["images"][layout], atol=2e-3)
    assert np.abs(image - made["images"]["base"]).max() > 0.02  # the LoRA matters


def _values(parts):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for part in parts for v in part.variables}


def test_a_lora_trained_with_fit_loads_into_diffusers(made):
    model = kd.load_model(made["folder"])
    encoders = (model.text_encoder.first, model.text_encoder.second)
    before = _values([model.network, *encoders, model.autoencoder])
    model.enable_lora(rank=4, alpha=8, text_encoder=True, seed=0)
    for part in (model.network, *encoders):  # the UNet's and both encoders' LoRA train
        names = {v.path.rsplit("/", 1)[-1] for v in part.trainable_variables}
        assert names == {"lora_kernel_a", "lora_kernel_b"}, part.name
    model.compile(optimizer=keras.optimizers.AdamW(2e-2))
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    model.fit(images, ["a photo of a cat", "a red dog"], batch_size=2, epochs=2, verbose=0)
    after = _values([model.network, *encoders, model.autoencoder])
    for path, value in before.items():  # every base weight, bit for bit
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    for part in (model.network, *encoders):  # each part's LoRA trained
        assert any(np.abs(keras.ops.convert_to_numpy(v)).max() > 0
                   for v in part.trainable_variables if "lora_kernel_b" in v.path), part.name
    image = _ours(model)
    assert np.abs(image - made["images"]["base"]).max() > 0.02
    for format in ("peft", "kohya"):
        path = model.save_lora_weights(made["root"] / f"ours_{format}", format=format)
        keys = _keys(path)
        if format == "kohya":
            assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
            assert any(k.startswith("lora_te1_") for k in keys)
        assert any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
        pipeline = _pipeline(made["folder"])
        pipeline.load_lora_weights(path.parent)
        np.testing.assert_allclose(_theirs(pipeline), image, atol=2e-3, err_msg=format)


# ------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1 folder and a LoRA of it (UNet and text encoder), in both formats."""
    root = tmp_path_factory.mktemp("sd1_lora")
    write_pipeline(root / "pipeline", "sd1")
    model = kd.load_model(root / "pipeline")
    model.enable_lora(rank=2, text_encoder=True, seed=0)
    return {"folder": root / "pipeline",
            "files": {format: model.save_lora_weights(root / f"{format}.safetensors",
                                                      format=format)
                      for format in ("peft", "kohya")}}


@once
@pytest.mark.parametrize("file, layout", [("SDXL", "script"), ("SDXL", "kohya"),
                                          ("SD 1.x / 2.x", "peft"), ("SD 1.x / 2.x", "kohya")])
def test_a_lora_of_the_other_family_is_one_error(made, sd1, file, layout):
    """An SDXL LoRA on an SD 1 model, and an SD 1 LoRA on an SDXL model."""
    sdxl_file = file == "SDXL"
    model = kd.load_model(sd1["folder"] if sdxl_file else made["folder"])
    lora_file = (made if sdxl_file else sd1)["files"][layout]
    before = _values([model.network, model.text_encoder])
    with pytest.raises(ValueError) as error:
        model.load_lora_weights(lora_file)
    message = str(error.value)
    assert "\n" not in message
    assert f"does not fit this {'SD 1.x / 2.x' if sdxl_file else 'SDXL'} model" in message
    assert f"look like a LoRA for {file}" in message
    assert not model.get_list_adapters()
    after = _values([model.network, model.text_encoder])
    assert all(np.array_equal(after[path], value) for path, value in before.items())
