"""The original single-file layout of Stable Diffusion 1.x / 2.x: tiny random
diffusers pipelines written in that layout with `to_original` load in
diffusers' own `from_single_file` to the same weights, and `to_diffusers`
reads them back exactly; bad files give one clear error each."""

import os
import sys

import numpy as np
import pytest
import safetensors.numpy

import ml_dtypes
from conftest import once
from keras_diffusion.stable_diffusion import single_file
from keras_diffusion.stable_diffusion import weights
from keras_diffusion.stable_diffusion.single_file import detect_family
from keras_diffusion.checkpoint_files import read_safetensors
from keras_diffusion.checkpoint_files import read_weights
from keras_diffusion.stable_diffusion.single_file import to_diffusers
from keras_diffusion.stable_diffusion.single_file import to_original
from keras_diffusion.stable_diffusion.single_file import unet_in_channels
from sd_pipelines import assert_same_state_dicts
from sd_pipelines import write_single_file
from sd_pipelines import write_tokenizer

pytestmark = once  # tables of arrays: the same on every backend

def _build(style, folder):
    """A tiny pipeline with more structure than SD's smallest test ones: three
    levels (the last two of equal width, so one down resnet has no shortcut),
    two resnets per level, attention on the first two levels; SD 2 style adds
    linear projections, per-level head dims, two transformer blocks in the
    middle levels, `gelu`."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel

    sd2 = style == "sd2"
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}_tokenizer",
                                pad_token="!" if sd2 else "<|endoftext|>")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=16, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4) if sd2 else 4, use_linear_projection=sd2,
        transformer_layers_per_block=(1, 2, 2) if sd2 else 1,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16), layers_per_block=2, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer.get_vocab()),
        hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    # Random, not zero (diffusers zero-initialises some output layers), so
    # that a weight landing in the wrong place cannot go unnoticed.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for parameter in module.parameters():
                parameter.copy_(torch.randn_like(parameter))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)


class Pipeline:
    """A saved tiny pipeline: its folder, configs, state dicts, and its
    original single file as `to_original` writes it."""

    def __init__(self, style, root):
        self.style, self.folder = style, root / style
        _build(style, self.folder)
        self.file = root / f"{style}.safetensors"
        self.configs, self.parts, self.original = write_single_file(self.folder, style, self.file)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_single_file")
    return {style: Pipeline(style, root) for style in ("sd1", "sd2")}


# ------------------------------------------------------------------ layouts
def test_sd1_original_keys(pipelines):
    keys = pipelines["sd1"].original
    # 3 levels x 2 resnets + 2 downsamples after conv_in; up: 3 levels x 3.
    assert "model.diffusion_model.input_blocks.8.0.in_layers.2.weight" in keys
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert "model.diffusion_model.input_blocks.4.0.skip_connection.weight" in keys
    assert "model.diffusion_model.input_blocks.7.0.skip_connection.weight" not in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys       # no attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in keys       # after attention
    assert "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in keys
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in keys
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in keys
    assert len(keys) == sum(len(part) for part in pipelines["sd1"].parts.values())


def test_sd2_original_keys(pipelines):
    keys, parts = pipelines["sd2"].original, pipelines["sd2"].parts
    prefix = "cond_stage_model.model."
    fused = keys[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (48, 16)
    np.testing.assert_array_equal(fused[16:32], parts["text_encoder"]["encoder.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(keys[prefix + "positional_embedding"],
                                  parts["text_encoder"]["embeddings.position_embedding.weight"])
    assert prefix + "ln_final.weight" in keys and prefix + "token_embedding.weight" in keys
    assert keys["model.diffusion_model.input_blocks.4.1.proj_in.weight"].ndim == 2  # linear
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.norm3.bias" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_real_size_tables(style):
    """At SD 1.5 / 2.1 size (models on PyTorch's meta device: no memory), the
    table names exactly the weights of diffusers' and transformers' models,
    and the original keys diffusers itself uses to recognise each family."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel

    sd2 = style == "sd2"
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(cross_attention_dim=1024 if sd2 else 768,
                                         attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
                                         use_linear_projection=sd2),
            "vae": AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4),
            "text_encoder": CLIPTextModel(CLIPTextConfig(
                num_hidden_layers=23 if sd2 else 12, hidden_size=1024 if sd2 else 768,
                intermediate_size=4096 if sd2 else 3072, num_attention_heads=16 if sd2 else 12)),
        }
    table, _ = single_file.key_table(
        style, unet_config=dict(models["unet"].config), vae_config=dict(models["vae"].config),
        text_config=models["text_encoder"].config.to_dict())
    for part, model in models.items():
        assert {name for owner, names, _ in table.values() if owner == part for name in names} == \
            set(model.state_dict()), part
    assert sum(owner == "unet" for owner, _, _ in table.values()) == 686
    assert sum(owner == "vae" for owner, _, _ in table.values()) == 248
    assert sum(owner == "text_encoder" for owner, _, _ in table.values()) == (23 * 12 + 4 if sd2 else 196)
    names = ("v1", "v2", "inpainting", "open_clip" if sd2 else "clip")
    assert all(CHECKPOINT_KEY_NAMES[name] in table for name in names)


