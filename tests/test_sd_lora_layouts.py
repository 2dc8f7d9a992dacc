"""LoRA files as the ecosystem writes them, each made by the tool that writes
it, load to diffusers' image with the same file: diffusers' training scripts
(`convert_state_dict_to_diffusers(get_peft_model_state_dict(...))` through
`save_lora_weights`), diffusers' older attention-processor layout, kohya's
keys with LoRAs of convolutions and the text encoder; two LoRAs at their own
weights as diffusers' `set_adapters`, and one of them removed. Files of other
kinds or other models are refused in one line, with the model unchanged.
The pipelines are the tiny random SD-1 and SD-2 ones of `sd_pipelines`.
"""

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import cli_main
from conftest import once
from keras_diffusion.stable_diffusion.lora import lora_state_dict
from sd_pipelines import write_pipeline

# Reading the layouts is the same code on every backend; the LoRA's numbers
# on each backend are test_sd_lora.py's.
pytestmark = once

PROMPT = "a photo of a cat"
STEPS = 3
GUIDANCE = 7.5
# The modules diffusers' train_dreambooth_lora.py and train_text_to_image_lora.py
# train (the UNet's added-KV projections are not in an SD 1/2 UNet).
SCRIPT_UNET = ["to_k", "to_q", "to_v", "to_out.0"]
SCRIPT_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
# LoCon: attention and resnets' convolutions (3x3 at a rank of their own),
# time embedding projections, the shortcut and the transformer's projections.
KOHYA_UNET = ["to_q", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2",
              "time_emb_proj", "conv_shortcut", "ff.net.2"]
KOHYA_TEXT = ["q_proj", "out_proj", "fc2"]


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype("float32")


def _diffusers_image(pipeline, latents):
    import torch
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        images = pipeline(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                          height=16, width=16, output_type="np").images
    return np.asarray(images, "float32")


def _ours(model, latents):
    return model.generate(1, prompts=PROMPT, steps=STEPS, guidance_scale=GUIDANCE, noise=latents)


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def _add_adapters(pipeline, unet_config, text_config):
    """peft's LoRA on the pipeline's UNet and text encoder, with random A and
    B (what training leaves), as the training scripts add it."""
    from peft import inject_adapter_in_model

    pipeline.unet.add_adapter(unet_config)
    # transformers' own add_adapter asks for a newer peft: peft injects it.
    inject_adapter_in_model(text_config, pipeline.text_encoder)


def _peft_state(module):
    """A module's LoRA as peft's `get_peft_model_state_dict` gives it."""
    from peft.utils import get_peft_model_state_dict

    if hasattr(module, "peft_config"):
        return get_peft_model_state_dict(module)
    return {key.replace(".default", ""): value for key, value in module.state_dict().items()
            if ".lora_" in key}


def _script_file(pipeline, folder):
    """What train_dreambooth_lora.py / train_text_to_image_lora.py save."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(_peft_state(pipeline.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            _peft_state(pipeline.text_encoder)))
    return folder / "pytorch_lora_weights.safetensors"


def _peft_file(pipeline, folder):
    """What diffusers' `save_lora_weights` writes from peft's state dicts."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=_peft_state(pipeline.unet),
        text_encoder_lora_layers=_peft_state(pipeline.text_encoder))
    return folder / "pytorch_lora_weights.safetensors"


