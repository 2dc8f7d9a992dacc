"""SDXL single files in Stability's (SGM) layout: tiny random diffusers SDXL
base and refiner pipelines written with `to_original` load in diffusers' own
`from_single_file` to the same weights, `to_diffusers` reads them back
exactly, the base file loads to the model its folder loads to, and files
missing an encoder say which."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy

from keras_diffusion.checkpoint_files import read_safetensors
from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion.single_file import detect_family
from keras_diffusion.stable_diffusion.single_file import to_diffusers
from keras_diffusion.stable_diffusion.single_file import to_original
from conftest import once
from sd_pipelines import assert_same_state_dicts
from sd_pipelines import SAVED_PARTS
from sd_pipelines import build_xl_pipeline
from sd_pipelines import write_single_file

# The second encoder wider than the first: diffusers tells SDXL base's CLIP
# from its OpenCLIP by their widths.
WIDTH_2 = 48

# Key tables and files are numpy and diffusers' own loader: the same on every
# backend. The two image tests run on each.


def _build(family, root):
    """The shared tiny SDXL pipeline, its second encoder `WIDTH_2` wide,
    as a base (`StableDiffusionXLPipeline`) or a refiner
    (`StableDiffusionXLImg2ImgPipeline`: the second encoder alone, five
    time ids) with random weights everywhere, so that a weight landing in
    the wrong place cannot go unnoticed."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection

    base = build_xl_pipeline(root / "tokenizers")
    first = base.text_encoder.config
    refiner = family == "sdxl_refiner"
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(
        base.text_encoder_2.config.to_dict(), hidden_size=WIDTH_2, intermediate_size=56,
        num_attention_heads=4)))
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel.from_config(dict(
        base.unet.config, cross_attention_dim=WIDTH_2 + (0 if refiner else first.hidden_size),
        projection_class_embeddings_input_dim=time_ids * base.unet.config.addition_time_embed_dim
        + text_encoder_2.config.projection_dim))
    modules = [unet, base.vae, text_encoder_2] + ([] if refiner else [base.text_encoder])
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            module.eval()
    common = dict(unet=unet, vae=base.vae, text_encoder_2=text_encoder_2,
                  tokenizer_2=base.tokenizer_2, scheduler=base.scheduler)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None,
                                                requires_aesthetics_score=True, **common)
    return StableDiffusionXLPipeline(text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                     **common)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Each family's saved tiny pipeline: its folder, configs, state dicts,
    and its original single file as `to_original` writes it."""
    root = tmp_path_factory.mktemp("sdxl_single_file")
    made = {}
    for family in ("sdxl", "sdxl_refiner"):
        folder, file = root / family, root / f"{family}.safetensors"
        _build(family, root).save_pretrained(folder, safe_serialization=True)
        configs, parts, original = write_single_file(folder, family, file)
        made[family] = SimpleNamespace(folder=folder, file=file, configs=configs, parts=parts,
                                       original=original)
    return made


# ------------------------------------------------------------------ layouts
@once
def test_base_original_keys(pipelines):
    pipeline = pipelines["sdxl"]
    keys, parts = pipeline.original, pipeline.parts
    unet, openclip = "model.diffusion_model.", "conditioner.embedders.1.model."
    np.testing.assert_array_equal(keys[unet + "label_emb.0.2.weight"],
                                  parts["unet"]["add_embedding.linear_2.weight"])
    assert keys[unet + "label_emb.0.0.weight"].shape[1] == 6 * 8 + 32
    # Two transformer blocks at the second level, and in the middle.
    assert unet + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert unet + "middle_block.1.transformer_blocks.1.ff.net.2.bias" in keys
    assert unet + "output_blocks.1.1.transformer_blocks.1.norm3.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.bias" in keys
    fused = keys[openclip + "transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3 * WIDTH_2, WIDTH_2)
    np.testing.assert_array_equal(
        fused[WIDTH_2:2 * WIDTH_2],
        parts["text_encoder_2"]["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    # OpenCLIP applies `pooled @ text_projection`: (width, projection).
    np.testing.assert_array_equal(keys[openclip + "text_projection"],
                                  parts["text_encoder_2"]["text_projection.weight"].T)
    assert keys[openclip + "text_projection"].shape == (WIDTH_2, 32)
    # OpenCLIP fuses each layer's 6 query, key and value tensors into 2.
    assert len(keys) == sum(len(state) for state in parts.values()) - 4 * 3


@once
def test_refiner_original_keys(pipelines):
    keys = pipelines["sdxl_refiner"].original
    assert keys["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 5 * 8 + 32
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert not any(key.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer."))
                   for key in keys)


@once
def test_families_told_apart(pipelines):
    assert detect_family(pipelines["sdxl"].original) == "sdxl"
    assert detect_family(pipelines["sdxl_refiner"].original.keys()) == "sdxl_refiner"


@once
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_real_size_tables(family):
    """With the shipped SDXL base 1.0 / refiner 1.0 configs (models on
    PyTorch's meta device: no memory), the table names exactly the weights
    of diffusers' and transformers' models, and holds the original keys
    diffusers recognises each family and encoder by."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel
    from transformers import CLIPTextModelWithProjection

    folder = single_file.__file__.rsplit("/", 1)[0] + f"/configs/{family}"
    configs = {argument: json.loads(open(f"{folder}/{part}/config.json").read())
               for part, (argument, _) in SAVED_PARTS.items()
               if family == "sdxl" or part != "text_encoder"}
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet_config"]),
            "vae": AutoencoderKL.from_config(configs["vae_config"]),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_2_config"])),
        }
        if family == "sdxl":
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_config"]))
    table, _ = single_file.key_table(family, **configs)
    for part, model in models.items():
        assert {name for owner, names, _ in table.values() if owner == part for name in names} == \
            set(model.state_dict()), part
    counts = {part: sum(owner == part for owner, _, _ in table.values()) for part in models}
    # OpenCLIP ViT-bigG: 32 layers of 12 tensors (attention fused) and 5
    # around them; CLIP ViT-L: 12 layers of 16 and 4.
    assert counts["text_encoder_2"] == 32 * 12 + 5 and counts["vae"] == 248
    assert counts.get("text_encoder", 196) == 196
    assert counts["unet"] == (1680 if family == "sdxl" else 1220)
    names = (("xl_base", "clip_sdxl", "open_clip_sdxl") if family == "sdxl"
             else ("xl_refiner", "open_clip_sdxl_refiner"))
    assert all(CHECKPOINT_KEY_NAMES[name] in table for name in names)


