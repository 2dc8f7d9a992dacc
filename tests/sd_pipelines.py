"""Tiny random Stable Diffusion pipelines, built offline with diffusers and
transformers, as diffusers' own tests build their dummy components.

`write_pipeline(folder, style)` saves a `StableDiffusionPipeline` of the
given style with `save_pretrained` (`"sdxl"`: a `StableDiffusionXLPipeline`):

- `"sd1"`: epsilon prediction, convolutional transformer projections, one
  head size for every level, CLIP with `quick_gelu`;
- `"sd2"`: v prediction, linear projections, per-level head counts, CLIP
  with `gelu` and `!` as its padding token.

The tokenizer's files are written here: the byte-level alphabet of CLIP's
BPE, its end-of-word forms, merges that spell a handful of words, and the
two special tokens.
"""

import json
from pathlib import Path

WORDS = ("a", "photo", "of", "cat", "dog", "the", "tree", "jackfruits", "hang", "from",
         "branches", "blurry", "red", "sks")


def byte_alphabet():
    """The 256 printable characters that CLIP's BPE spells bytes with: the
    printable Latin-1 bytes stand for themselves, the others are moved to
    code points from 256 on."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def tokenizer_files():
    """`(vocab, merges)`: merges that build each of `WORDS` left to right."""
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    alphabet = byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer(folder, pad_token):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              pad_token=pad_token, model_max_length=77)
    return tokenizer


def build_pipeline(style, tokenizer_folder):
    """A random `StableDiffusionPipeline` of `style` ("sd1" or "sd2")."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel

    sd2 = style == "sd2"
    tokenizer = write_tokenizer(tokenizer_folder, pad_token="!" if sd2 else "<|endoftext|>")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    vocab_size = len(tokenizer.get_vocab())
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_xl_pipeline(tokenizer_folder, refiner=False):
    """A random `StableDiffusionXLPipeline`, as diffusers' SDXL tests build
    theirs: CLIP and CLIP-with-projection encoders (penultimate features 32
    + 32 wide, a pooled projection of 32), a `text_time` UNet with two-deep
    transformers at its second level, the second tokenizer padding with
    `!`. `refiner`: a `StableDiffusionXLImg2ImgPipeline` as SDXL's refiner
    is one: the second encoder alone (a context 32 wide), five time ids
    ending with the aesthetic score, an Euler scheduler."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel
    from transformers import CLIPTextModelWithProjection

    first = write_tokenizer(Path(tokenizer_folder) / "first", pad_token="<|endoftext|>")
    second = write_tokenizer(Path(tokenizer_folder) / "second", pad_token="!")
    torch.manual_seed(1 if refiner else 0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 32,
        cross_attention_dim=32 if refiner else 64, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025,
    )
    config = dict(bos_token_id=first.bos_token_id, eos_token_id=2, pad_token_id=1,
                  hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=3, vocab_size=len(first.get_vocab()),
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    if refiner:
        from diffusers import EulerDiscreteScheduler
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline(
            unet=unet, vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
            tokenizer_2=second, scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=first, tokenizer_2=second, scheduler=scheduler,
    )


def write_t5_tokenizer(folder):
    """A T5 (Unigram) tokenizer over `WORDS`, as transformers builds one
    from a vocabulary and saves it (`tokenizer.json`); returns it."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0 - 0.1 * index) for index, word in enumerate(WORDS)]
    vocab += [(char, -5.0) for char in sorted(set("".join(WORDS)))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_sd3_pipeline(tokenizer_folder, t5=True):
    """A random `StableDiffusion3Pipeline` as diffusers' SD 3 tests build
    theirs, at widths where nothing is cropped: CLIP-L and CLIP-G with
    projections (32 + 32 wide, pooled 32 + 32), a T5 encoder 96 wide (the
    joint context; without `t5`, none), a two-block MMDiT with patches of
    2, a 16-channel VAE with a shift factor, the flow-matching Euler
    scheduler at shift 3."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection
    from transformers import T5Config
    from transformers import T5EncoderModel

    first = write_tokenizer(Path(tokenizer_folder) / "first", pad_token="<|endoftext|>")
    second = write_tokenizer(Path(tokenizer_folder) / "second", pad_token="!")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=96,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16, norm_num_groups=8, sample_size=16, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    config = dict(bos_token_id=first.bos_token_id, eos_token_id=2, pad_token_id=1,
                  hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=3, vocab_size=len(first.get_vocab()),
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    parts = dict(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config)),
                 text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)),
                 text_encoder_3=None, tokenizer_3=None)
    if t5:
        third = write_t5_tokenizer(Path(tokenizer_folder) / "third")
        parts.update(tokenizer_3=third, text_encoder_3=T5EncoderModel(T5Config(
            vocab_size=len(third.get_vocab()), d_model=96, d_kv=8, d_ff=37, num_layers=2,
            num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
            relative_attention_max_distance=16, decoder_start_token_id=0)))
    for module in (transformer, vae, *(p for k, p in parts.items() if "encoder" in k and p)):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, tokenizer=first, tokenizer_2=second,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)


def write_pipeline(folder, style):
    """Save a tiny pipeline of `style` ("sd1", "sd2", "sdxl", "sdxl_refiner",
    "sd3", or "sd3_no_t5") to `folder`; return the pipeline.
    The tokenizer's `vocab.json` and `merges.txt` are written beside it, to
    `<folder>_tokenizer` (transformers saves `tokenizer.json` only)."""
    folder = Path(folder)
    tokenizer_folder = folder.parent / f"{folder.name}_tokenizer"
    if style.startswith("sdxl"):
        pipeline = build_xl_pipeline(tokenizer_folder, refiner=style == "sdxl_refiner")
    elif style.startswith("sd3"):
        pipeline = build_sd3_pipeline(tokenizer_folder, t5=style == "sd3")
    else:
        pipeline = build_pipeline(style, tokenizer_folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def reference_images(pipeline, latents, *, prompts, negative_prompts=None, steps=4,
                     guidance_scale=7.5, scheduler="ddim"):
    """diffusers' images (NHWC in [0, 1], numpy) from NHWC numpy `latents`."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import EulerDiscreteScheduler

    kind = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
            "euler": EulerDiscreteScheduler}[scheduler]
    pipeline.scheduler = kind.from_config(pipeline.scheduler.config)
    height, width = latents.shape[1] * 2, latents.shape[2] * 2
    with torch.no_grad():
        images = pipeline(
            prompt=prompts, negative_prompt=negative_prompts, height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance_scale,
            latents=torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
            output_type="np",
        ).images
    return np.asarray(images, dtype="float32")