def _legacy_file(script_file, path):
    """The attention projections of the script's file in diffusers' older
    attention-processor layout (`attn1.processor.to_q_lora.down.weight`;
    the text encoder's `self_attn.to_q_lora.down.weight`)."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora",
             "to_out.0": "to_out_lora", "q_proj": "to_q_lora", "k_proj": "to_k_lora",
             "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    legacy = {}
    for key, value in load_file(script_file).items():
        for marker in (".lora.", ".lora_linear_layer."):
            if marker not in key:
                continue
            module, matrix = key.split(marker)
            parent, name = module.rsplit(".", 1) if not module.endswith("to_out.0") else \
                (module[:-len(".to_out.0")], "to_out.0")
            if name in names:
                parent += ".processor" if key.startswith("unet.") else ""
                legacy[f"{parent}.{names[name]}.{matrix}"] = value
    save_file(legacy, str(path))
    return path


def _kohya_file(pipeline, path):
    """The pipeline's peft LoRAs under kohya's keys, as sd-scripts spells
    them: `lora_unet_` / `lora_te_` and the module path with `_`,
    `lora_down` / `lora_up`, and each module's `.alpha`."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.numpy import save_file

    kohya = {}
    for part, module in (("lora_unet_", pipeline.unet), ("lora_te_", pipeline.text_encoder)):
        for name, layer in module.named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            if part == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name
            key = part + name.replace(".", "_")
            with torch.no_grad():
                kohya[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.numpy().copy()
                kohya[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.numpy().copy()
            alpha = layer.scaling["default"] * layer.r["default"]
            kohya[f"{key}.alpha"] = np.asarray(alpha, "float32")
    save_file(kohya, str(path))
    return path


def _make_files(style, root):
    """The folder of a tiny `style` pipeline, LoRA files of each layout, and
    diffusers' image of each: loaded alone, and the script's and kohya's
    files as two adapters at 0.7 and 0.4."""
    import torch
    from peft import LoraConfig

    root.mkdir()
    folder = root / "pipeline"
    write_pipeline(folder, style)
    files, images, direct = {}, {}, {}

    torch.manual_seed(1)  # the scripts save alpha = rank, so no metadata
    trained = _pipeline(folder)
    _add_adapters(trained, LoraConfig(r=4, lora_alpha=4, target_modules=SCRIPT_UNET,
                                      init_lora_weights=False),
                  LoraConfig(r=2, lora_alpha=2, target_modules=SCRIPT_TEXT,
                             init_lora_weights=False))
    direct["script"] = _diffusers_image(trained, _latents())
    files["script"] = _script_file(trained, root / "script")
    files["peft"] = _peft_file(trained, root / "peft")
    files["legacy"] = _legacy_file(files["script"], root / "legacy.safetensors")

    torch.manual_seed(2)
    trained = _pipeline(folder)
    _add_adapters(trained, LoraConfig(r=4, lora_alpha=6, target_modules=KOHYA_UNET,
                                      rank_pattern={"conv1": 2}, alpha_pattern={"conv2": 3},
                                      init_lora_weights=False),
                  LoraConfig(r=3, lora_alpha=5, target_modules=KOHYA_TEXT,
                             init_lora_weights=False))
    direct["kohya"] = _diffusers_image(trained, _latents())
    files["kohya"] = _kohya_file(trained, root / "kohya.safetensors")

    for layout, path in files.items():
        pipeline = _pipeline(folder)
        pipeline.load_lora_weights(path)
        images[layout] = _diffusers_image(pipeline, _latents())
    pipeline = _pipeline(folder)
    pipeline.load_lora_weights(files["script"], adapter_name="a")
    pipeline.load_lora_weights(files["kohya"], adapter_name="b")
    pipeline.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    images["both"] = _diffusers_image(pipeline, _latents())
    pipeline.delete_adapters("a")
    pipeline.set_adapters(["b"], adapter_weights=[0.4])
    images["b alone"] = _diffusers_image(pipeline, _latents())
    images["base"] = _diffusers_image(_pipeline(folder), _latents())
    return {"folder": folder, "files": files, "images": images, "direct": direct}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {style: _make_files(style, root / style) for style in ("sd1", "sd2")}


def test_the_files_are_in_the_layouts_their_tools_write(made):
    from safetensors import safe_open

    def keys(path):
        with safe_open(str(path), framework="np") as file:
            return list(file.keys())

    files = made["sd1"]["files"]
    script = keys(files["script"])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight" \
        in script  # the key the issue's user was refused
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up" \
        ".weight" in script or \
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in script
    legacy = keys(files["legacy"])
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up" \
        ".weight" in legacy
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight" in \
        keys(files["peft"])
    kohya = keys(files["kohya"])
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in kohya
    # Each file is right: diffusers reads it to the image of the adapters it came from.
    for style in ("sd1", "sd2"):
        for layout in ("script", "kohya"):
            np.testing.assert_allclose(made[style]["images"][layout],
                                       made[style]["direct"][layout], atol=1e-5)
        assert np.abs(made[style]["images"]["kohya"] - made[style]["images"]["base"]).max() > 0.05


# The attention-processor layout predates SD 2: it is read on SD 1 (and peft's, written by
# diffusers, on SD 1 in test_sd_lora.py).
@pytest.mark.parametrize("style, layout", [("sd1", "script"), ("sd1", "legacy"), ("sd1", "kohya"),
                                           ("sd2", "peft"), ("sd2", "script"), ("sd2", "kohya")])
def test_each_layout_loads_to_diffusers_image(made, style, layout):
    setup = made[style]
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["files"][layout])
    image = _ours(model, _latents())
    np.testing.assert_allclose(image, setup["images"][layout], atol=2e-3)
    assert np.abs(image - setup["images"]["base"]).max() > 0.02  # the LoRA matters


def test_kohya_convolutions_are_in_the_kernels_and_dense_layers_train(made):
    setup = made["sd1"]
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["files"]["kohya"])
    names = {v.path.rsplit("/", 1)[-1] for v in model.trainable_variables}
    assert names == {"lora_kernel_a", "lora_kernel_b"}
    ranks = {layer.lora_rank for layer in model.network._flatten_layers()
             if getattr(layer, "lora_enabled", False)}
    assert ranks == {4}  # the dense layers; conv1's rank 2 went into its kernel


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_two_adapters_at_their_weights_and_one_removed(made, style):
    setup = made[style]
    model = kd.load_model(setup["folder"])
    before = _weights(model)
    model.load_lora_weights(setup["files"]["script"], adapter_name="a", scale=0.7)
    model.load_lora_weights(setup["files"]["kohya"], adapter_name="b", scale=0.4)
    assert model.get_active_adapters() == ["a", "b"]
    np.testing.assert_allclose(_ours(model, _latents()), setup["images"]["both"], atol=2e-3)
    model.delete_adapters("a")
    assert model.get_list_adapters() == ["b"]
    np.testing.assert_allclose(_ours(model, _latents()), setup["images"]["b alone"], atol=2e-3)
    model.unload_lora_weights()
    after = _weights(model)
    for path, value in before.items():  # the kernels are back, up to rounding
        np.testing.assert_allclose(after[path], value, atol=1e-5, err_msg=path)