# ----------------------------------------------- diffusers reads our files
@once
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_diffusers_from_single_file_loads_the_same_weights(pipelines, family):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionXLPipeline

    pipeline = pipelines[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionXLImg2ImgPipeline
    loaded = cls.from_single_file(str(pipeline.file), config=str(pipeline.folder),
                                  local_files_only=True)
    assert_same_state_dicts({part: {key: value.numpy() for key, value in
                                    getattr(loaded, part).state_dict().items()}
                             for part in pipeline.parts}, pipeline.parts)


@once
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_to_diffusers_reads_the_file_back_exactly(pipelines, family):
    pipeline = pipelines[family]
    assert_same_state_dicts(to_diffusers(read_safetensors(pipeline.file), **pipeline.configs),
                            pipeline.parts)


@once
def test_keys_diffusers_ignores_are_dropped(pipelines):
    pipeline = pipelines["sdxl"]
    state = dict(pipeline.original)
    state.update({
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
        "conditioner.embedders.1.model.logit_scale": np.float32(4.6),
        "denoiser.sigmas": np.ones(1000, np.float32),
    })
    assert_same_state_dicts(to_diffusers(state, **pipeline.configs), pipeline.parts)


@once
def test_nested_text_keys_accepted(pipelines):
    """transformers before 5.6 nests CLIPTextModel's keys under
    `text_model.`; the projection of CLIPTextModelWithProjection never is."""
    pipeline = pipelines["sdxl"]
    parts = dict(pipeline.parts)
    parts["text_encoder"] = {f"text_model.{key}": value
                             for key, value in parts["text_encoder"].items()}
    assert sorted(to_original(parts, family="sdxl", **pipeline.configs)) == sorted(pipeline.original)


# ------------------------------------------------------------ our model
@once
def test_the_file_loads_to_the_folders_images(pipelines):
    import keras_diffusion as kd

    pipeline = pipelines["sdxl"]
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype("float32")
    options = dict(prompts="a photo of a cat", negative_prompts="blurry", guidance_scale=5.0,
                   steps=2, sampler="ddim", noise=latents)
    expected = kd.load_model(pipeline.folder).generate(1, **options)
    images = kd.load_model(pipeline.file, config=pipeline.folder).generate(1, **options)
    assert np.all(np.isfinite(images)) and images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5)