def test_detect_family(pipelines):
    assert detect_family(pipelines["sd1"].original) == "sd1"
    assert detect_family(pipelines["sd2"].original.keys()) == "sd2"
    assert unet_in_channels(pipelines["sd1"].original) == 4


# ----------------------------------------------- diffusers reads our files
@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_from_single_file_loads_the_same_weights(pipelines, style):
    from diffusers import StableDiffusionPipeline

    pipeline = pipelines[style]
    loaded = StableDiffusionPipeline.from_single_file(
        str(pipeline.file), config=str(pipeline.folder), local_files_only=True)
    assert_same_state_dicts({part: {key: value.numpy() for key, value in
                                    getattr(loaded, part).state_dict().items()}
                             for part in pipeline.parts}, pipeline.parts)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_to_diffusers_reads_the_file_back_exactly(pipelines, style):
    pipeline = pipelines[style]
    assert_same_state_dicts(to_diffusers(read_safetensors(pipeline.file), **pipeline.configs),
                            pipeline.parts)


def test_dtype_kept(pipelines, tmp_path):
    pipeline = pipelines["sd1"]
    half = {key: value.astype(np.float16) for key, value in pipeline.original.items()}
    safetensors.numpy.save_file(half, tmp_path / "half.safetensors")
    parts = to_diffusers(read_safetensors(tmp_path / "half.safetensors"), **pipeline.configs)
    assert_same_state_dicts(parts, {part: {key: value.astype(np.float16) for key, value in state.items()}
                            for part, state in pipeline.parts.items()})


def test_keys_diffusers_ignores_are_dropped(pipelines):
    sd1, sd2 = dict(pipelines["sd1"].original), dict(pipelines["sd2"].original)
    unet = "model.diffusion_model."
    sd1.update({
        "model_ema.decay": np.float32(0.9999),
        "model_ema.diffusion_modelinput_blocks00weight": sd1[unet + "input_blocks.0.0.weight"],
        "alphas_cumprod": np.ones(1000, np.float32),
        "posterior_mean_coef2": np.ones(1000, np.float32),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
    })
    assert_same_state_dicts(to_diffusers(sd1, **pipelines["sd1"].configs), pipelines["sd1"].parts)
    # SD 2: the contrastive head and OpenCLIP's last layer (here the third
    # of a file whose text encoder keeps two), which diffusers drops.
    prefix = "cond_stage_model.model."
    last = {key.replace("resblocks.1.", "resblocks.2."): value for key, value in sd2.items()
            if ".resblocks.1." in key}
    sd2.update(last)
    sd2.update({prefix + "text_projection": np.ones((16, 16), np.float32),
                prefix + "logit_scale": np.float32(4.6), "betas": np.ones(1000, np.float32)})
    assert_same_state_dicts(to_diffusers(sd2, **pipelines["sd2"].configs), pipelines["sd2"].parts)
    sd2[prefix + "transformer.resblocks.3.ln_1.weight"] = np.ones(16, np.float32)
    with pytest.raises(ValueError, match=r"1 unexpected \(cond_stage_model.model.transformer.resblocks.3"):
        to_diffusers(sd2, **pipelines["sd2"].configs)


def test_to_original_accepts_nested_text_keys(pipelines):
    pipeline = pipelines["sd1"]
    parts = dict(pipeline.parts)
    parts["text_encoder"] = {f"text_model.{key}": value for key, value in parts["text_encoder"].items()}
    original = to_original(parts, family="sd1", **pipeline.configs)
    assert sorted(original) == sorted(pipeline.original)