def assert_same_state_dicts(actual, expected):
    """`actual` holds exactly the parts (`{part: {key: array}}`), keys,
    dtypes and values of `expected`."""
    import numpy as np

    assert sorted(actual) == sorted(expected)
    for part, state in expected.items():
        assert sorted(actual[part]) == sorted(state), part
        for key, value in state.items():
            assert actual[part][key].dtype == value.dtype, f"{part}: {key}"
            np.testing.assert_array_equal(actual[part][key], value, err_msg=f"{part}: {key}")


# Each part's config file and weights in a diffusers folder, and the
# keyword `single_file.to_original` takes its config as.
SAVED_PARTS = {"unet": ("unet_config", "diffusion_pytorch_model.safetensors"),
               "vae": ("vae_config", "diffusion_pytorch_model.safetensors"),
               "text_encoder": ("text_config", "model.safetensors"),
               "text_encoder_2": ("text_2_config", "model.safetensors")}


def write_single_file(folder, family, path):
    """Write the saved pipeline `folder` to `path` as one original-layout
    file of `family` (`single_file.to_original`, `safetensors.numpy`).
    Returns `(configs, parts, original)`: the configs as `to_original`'s
    keywords, the folder's state dicts by part, and the file's arrays."""
    import json

    import safetensors.numpy

    from keras_diffusion.stable_diffusion import single_file

    folder = Path(folder)
    present = [part for part in SAVED_PARTS if (folder / part).is_dir()]
    configs = {SAVED_PARTS[part][0]: json.loads((folder / part / "config.json").read_text())
               for part in present}
    parts = {part: safetensors.numpy.load_file(folder / part / SAVED_PARTS[part][1])
             for part in present}
    original = single_file.to_original(parts, family=family, **configs)
    safetensors.numpy.save_file(original, path)
    return configs, parts, original


# `keras-diffusion finetune`'s options for a DreamBooth run with prior
# preservation on a tiny pipeline: a rank-2 LoRA, one epoch, two class images.
DREAMBOOTH_OPTIONS = ("--instance-prompt", "a photo of sks dog", "--class-prompt",
                      "a photo of a dog", "--num-class-images", "2", "--lora-rank", "2",
                      "--epochs", "1", "--batch-size", "2", "--learning-rate", "1e-2",
                      "--sample-steps", "2", "--cache-latents")


def write_instance_images(folder, count=2):
    """DreamBooth's instance images: `count` dark 20x24 PNGs, each with a
    red square, written to `folder` (made)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = (rng.uniform(0, 0.3, (20, 24, 3)) * 255).astype("uint8")
        pixels[6:14, 8:16, 0] = 230
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def part_values(part):
    """A part's variables as NumPy copies, in order."""
    from keras import ops

    return [ops.convert_to_numpy(v).copy() for v in part.variables]


def assert_only_the_network_trained(model, network, frozen):
    """After `fit` of the whole network: most of its variables moved from
    `network` (their values before), the text encoder's and the VAE's
    (`frozen`, in that order) not at all."""
    import numpy as np

    changed = [not np.array_equal(a, b) for a, b in zip(network, part_values(model.network))]
    assert sum(changed) > len(changed) // 2
    for before, after in zip(frozen, part_values(model.text_encoder)
                             + part_values(model.autoencoder)):
        np.testing.assert_array_equal(after, before)