@once
def test_the_refiner_file_loads_to_the_folders_refiner(pipelines):
    import keras_diffusion as kd

    pipeline = pipelines["sdxl_refiner"]
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype("float32")
    options = dict(prompts="a red dog", negative_prompts="blurry", guidance_scale=5.0, steps=4,
                   strength=0.5, sampler="ddim", noise=latents)
    reference = kd.load_model(pipeline.folder)
    model = kd.load_model(pipeline.file, config=pipeline.folder)
    assert model.requires_aesthetics_score and model.tokenizer.first is None
    images = model.img2img(latents, **options)
    assert np.all(np.isfinite(images)) and images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(images, reference.img2img(latents, **options), atol=1e-5)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("prefix, message", [
    ("conditioner.embedders.1.", r"the file has no second text encoder "
                                 r"\(conditioner\.embedders\.1\.model\.\*, OpenCLIP ViT-bigG\)"),
    ("conditioner.embedders.0.", r"the file has no first text encoder "
                                 r"\(conditioner\.embedders\.0\.transformer\.text_model\.\*, CLIP ViT-L\)"),
    ("first_stage_model.", r"the file has no VAE \(first_stage_model\.\*\)"),
])
@once
def test_a_missing_part_is_named(pipelines, tmp_path, prefix, message):
    import keras_diffusion as kd

    pipeline = pipelines["sdxl"]
    state = {key: value for key, value in pipeline.original.items() if not key.startswith(prefix)}
    with pytest.raises(ValueError, match=message + "; a Stable Diffusion XL \\(base\\) single file "
                                                   "holds model.diffusion_model.\\* \\(UNet\\)") as error:
        to_diffusers(state, **pipeline.configs)
    assert len(str(error.value).splitlines()) == 1
    safetensors.numpy.save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=message):
        kd.load_model(tmp_path / "partial.safetensors", config=pipeline.folder)


@once
def test_a_config_of_another_pipeline_is_refused(pipelines, tmp_path):
    """An SDXL file with the configuration of an SD 1.x / 2.x pipeline."""
    import shutil

    import keras_diffusion as kd

    folder = tmp_path / "sd"
    shutil.copytree(pipelines["sdxl"].folder, folder, ignore=shutil.ignore_patterns("*_2"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {key: value for key, value in index.items() if not key.endswith("_2")}
        | {"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"the file is a Stable Diffusion XL \(base\) checkpoint "
                                         r"\(text encoders: text_encoder, text_encoder_2\), but config "
                                         r".* describes a StableDiffusionPipeline with "
                                         r"text_encoder; pass the config folder of the same model"):
        kd.load_model(pipelines["sdxl"].file, config=folder)


@once
def test_a_missing_config_is_named(pipelines):
    configs = dict(pipelines["sdxl"].configs)
    del configs["text_2_config"]
    with pytest.raises(ValueError, match=r"the Stable Diffusion XL \(base\) layout has a "
                                         r"text_encoder_2: pass its config as text_2_config="):
        to_diffusers(pipelines["sdxl"].original, **configs)


@once
def test_shipped_tokenizers():
    from keras_diffusion.stable_diffusion import checkpoints

    first, second = checkpoints._single_file_tokenizer("sdxl", checkpoints._shipped_config("sdxl"))
    assert first.pad_token == "<|endoftext|>" and second.pad_token == "!"
    none, second = checkpoints._single_file_tokenizer(
        "sdxl_refiner", checkpoints._shipped_config("sdxl_refiner"))
    assert none is None and second.pad_token == "!" and second.max_length == 77