def test_set_adapters_reweights_and_deactivates(made, tmp_path):
    setup = made["sd1"]
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["files"]["script"], adapter_name="a")
    model.load_lora_weights(setup["files"]["kohya"], adapter_name="b")
    model.set_adapters(["a", "b"], [0.7, 0.4])
    np.testing.assert_allclose(_ours(model, _latents()), setup["images"]["both"], atol=2e-3)
    model.set_adapters("b", 0.4)  # "a" stays loaded and applies nothing
    assert model.get_active_adapters() == ["b"] and model.get_list_adapters() == ["a", "b"]
    np.testing.assert_allclose(_ours(model, _latents()), setup["images"]["b alone"], atol=2e-3)
    with pytest.raises(ValueError, match=r"the model has no LoRA adapter named 'c'; loaded: a, b"):
        model.set_adapters(["a", "c"])
    with pytest.raises(ValueError, match=r"weights must be a number, None or one number per "
                                         r"adapter \(2\); got \[0.5\]"):
        model.set_adapters(["a", "b"], [0.5])
    model.delete_adapters("a")
    with pytest.raises(ValueError, match=r"the model has no LoRA adapter named 'z'; loaded: b\."):
        model.save_lora_weights(tmp_path, adapter_name="z")


def test_a_named_adapter_saves_to_a_file_diffusers_reads(made, tmp_path):
    setup = made["sd1"]
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["files"]["script"], adapter_name="a")
    model.load_lora_weights(setup["files"]["kohya"], adapter_name="b")
    path = model.save_lora_weights(tmp_path / "b", adapter_name="b")
    pipeline = _pipeline(setup["folder"])
    pipeline.load_lora_weights(path.parent)
    np.testing.assert_allclose(_diffusers_image(pipeline, _latents()), setup["images"]["kohya"],
                               atol=1e-4)


