"""SD 3 LoRA files: written by diffusers' SD 3 save path (the transformer's
joint attention and both CLIP encoders, as `train_dreambooth_lora_sd3.py
--train_text_encoder` saves them, in peft's layout and after
`convert_state_dict_to_diffusers`), loaded to diffusers' image; a LoRA
trained with `fit` on the transformer and both encoders, which diffusers'
`load_lora_weights` reads to our image; and the files of other families
(and kohya's, which diffusers reads for no SD 3) refused in one line, the
model unchanged. The pipelines are `sd_pipelines`' tiny ones."""

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import once
from keras_diffusion.stable_diffusion import lora
from sd_pipelines import write_pipeline

PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _latents():
    return np.random.default_rng(0).standard_normal((1, 8, 8, 16)).astype("float32")


def _pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder)


def _theirs(pipeline):
    import torch

    with torch.no_grad():
        return pipeline(prompt=PROMPT, negative_prompt=NEGATIVE, height=16, width=16,
                        num_inference_steps=3, guidance_scale=5.0, output_type="np",
                        latents=torch.from_numpy(np.ascontiguousarray(
                            _latents().transpose(0, 3, 1, 2)))).images


def _ours(model):
    return model.generate(1, prompts=PROMPT, negative_prompts=NEGATIVE, guidance_scale=5.0,
                          steps=3, sampler="euler", noise=_latents())


def _with_adapters(folder, seed, targets):
    """The pipeline with peft's LoRA, random A and B, on the transformer's
    `targets` and both CLIP encoders (injected by peft, as the script's
    transformers does)."""
    import torch
    from peft import LoraConfig
    from peft import inject_adapter_in_model

    pipeline = _pipeline(folder)
    torch.manual_seed(seed)
    pipeline.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                target_modules=list(targets)))
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                           target_modules=TEXT_TARGETS), encoder)
    return pipeline


def _saved(pipeline, folder, layout):
    """What the SD 3 scripts save: peft's state dicts (`"peft"`), or those
    after `convert_state_dict_to_diffusers` (`"diffusers"`; it renames the
    image's projections only, and diffusers reads a transformer's keys in
    one layout, so that file holds those alone)."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(module):
        state = get_peft_model_state_dict(module)
        return convert_state_dict_to_diffusers(state) if layout == "diffusers" else state

    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=layers(pipeline.transformer),
        text_encoder_lora_layers=layers(pipeline.text_encoder),
        text_encoder_2_lora_layers=layers(pipeline.text_encoder_2))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny SD 3 folder; per layout, a LoRA file and diffusers' image of
    it loaded; the base image."""
    root = tmp_path_factory.mktemp("sd3_lora")
    folder = root / "pipeline"
    write_pipeline(folder, "sd3")
    files, images = {}, {"base": _theirs(_pipeline(folder))}
    if BACKEND == "torch":
        for seed, (layout, targets) in enumerate((("peft", lora.SD3_TARGETS),
                                                  ("diffusers", lora.SD3_IMAGE_TARGETS))):
            trained = _with_adapters(folder, seed, targets)
            direct = _theirs(trained)
            files[layout] = _saved(trained, root / layout, layout)
            pipeline = _pipeline(folder)
            pipeline.load_lora_weights(files[layout])
            images[layout] = _theirs(pipeline)
            np.testing.assert_allclose(images[layout], direct, atol=1e-5)  # diffusers reads it
    return {"root": root, "folder": folder, "files": files, "images": images}


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        return list(file.keys())


@once
@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_a_lora_written_by_diffusers_loads_to_its_image(made, layout):
    keys = _keys(made["files"][layout])
    if layout == "peft":
        assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    else:
        assert "transformer.transformer_blocks.0.attn.to_k.lora.down.weight" in keys
        assert "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer." \
               "down.weight" in keys
    assert any(key.startswith("text_encoder_2.") for key in keys)
    model = kd.load_model(made["folder"])
    model.load_lora_weights(made["files"][layout])
    image = _ours(model)
    np.testing.assert_allclose(image, made["images"][layout], atol=2e-3)
    assert np.abs(image - made["images"]["base"]).max() > 0.02  # the LoRA matters
    assert {part for part, _ in lora.state_of(model).layers} == \
        {"transformer", "text_encoder", "text_encoder_2"}


def _values(parts):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for part in parts for v in part.variables}