def test_inpainting_unet(pipelines):
    pipeline = pipelines["sd1"]
    state = dict(pipeline.original)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = np.concatenate([state[key], state[key], state[key][:, :1]], axis=1)
    assert detect_family(state) == "sd1" and unet_in_channels(state) == 9
    with pytest.raises(ValueError, match=r"9 input channels \(an inpainting UNet\).*in_channels=4"):
        to_diffusers(state, **pipeline.configs)
    configs = dict(pipeline.configs, unet_config=dict(pipeline.configs["unet_config"], in_channels=9))
    assert to_diffusers(state, **configs)["unet"]["conv_in.weight"].shape == (8, 9, 3, 3)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("key, what", [
    ("conditioner.embedders.0.open_clip.model.positional_embedding", "SGM"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "LoRA"),
    ("model.diffusion_model.input_blocks.0.0.weight", "without a text encoder"),
])
def test_other_layouts_named(key, what):
    with pytest.raises(ValueError, match=f"looks like .*{what}.*supported are sd1 .*sd2") as error:
        detect_family({key: None, "model.diffusion_model.out.2.bias": None})
    assert len(str(error.value).splitlines()) == 1


def test_unknown_keys_listed():
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint.*first keys: "
                                         r"alpha.weight, beta.bias, gamma.weight\.$"):
        detect_family(["gamma.weight", "beta.bias", "alpha.weight"])


def test_missing_and_unexpected_keys_listed(pipelines):
    pipeline = pipelines["sd1"]
    state = dict(pipeline.original)
    del state["first_stage_model.decoder.up.1.upsample.conv.bias"]
    state["model.diffusion_model.input_blocks.99.0.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"1 missing \(first_stage_model.decoder.up.1.upsample.conv.bias\); "
                                         r"1 unexpected \(model.diffusion_model.input_blocks.99.0.weight\)"):
        to_diffusers(state, **pipeline.configs)
    # The wrong configuration: one resnet fewer per level.
    unet = dict(pipeline.configs["unet_config"], layers_per_block=1)
    with pytest.raises(ValueError, match=r"\d+ missing \(.*\); \d+ unexpected \("):
        to_diffusers(pipeline.original, **dict(pipeline.configs, unet_config=unet))
    parts = dict(pipeline.parts, vae={k: v for k, v in pipeline.parts["vae"].items()
                                      if k != "quant_conv.bias"})
    with pytest.raises(ValueError, match=r"diffusers vae .*1 missing \(quant_conv.bias\)"):
        to_original(parts, family="sd1", **pipeline.configs)
    with pytest.raises(ValueError, match=r"unknown single-file family 'flux'; supported: "
                                         r"\['sd1', 'sd2', 'sd3', 'sd35_large', 'sd35_medium', "
                                         r"'sdxl', 'sdxl_refiner'\]"):
        to_original(pipeline.parts, family="flux", **pipeline.configs)


@pytest.mark.parametrize("option, value", [("class_embed_type", "timestep"),
                                           ("time_cond_proj_dim", 256),
                                           ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3)])
def test_unsupported_unet_options(pipelines, option, value):
    pipeline = pipelines["sd1"]
    unet = dict(pipeline.configs["unet_config"], **{option: value})
    with pytest.raises(ValueError, match=f"UNet config.*{option}.*{value!r}".replace("[", r"\[")):
        to_diffusers(pipeline.original, **dict(pipeline.configs, unet_config=unet))


