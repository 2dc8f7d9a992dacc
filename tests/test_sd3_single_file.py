"""SD 3 / 3.5 single files in Stability's layout: tiny random diffusers SD 3,
SD 3.5 Medium- and SD 3.5 Large-style pipelines written with `to_original`
load in diffusers' own `from_single_file` to the same weights, `to_diffusers`
reads them back exactly, a file loads to the model its folder loads to (its
text encoders from the file or from the folder), the shipped configurations
name exactly the weights of the released models, and bad files say what
they lack."""

import json
import shutil
import warnings
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
from sd_pipelines import build_sd3_pipeline


# Each style's transformer options and whether it has T5.
STYLES = {"sd3": ({}, True),
          "sd35_medium": ({"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, True),
          "sd35_large": ({"qk_norm": "rms_norm"}, False)}
# Each part's config keyword and weights file in a diffusers folder.
PARTS = {"transformer": ("transformer_config", "diffusion_pytorch_model.safetensors"),
         "vae": ("vae_config", "diffusion_pytorch_model.safetensors"),
         "text_encoder": ("text_config", "model.safetensors"),
         "text_encoder_2": ("text_2_config", "model.safetensors"),
         "text_encoder_3": ("text_3_config", "model.safetensors")}
ENCODERS = ("text_encoders.",)
# CLIP-G wider than CLIP-L: diffusers tells the two apart by their widths.
WIDTH_2 = 48
FAMILY_NAMES = {"sd3": "Stable Diffusion 3 Medium", "sd35_medium": "Stable Diffusion 3.5 Medium",
                "sd35_large": "Stable Diffusion 3.5 Large"}


def _build(style, root):
    """The shared tiny SD 3 pipeline with the style's transformer, CLIP-G
    `WIDTH_2` wide, random weights everywhere (a weight landing in the
    wrong place cannot go unnoticed) but CLIP-L's projection: the
    identity, as SD 3's is (its original reads CLIP-L unprojected)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection

    options, t5 = STYLES[style]
    base = build_sd3_pipeline(root / f"{style}_tokenizers", t5=t5)
    torch.manual_seed(2)
    transformer = SD3Transformer2DModel.from_config(base.transformer.config, **options)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(
        base.text_encoder_2.config.to_dict(), hidden_size=WIDTH_2, intermediate_size=56)))
    components = dict(base.components, transformer=transformer, text_encoder_2=text_encoder_2)
    with torch.no_grad():
        for name, module in components.items():
            if isinstance(module, torch.nn.Module):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn_like(parameter) * 0.3)
                module.eval()
        base.text_encoder.text_projection.weight.copy_(torch.eye(32))
    return StableDiffusion3Pipeline(**components)


def _read(folder):
    """`(configs, parts)`: the saved folder's configs as `to_original`'s
    keywords and its state dicts by part."""
    present = [part for part in PARTS if (folder / part).is_dir()]
    configs = {PARTS[part][0]: json.loads((folder / part / "config.json").read_text())
               for part in present}
    parts = {part: safetensors.numpy.load_file(folder / part / PARTS[part][1]) for part in present}
    return configs, parts


def _save(state, path, drop=()):
    """Save `state` less the keys under any prefix of `drop`; return the path."""
    safetensors.numpy.save_file({key: value for key, value in state.items()
                                 if not key.startswith(tuple(drop))}, path)
    return path


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Each style's saved tiny pipeline: its folder, configs, state dicts,
    its original single file as `to_original` writes it, and that file
    without its text encoders."""
    root = tmp_path_factory.mktemp("sd3_single_file")
    made = {}
    for style in STYLES:
        folder = root / style
        _build(style, root).save_pretrained(folder, safe_serialization=True)
        configs, parts = _read(folder)
        original = to_original(parts, family=style, **configs)
        made[style] = SimpleNamespace(
            folder=folder, configs=configs, parts=parts, original=original,
            file=_save(original, root / f"{style}.safetensors"),
            bare=_save(original, root / f"{style}_bare.safetensors", drop=ENCODERS))
    return made


# ------------------------------------------------------------------ layouts
@once
def test_original_keys(pipelines):
    pipeline = pipelines["sd35_medium"]
    keys, parts = pipeline.original, pipeline.parts
    mmdit, transformer = "model.diffusion_model.", parts["transformer"]
    fused = keys[mmdit + "joint_blocks.1.context_block.attn.qkv.weight"]
    assert fused.shape == (3 * 32, 32)
    np.testing.assert_array_equal(fused[32:64],
                                  transformer["transformer_blocks.1.attn.add_k_proj.weight"])
    np.testing.assert_array_equal(keys[mmdit + "joint_blocks.0.x_block.attn2.qkv.bias"][64:],
                                  transformer["transformer_blocks.0.attn2.to_v.bias"])
    assert mmdit + "joint_blocks.0.x_block.attn2.ln_k.weight" in keys
    assert mmdit + "joint_blocks.1.x_block.attn2.qkv.weight" not in keys
    np.testing.assert_array_equal(keys[mmdit + "pos_embed"], transformer["pos_embed.pos_embed"])
    # The original modulations split into (shift, scale), diffusers' into
    # (scale, shift); the last block's context stream only feeds attention.
    final = keys[mmdit + "final_layer.adaLN_modulation.1.weight"]
    np.testing.assert_array_equal(final[:32], transformer["norm_out.linear.weight"][32:])
    last = keys[mmdit + "joint_blocks.1.context_block.adaLN_modulation.1.bias"]
    context = "transformer_blocks.{}.norm1_context.linear.bias"
    np.testing.assert_array_equal(last[32:], transformer[context.format(1)][:32])
    np.testing.assert_array_equal(
        keys[mmdit + "joint_blocks.0.context_block.adaLN_modulation.1.bias"],
        transformer[context.format(0)])
    assert mmdit + "joint_blocks.1.context_block.attn.proj.weight" not in keys
    assert mmdit + "joint_blocks.1.context_block.mlp.fc1.weight" not in keys
    assert "first_stage_model.quant_conv.weight" not in keys
    clip_l, clip_g = "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer."
    assert clip_l + "text_model.encoder.layers.2.mlp.fc2.bias" in keys
    assert clip_l + "text_projection.weight" not in keys
    assert keys[clip_g + "text_projection.weight"].shape == (32, WIDTH_2)
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention." \
           "relative_attention_bias.weight" in keys
    # Each attention fuses 6 tensors into 2: the image and context ones of 2
    # blocks and the dual one; CLIP-L's projection is not written.
    assert len(keys) == sum(len(state) for state in parts.values()) - 4 * (2 * 2 + 1) - 1


@once
def test_families_told_apart(pipelines):
    for style, pipeline in pipelines.items():
        assert detect_family(pipeline.original) == style
    flux = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": None,
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": None}
    with pytest.raises(ValueError, match=r"looks like a Flux checkpoint, not supported yet"):
        detect_family(flux)
    with pytest.raises(ValueError, match=r"looks like a Stable Diffusion 3 / 3.5 transformer "
                                         r"alone"):
        detect_family({"joint_blocks.0.x_block.attn.qkv.weight": None})


@once
@pytest.mark.parametrize("family, parameters", [("sd3", 2_028_328_000),
                                                ("sd35_medium", 2_243_171_520),
                                                ("sd35_large", 8_056_627_520)])
def test_real_size_tables(family, parameters):
    """With each shipped configuration (models on PyTorch's meta device: no
    memory), the table names exactly the weights of diffusers' and
    transformers' models (the released transformers' parameter counts),
    holds the keys diffusers tells the release by, and its keys alone tell
    the family."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection
    from transformers import T5Config
    from transformers import T5EncoderModel

    folder = single_file.__file__.rsplit("/", 1)[0] + f"/configs/{family}"
    configs = {part: json.loads(open(f"{folder}/{part}/config.json").read()) for part in PARTS}
    with torch.device("meta"):
        models = {
            "transformer": SD3Transformer2DModel.from_config(configs["transformer"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**configs["text_encoder_2"])),
            "text_encoder_3": T5EncoderModel(T5Config(**configs["text_encoder_3"])),
        }
    assert sum(p.numel() for p in models["transformer"].parameters()) == parameters
    table, _ = single_file.key_table(family, **{PARTS[part][0]: configs[part] for part in PARTS})
    identities = {"text_encoder": {"text_projection.weight"}}
    tied = {"text_encoder_3": {"encoder.embed_tokens.weight"}}
    for part, model in models.items():
        names = {name for owner, names, _ in table.values() if owner == part for name in names}
        expected = set(model.state_dict()) - tied.get(part, set())
        assert names | identities.get(part, set()) == expected, part
    assert detect_family(table) == family
    told = CHECKPOINT_KEY_NAMES["sd35_large" if family == "sd35_large" else "sd3"][1]
    assert all(key in table for key in (told, CHECKPOINT_KEY_NAMES["clip_sd3"],
                                        CHECKPOINT_KEY_NAMES["open_clip_sd3"]))


# ----------------------------------------------- diffusers reads our files
@once
@pytest.mark.parametrize("style", list(STYLES))
def test_diffusers_from_single_file_loads_the_same_weights(pipelines, style):
    """The pipeline (each encoder from the file) and the transformer alone.
    diffusers leaves T5's tied `encoder.embed_tokens` unloaded on its meta
    device (the file holds the embedding once, as `shared`)."""
    from diffusers import SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    pipeline = pipelines[style]
    without_t5 = {} if STYLES[style][1] else {"text_encoder_3": None, "tokenizer_3": None}
    loaded = StableDiffusion3Pipeline.from_single_file(
        str(pipeline.file), config=str(pipeline.folder), local_files_only=True, **without_t5)
    assert_same_state_dicts({part: {key: value.numpy() for key, value in
                                    getattr(loaded, part).state_dict().items()
                                    if value.device.type != "meta"}
                             for part in pipeline.parts}, pipeline.parts)
    transformer = SD3Transformer2DModel.from_single_file(
        str(pipeline.bare), config=str(pipeline.folder), subfolder="transformer",
        local_files_only=True)
    assert_same_state_dicts({"transformer": {key: value.numpy() for key, value
                                             in transformer.state_dict().items()}},
                            {"transformer": pipeline.parts["transformer"]})


@once
@pytest.mark.parametrize("style", list(STYLES))
def test_to_diffusers_reads_the_file_back_exactly(pipelines, style):
    pipeline = pipelines[style]
    assert_same_state_dicts(to_diffusers(read_safetensors(pipeline.file), **pipeline.configs),
                            pipeline.parts)
    bare = to_diffusers(read_safetensors(pipeline.bare), **pipeline.configs)
    assert_same_state_dicts(bare, {part: pipeline.parts[part] for part in ("transformer", "vae")})


@once
def test_keys_diffusers_ignores_are_dropped(pipelines):
    pipeline = pipelines["sd3"]
    state = dict(pipeline.original)
    prefix = "text_encoders.clip_l.transformer."
    state.update({prefix + "text_model.embeddings.position_ids": np.arange(77)[None],
                  prefix + "text_projection.weight": np.ones((32, 32), np.float32),
                  "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight":
                      state["text_encoders.t5xxl.transformer.shared.weight"]})
    assert_same_state_dicts(to_diffusers(state, **pipeline.configs), pipeline.parts)


# ------------------------------------------------------------ our model
def _images(model, seed):
    latents = np.random.default_rng(seed).standard_normal((1, 8, 8, 16)).astype("float32")
    return model.generate(1, prompts="a photo of a cat", negative_prompts="blurry",
                          guidance_scale=5.0, steps=2, sampler="euler", noise=latents)


@once
@pytest.mark.parametrize("style, which", [("sd35_medium", "file"), ("sd3", "bare")])
def test_the_file_loads_to_the_folders_images(pipelines, style, which):
    """Every part from the file (T5 included), or the transformer and VAE
    from it and the text encoders from the config folder."""
    import keras_diffusion as kd

    pipeline = pipelines[style]
    expected = _images(kd.load_model(pipeline.folder), seed=0)
    model = kd.load_model(getattr(pipeline, which), config=pipeline.folder)
    assert model.text_encoder.third is not None
    images = _images(model, seed=0)
    assert np.all(np.isfinite(images)) and images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5)


@once
def test_without_t5_anywhere_the_model_runs_without_it(pipelines, tmp_path):
    """A file with the CLIP encoders and a folder without T5 weights: one
    warning where the folder describes a T5, none where it has none."""
    import keras_diffusion as kd

    pipeline = pipelines["sd35_large"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = kd.load_model(pipeline.file, config=pipeline.folder)
    assert model.text_encoder.third is None
    np.testing.assert_allclose(_images(model, seed=1),
                               _images(kd.load_model(pipeline.folder), seed=1), atol=1e-5)
    folder = tmp_path / "with_t5"
    shutil.copytree(pipelines["sd3"].folder, folder)
    (folder / "text_encoder_3" / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"the file has no T5 \(text_encoders\.t5xxl\.transformer"
                                         r"\.\*\) and config .* no weights for it \(text_encoder_3/"
                                         r"\): the model runs without T5"):
        model = kd.load_model(_save(pipelines["sd3"].original, tmp_path / "clips.safetensors",
                                    drop=("text_encoders.t5xxl.",)), config=folder)
    assert model.text_encoder.third is None


# ----------------------------------------------------------------- errors
@once
@pytest.mark.parametrize("prefix, message", [
    ("model.diffusion_model.", r"the file has no transformer \(model\.diffusion_model\.\*, MMDiT\)"),
    ("first_stage_model.", r"the file has no VAE \(first_stage_model\.\*\)"),
])
def test_a_missing_part_is_named(pipelines, tmp_path, prefix, message):
    import keras_diffusion as kd

    pipeline = pipelines["sd3"]
    path = _save(pipeline.original, tmp_path / "partial.safetensors", drop=(prefix,))
    state = read_safetensors(path)
    with pytest.raises(ValueError, match=message + "; a Stable Diffusion 3 Medium single file holds "
                       r"model\.diffusion_model\.\* \(transformer\), first_stage_model\.\* \(VAE\) "
                       r"and optionally text_encoders\.clip_l\.transformer\.\* \(first text "
                       r"encoder, CLIP ViT-L\)") as error:
        to_diffusers(state, **pipeline.configs)
    assert len(str(error.value).splitlines()) == 1
    for config in (pipeline.folder, None):
        with pytest.raises(ValueError, match=message):
            kd.load_model(path, config=config)


@once
@pytest.mark.parametrize("drop, message", [
    ("text_encoder", r"the file has no first text encoder \(text_encoders\.clip_l\.transformer\.\*, "
                     r"CLIP ViT-L\) and config .* no weights for it \(text_encoder/\): pass "
                     r"config=<a diffusers SD 3 folder holding the text encoders' weights>\.$"),
    ("text_encoder_2", r"the file has no second text encoder \(text_encoders\.clip_g\.transformer"
                       r"\.\*, OpenCLIP ViT-bigG\) and config .* no weights for it"),
])
def test_a_missing_encoder_is_named(pipelines, tmp_path, drop, message):
    """An encoder in neither the file nor the config folder (the shipped
    configuration holds no weights)."""
    import keras_diffusion as kd

    folder = tmp_path / "folder"
    shutil.copytree(pipelines["sd3"].folder, folder)
    (folder / drop / "model.safetensors").unlink()
    # The shipped configuration lacks both: the first is named.
    for config in (folder, None) if drop == "text_encoder" else (folder,):
        with pytest.raises(ValueError, match=message) as error:
            kd.load_model(pipelines["sd3"].bare, config=config)
        assert len(str(error.value).splitlines()) == 1


@once
def test_t5_weights_without_its_tokenizer_are_refused(pipelines):
    """T5's tokenizer does not ship: a file with T5 and the shipped
    configuration names the folder to pass."""
    import keras_diffusion as kd

    with pytest.raises(ValueError, match=r"the model has T5 weights but config .*sd35_medium no T5 "
                                         r"tokenizer \(tokenizer_3/\), which does not ship with "
                                         r"keras_diffusion: pass config=<a diffusers SD 3 folder "
                                         r"with tokenizer_3/>"):
        kd.load_model(pipelines["sd35_medium"].file)


@once
def test_a_config_of_another_pipeline_is_refused(pipelines, tmp_path):
    import keras_diffusion as kd

    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match=r"the file is a Stable Diffusion 3.5 Large checkpoint, but "
                                         r"config .* describes a StableDiffusionXLPipeline; pass the "
                                         r"config folder of an SD 3 model, or none for the shipped "
                                         r"sd35_large configuration\."):
        kd.load_model(pipelines["sd35_large"].file, config=folder)


@once
def test_a_projected_clip_l_cannot_be_written(pipelines):
    pipeline = pipelines["sd3"]
    encoder = dict(pipeline.parts["text_encoder"])
    encoder["text_projection.weight"] = encoder["text_projection.weight"] * 2
    with pytest.raises(ValueError, match=r"the text_encoder's text_projection.weight is not the "
                                         r"identity, but the Stable Diffusion 3 Medium layout has no "
                                         r"such weight"):
        to_original(dict(pipeline.parts, text_encoder=encoder), family="sd3", **pipeline.configs)


@once
def test_the_shipped_configurations():
    """SD 3 Medium, SD 3.5 Medium and Large: the same pipeline, VAE, text
    encoders and schedule (a flow shifted by 3), their transformers apart."""
    from keras_diffusion.stable_diffusion import checkpoints
    from keras_diffusion.stable_diffusion.sd3 import schedule_from_config

    folders = {family: checkpoints._shipped_config(family) for family in FAMILY_NAMES}
    for family, folder in folders.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert schedule_from_config(scheduler).shift == 3.0
        for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            assert (folder / part / "config.json").read_text() == \
                (folders["sd3"] / part / "config.json").read_text()
    vae = json.loads((folders["sd3"] / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == \
        (16, 1.5305, 0.0609)
    assert not (vae["use_quant_conv"] or vae["use_post_quant_conv"])