def test_a_pickled_file_in_a_folder_loads_as_its_safetensors(made, tmp_path):
    import torch
    from safetensors.torch import load_file

    setup = made["sd1"]
    torch.save(load_file(setup["files"]["kohya"]), tmp_path / "pytorch_lora_weights.bin")
    pickled, safe = kd.load_model(setup["folder"]), kd.load_model(setup["folder"])
    pickled.load_lora_weights(tmp_path)
    safe.load_lora_weights(setup["files"]["kohya"])
    expected = _weights(safe)
    for path, value in _weights(pickled).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)


# ------------------------------------------------------------- bad input
def _weights(model):
    return {v.path: keras.ops.convert_to_numpy(v).copy()
            for part in (model.network, model.text_encoder) for v in part.variables}


def _write(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, "float32") for k, v in tensors.items()}, str(path),
              metadata=metadata)
    return path


Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
REFUSED = {
    "sdxl": ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 64),
              "unet.add_embedding.linear_1.lora_A.weight": (4, 64)},
             r"the LoRA does not fit this SD 1.x / 2.x model: lora_te2_.*\(a key of SDXL LoRAs\); "
             r"unet.add_embedding.linear_1.lora_A.weight \(a key of SDXL LoRAs\)\. Its keys "
             r"look like a LoRA for SDXL"),
    "sd3": ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 64),
             "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": (64, 4)},
            r"Its keys look like a LoRA for SD 3 \(add_q_proj\)"),
    "flux": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 64)},
             r"\(a key of Flux LoRAs\)\. Its keys look like a LoRA for Flux \(double_blocks\)"),
    "rank": ({f"unet.{Q}.lora.down.weight": (4, 32), f"unet.{Q}.lora.up.weight": (32, 2)},
             rf"unet {Q} \(its down matrix \(4, 32\) has rank 4 but its up matrix \(32, 2\) "
             r"rank 2\)"),
    "loha": ({f"lora_unet_{Q.replace('.', '_')}.hada_w1_a": (32, 4)},
             r"the file is a LyCORIS LoHa adapter \(hada_w1_a in lora_unet_mid_block.*\), "
             r"which keras_diffusion does not load; it reads LoRA files of SD 1.x / 2.x and SDXL "
             r"in the peft, diffusers and kohya layouts, and of SD 3 in the peft and diffusers "
             r"layouts\."),
    "lokr": ({f"lora_unet_{Q.replace('.', '_')}.lokr_w1": (4, 4)}, r"a LyCORIS LoKr adapter"),
    "dora": ({f"unet.{Q}.lora_A.weight": (4, 32), f"unet.{Q}.lora_B.weight": (32, 4),
              f"unet.{Q}.lora_magnitude_vector": (32,)},
             r"the file is a DoRA \(weight-decomposed LoRA\) adapter \(lora_magnitude_vector"),
    "missing module": ({"unet.down_blocks.3.attentions.0.proj_in.lora_A.weight": (4, 32)},
                       r"down_blocks.3.attentions.0.proj_in.lora_A.weight \(names no module of "
                       r"the unet\)\. It may be a LoRA for another model"),
}