# ------------------------------------------------------------------ files
def test_truncated_file(pipelines, tmp_path):
    data = pipelines["sd1"].file.read_bytes()
    for name, cut in (("truncated", data[: len(data) // 2]), ("header", data[:12]),
                      ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(cut)
        for read in (read_safetensors, read_weights):
            with pytest.raises(ValueError, match=f"{path} is not a readable .safetensors file"):
                read(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        read_weights(tmp_path / "absent.safetensors")


def test_bfloat16_upcast(tmp_path):
    values = np.random.default_rng(0).normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
    half = np.arange(4, dtype=np.float16)
    safetensors.numpy.save_file({"w": values, "h": half}, tmp_path / "bf16.safetensors")
    state = read_safetensors(tmp_path / "bf16.safetensors")
    assert state["w"].dtype == np.float32 and state["h"].dtype == np.float16
    np.testing.assert_array_equal(state["w"], values.astype(np.float32))
    assert np.unique(state["w"].view(np.uint32) & 0xFFFF).tolist() == [0]  # bfloat16 values
    kept = read_safetensors(tmp_path / "bf16.safetensors", upcast_bfloat16=False)
    assert kept["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kept["w"].astype(np.float32), state["w"])


def test_pickle_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x02}q\x00.")  # an empty pickled dict
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    with pytest.raises(ValueError, match=f"{path} is a PyTorch pickle, which cannot be loaded "
                                         "without executing code.*convert it to .safetensors"):
        read_weights(path)


RAN = []


class _Payload:
    """Unpickling this runs code: what the weights-only loader refuses."""

    def __reduce__(self):
        return (RAN.append, ("ran",))


def test_pickle_with_torch(tmp_path):
    import torch

    weights = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)}
    torch.save({"state_dict": weights, "global_step": 7}, tmp_path / "model.ckpt")
    state = read_weights(tmp_path / "model.ckpt")
    assert sorted(state) == ["a", "b"] and state["b"].dtype == np.float32
    np.testing.assert_array_equal(state["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state["b"], [1.5, -2.25])
    assert read_weights(tmp_path / "model.ckpt", upcast_bfloat16=False)["b"].dtype == ml_dtypes.bfloat16
    # A zip-format pickle under a .safetensors name is recognised by its bytes.
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.ckpt").read_bytes())
    assert sorted(read_weights(tmp_path / "model.safetensors")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"model.safetensors is a PyTorch pickle, not a .safetensors file\.$"):
        read_safetensors(tmp_path / "model.safetensors")

    data = (tmp_path / "model.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.ckpt'} could not be read by "
                                         "PyTorch's weights-only loader"):
        read_weights(tmp_path / "cut.ckpt")

    torch.save({"state_dict": weights, "hook": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="weights-only loader .*Unsupported global.*"
                                         "convert it to .safetensors") as error:
        read_weights(tmp_path / "unsafe.pt")
    assert len(str(error.value).splitlines()) == 1
    assert RAN == []



def test_a_lazy_read_maps_each_tensor_alone(tmp_path):
    """`lazy=True` (how folders load) gives each tensor as a view of its
    own bytes: the values of a plain read, at any offset in the file
    (tensors not aligned to pages), empty tensors included, every dtype.
    The map is private: writing a value changes neither the file nor the
    next read."""
    rng = np.random.default_rng(0)
    values = {"odd": rng.normal(size=(3, 7)).astype(np.float32),
              "big": rng.normal(size=(300, 1000)).astype(np.float16),
              "bf16": rng.normal(size=(5, 9)).astype(ml_dtypes.bfloat16),
              "empty": np.zeros((0, 4), np.float32), "ints": np.arange(11, dtype=np.int64)}
    path = tmp_path / "mixed.safetensors"
    safetensors.numpy.save_file(values, path)
    lazy = read_safetensors(path, lazy=True, upcast_bfloat16=False)
    plain = read_safetensors(path, upcast_bfloat16=False)
    assert set(lazy) == set(values) and lazy.shape("big") == (300, 1000)
    for key, value in values.items():
        mapped = lazy[key]
        assert mapped.dtype == value.dtype and mapped.shape == value.shape
        np.testing.assert_array_equal(mapped, value)
        np.testing.assert_array_equal(plain[key], value)
        if value.size:
            assert mapped.flags.writeable and plain[key].flags.writeable
            mapped[...] = 0
            np.testing.assert_array_equal(lazy[key], value)
    np.testing.assert_array_equal(read_safetensors(path)["big"], values["big"])
    assert read_safetensors(path, lazy=True)["bf16"].dtype == np.float32


@once
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
@pytest.mark.parametrize("through", ["libc", "python"])
def test_mapped_tensors_hold_no_file_descriptor(tmp_path, monkeypatch, through):
    """PyTorch's weights stay views of their tensors' maps: 300 tensors
    held open no descriptor each (SDXL's 2,600 passed the usual limit of
    1,024 open files). Without the C library's `mmap`, Python's maps
    (which keep one) still read and write as private maps."""
    from keras_diffusion import checkpoint_files

    values = {f"w{i}": np.full((3, 5), i, np.float32) for i in range(300)}
    path = tmp_path / "many.safetensors"
    safetensors.numpy.save_file(values, path)
    if through == "python":
        monkeypatch.setattr(checkpoint_files, "_libc", lambda: None)
    before = len(os.listdir("/proc/self/fd"))
    lazy = read_safetensors(path, lazy=True)
    held = [lazy[key] for key in values]
    opened = len(os.listdir("/proc/self/fd")) - before
    assert opened < 10 if through == "libc" else opened >= 300
    for key, value in zip(values, held):
        np.testing.assert_array_equal(value, values[key])
        assert weights._own_map(value.T) and not weights._own_map(np.array(value))
    held[0][...] = -1
    np.testing.assert_array_equal(read_safetensors(path)["w0"], values["w0"])
    del held