def test_a_lora_trained_with_fit_loads_into_diffusers(made):
    model = kd.load_model(made["folder"])
    encoders = model.text_encoder
    before = _values([model.network, encoders, model.autoencoder])
    model.enable_lora(rank=4, alpha=8, text_encoder=True, seed=0)
    for part in (model.network, encoders.first, encoders.second):
        names = {v.path.rsplit("/", 1)[-1] for v in part.trainable_variables}
        assert names == {"lora_kernel_a", "lora_kernel_b"}, part.name
    assert not encoders.third.trainable_variables  # T5 stays frozen, as in the script
    # 8 projections in each of 2 blocks, the last without to_add_out; 4 in each of 3
    # layers of 2 encoders.
    assert len(lora.state_of(model).layers) == 8 * 2 - 1 + 4 * 3 * 2
    model.compile(optimizer=keras.optimizers.AdamW(2e-2))
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    model.fit(images, [PROMPT, "a red dog"], batch_size=2, epochs=2, verbose=0)
    after = _values([model.network, encoders, model.autoencoder])
    for path, value in before.items():  # every base weight, bit for bit
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    for part in (model.network, encoders.first, encoders.second):  # each part's LoRA trained
        assert any(np.abs(keras.ops.convert_to_numpy(v)).max() > 0
                   for v in part.trainable_variables if "lora_kernel_b" in v.path), part.name
    image = _ours(model)
    assert np.abs(image - made["images"]["base"]).max() > 0.02
    path = model.save_lora_weights(made["root"] / f"ours_{BACKEND}")
    assert any(key.startswith("transformer.transformer_blocks.") for key in _keys(path))
    pipeline = _pipeline(made["folder"])
    pipeline.load_lora_weights(path.parent)
    np.testing.assert_allclose(_theirs(pipeline), image, atol=2e-3)


@once
def test_the_image_targets_alone_and_a_target_of_nothing(made):
    model = kd.load_model(made["folder"])
    model.enable_lora(rank=2, targets=lora.SD3_IMAGE_TARGETS)
    paths = {path for _, path in lora.state_of(model).layers}
    assert paths == {f"transformer_blocks.{block}.attn.{name}" for block in (0, 1)
                     for name in ("to_q", "to_k", "to_v", "to_out.0")}
    with pytest.raises(ValueError, match="target 'attn.to_qq' names no layer of the "
                                         "transformer"):
        kd.load_model(made["folder"]).enable_lora(targets=["attn.to_qq"])


# ------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Tiny SD 1 and SDXL folders, and a LoRA of each (its UNet and text
    encoders), in diffusers' peft layout and in kohya's."""
    root = tmp_path_factory.mktemp("other_families")
    made = {}
    for style, family in (("sd1", "SD 1.x / 2.x"), ("sdxl", "SDXL")):
        write_pipeline(root / style, style)
        model = kd.load_model(root / style)
        model.enable_lora(rank=2, text_encoder=True, seed=0)
        made[family] = {"folder": root / style, "files": {
            format: model.save_lora_weights(root / f"{style}_{format}.safetensors", format=format)
            for format in ("peft", "kohya")}}
    return made


@once
@pytest.mark.parametrize("family", ["SD 1.x / 2.x", "SDXL"])
def test_an_sd3_lora_on_another_family_is_one_error(made, others, family):
    model = kd.load_model(others[family]["folder"])
    before = _values([model.network, model.text_encoder])
    with pytest.raises(ValueError) as error:
        model.load_lora_weights(made["files"]["peft"])
    message = str(error.value)
    assert "\n" not in message
    assert f"does not fit this {family} model" in message
    assert "look like a LoRA for SD 3 (add_q_proj)" in message
    assert not model.get_list_adapters()
    after = _values([model.network, model.text_encoder])
    assert all(np.array_equal(after[path], value) for path, value in before.items())


@once
@pytest.mark.parametrize("family, format", [("SD 1.x / 2.x", "peft"), ("SD 1.x / 2.x", "kohya"),
                                            ("SDXL", "peft"), ("SDXL", "kohya")])
def test_another_familys_lora_on_sd3_is_one_error(made, others, family, format):
    model = kd.load_model(made["folder"])
    before = _values([model.network, model.text_encoder])
    with pytest.raises(ValueError) as error:
        model.load_lora_weights(others[family]["files"][format])
    message = str(error.value)
    assert "\n" not in message
    assert "does not fit this SD 3 model" in message
    assert f"look like a LoRA for {family}" in message
    assert not model.get_list_adapters()
    after = _values([model.network, model.text_encoder])
    assert all(np.array_equal(after[path], value) for path, value in before.items())


@once
def test_kohya_is_no_layout_of_sd3(made, tmp_path):
    """kohya's sd-scripts names SD 3's MMDiT by its original modules
    (`lora_unet_joint_blocks_...`); diffusers reads none for SD 3."""
    from safetensors.numpy import save_file

    model = kd.load_model(made["folder"])
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    path = tmp_path / "kohya.safetensors"
    save_file({f"{key}.lora_down.weight": np.zeros((2, 32), "float32"),
               f"{key}.lora_up.weight": np.zeros((96, 2), "float32"),
               f"{key}.alpha": np.asarray(2.0, "float32")}, str(path))
    with pytest.raises(ValueError, match="Its keys are kohya's, a layout neither diffusers nor "
                                         "keras_diffusion reads for SD 3 models") as error:
        model.load_lora_weights(path)
    assert "\n" not in str(error.value) and not model.get_list_adapters()
    model.enable_lora(rank=2)
    with pytest.raises(ValueError, match="kohya's layout has no SD 3 LoRAs .* save with "
                                         "format='peft'"):
        model.save_lora_weights(tmp_path / "out", format="kohya")
    assert not (tmp_path / "out").exists()