def test_refused_files_leave_every_weight_bit_identical(made, tmp_path):
    setup = made["sd1"]
    model = kd.load_model(setup["folder"])
    model.load_lora_weights(setup["files"]["kohya"], adapter_name="b", scale=0.5)
    model.load_lora_weights(setup["files"]["script"])
    before = _weights(model)
    image = _ours(model, _latents())
    for name, (shapes, message) in REFUSED.items():
        path = _write(tmp_path / f"{name}.safetensors",
                      {key: np.ones(shape) for key, shape in shapes.items()})
        with pytest.raises(ValueError, match=message):
            model.load_lora_weights(path, adapter_name=name)
        with pytest.raises(ValueError, match=message):  # replacing one refuses alike
            model.load_lora_weights(path, adapter_name="b")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(setup["files"]["kohya"].read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated.safetensors is not a readable .safetensors "
                                         r"file \(truncated or corrupt\?\)"):
        model.load_lora_weights(truncated)
    dora_metadata = _write(tmp_path / "use_dora.safetensors",
                           {f"unet.{Q}.lora_A.weight": np.ones((4, 32)),
                            f"unet.{Q}.lora_B.weight": np.ones((32, 4))},
                           {"lora_adapter_metadata": '{"unet.use_dora": true, "unet.r": 4}'})
    with pytest.raises(ValueError, match=r"DoRA \(weight-decomposed LoRA\) adapter \(use_dora"):
        model.load_lora_weights(dora_metadata)
    after = _weights(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert model.get_list_adapters() == ["b", "default"]
    np.testing.assert_array_equal(_ours(model, _latents()), image)


def test_a_peft_dora_file_is_refused_by_name(made, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    setup = made["sd1"]
    pipeline = _pipeline(setup["folder"])
    torch.manual_seed(0)
    pipeline.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True,
                                         target_modules=["to_q"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=_peft_state(
        pipeline.unet))
    model = kd.load_model(setup["folder"])
    with pytest.raises(ValueError, match=r"the file is a DoRA \(weight-decomposed LoRA\) "
                                         r"adapter"):
        model.load_lora_weights(tmp_path)
    assert model.get_list_adapters() == []


# ------------------------------------------------------------- commands
def test_sample_applies_several_loras_at_their_scales(made, tmp_path, capsys):
    setup = made["sd1"]
    files = setup["files"]
    base = ["sample", "--model", setup["folder"], "--prompt", PROMPT, "--num", "1", "--steps",
            "2", "--seed", "3"]
    assert cli_main(*base, "--out", tmp_path / "none.png") == 0
    assert cli_main(*base, "--lora", files["script"], "--lora", files["kohya"], "--lora-scale",
                    "0.7", "--lora-scale", "0.4", "--out", tmp_path / "both.png") == 0
    assert cli_main(*base, "--lora", files["script"], "--lora", files["kohya"], "--lora-scale",
                    "0", "--out", tmp_path / "zero.png") == 0
    none, both, zero = (_png(tmp_path / f"{name}.png") for name in ("none", "both", "zero"))
    assert np.abs(both - none).max() > 0.02
    np.testing.assert_allclose(zero, none, atol=2 / 255)  # one scale for all: both at 0
    capsys.readouterr()
    assert cli_main(*base, "--lora", files["script"], "--lora", files["kohya"], "--lora-scale",
                    "0.7", "--lora-scale", "0.4", "--lora-scale", "1", "--out",
                    tmp_path / "x.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give one --lora-scale for every --lora, or one for all; got 2 " \
        "--lora and 3 --lora-scale" in err[0]
    assert cli_main(*base, "--lora", _sdxl_file(tmp_path), "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Its keys look like a LoRA for SDXL" in err[0]
    assert not (tmp_path / "x.png").exists()


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), "float32") / 255


def _sdxl_file(folder):
    return _write(folder / "sdxl.safetensors",
                  {key: np.ones(shape) for key, shape in REFUSED["sdxl"][0].items()})


@pytest.mark.skipif(BACKEND != "torch", reason="finetune's loop is tested on each backend in "
                                               "test_sd_dreambooth.py; here only what --lora adds")
def test_finetune_continues_a_kohya_lora(made, tmp_path, capsys):
    from PIL import Image

    setup = made["sd1"]
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray((rng.uniform(0, 1, (16, 16, 3)) * 255).astype("uint8")).save(
            data / f"{index}.png")
    command = ["finetune", "--model", setup["folder"], "--data-dir", data, "--instance-prompt",
               PROMPT, "--epochs", "1", "--sample-steps", "2", "--learning-rate", "1e-2"]
    assert cli_main(*command, "--lora", _sdxl_file(tmp_path), "--output", tmp_path / "bad") == 2
    assert "Its keys look like a LoRA for SDXL" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert cli_main(*command, "--lora", setup["files"]["kohya"], "--output",
                    tmp_path / "out") == 0
    from safetensors.numpy import load_file

    trained = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    start = kd.load_model(setup["folder"])
    start.load_lora_weights(setup["files"]["kohya"])
    loaded = lora_state_dict(start)
    assert loaded.keys() == trained.keys()
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert key in trained and "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in trained
    assert np.abs(trained[key] - loaded[key]).max() > 1e-4  # it trained on
