"""Stable Diffusion at real size (random weights): keras_diffusion on each
backend against diffusers (float32, PyTorch eager) in the same run.

    python benchmarks/stable_diffusion.py --write docs/stable_diffusion.md
    python benchmarks/stable_diffusion.py --dtype bfloat16 --write docs/stable_diffusion.md

A random SD 1.5 (or `--model sd21`, `--model sdxl`: SDXL base 1.0, or
`--model sd35m`: SD 3.5 medium without T5) pipeline is built by diffusers
from the shipped configuration, saved with `save_pretrained`, and loaded by
both libraries, so both run the same weights, in `--dtype` (diffusers'
`torch_dtype`, our `load_model(dtype=...)`; float32 by default; the SDXL and
SD 3.5 folders are written in bfloat16, 7 and 5 GB). Each library
and backend runs in its own subprocess, diffusers first and last. Measured
per run:

- load: seconds from the folder to a model ready to sample (diffusers'
  `from_pretrained`; our `load_model`);
- parameters of the UNet, VAE and text encoder (SD 1.5: 859,520,964,
  83,653,863 and 123,060,480 in diffusers);
- UNet step: one guided evaluation, batch 2 at the default latent size
  (64x64 for SD 1.5), 77-token context; the mean of `--repeats` after one
  that compiles (ours) or warms up (diffusers);
- image: one `--size` image, `--steps` DPM-Solver++(2M) steps at guidance
  7.5 from the same prompt (SDXL and SD 3.5: Euler, as they ship, at
  guidance 5 and 4.5), the VAE decode included; ours once compiled (the
  first call, compile included, is reported too);
- peak memory: the process's peak resident set (ru_maxrss).

With `--finetune`, LoRA training instead (rank 8 on the attention
projections, 512x512, batch 1, AdamW), each backend against diffusers + peft
as `train_text_to_image_lora.py` steps (VAE and text encoding included),
with and without gradient checkpointing: seconds per step, the first step
(compilation), peak memory; and the step on latents encoded once
(`encode_latents`; for diffusers, its step less its measured encoding).
A worker that runs out of memory is reported as a row, not an abort.

Needs the `bench` extra (diffusers) and transformers. About 4-6 GB of disk
for the pipeline folder (`--folder`, kept for later runs) and 5-10 GB of
memory per worker at SD 1.5 size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_between_markers  # noqa: E402
from throughput import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "keras_diffusion" / "stable_diffusion" / "configs"
FAMILIES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "sd35m": "sd35_medium"}
# The sampler and guidance of each model's image: SDXL's and SD 3's folders
# ship Euler schedulers.
IMAGE_SETTINGS = {"sd15": ("dpmpp_2m", 7.5), "sd21": ("dpmpp_2m", 7.5), "sdxl": ("euler", 5.0),
                  "sd35m": ("euler", 4.5)}
DEFAULT_SIZES = {"sd15": (512, 512), "sd21": (768, 768), "sdxl": (1024, 1024),
                 "sd35m": (1024, 1024)}
PROMPT = "jackfruits hang from the branches of a jackfruit tree"


BUFFERS = ("pos_embed.pos_embed",)  # checkpoint entries that torch holds as buffers


def _peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


# ------------------------------------------------------------- the pipeline
def write_random_pipeline(model, folder):
    """A random diffusers pipeline of `model`'s configuration in `folder`
    (skipped when a finished one is there)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL
    from diffusers import DDIMScheduler
    from diffusers import StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel

    from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer

    source = CONFIGS / FAMILIES[model]
    if model == "sdxl":
        return _write_random_xl(source, folder)
    if model == "sd35m":
        return _write_random_sd3(source, folder)
    torch.manual_seed(0)
    configs = {part: json.loads((source / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder")}
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler.from_config(
        json.loads((source / "scheduler" / "scheduler_config.json").read_text()))
    staging = folder.with_name(folder.name + ".partial")
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=None,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(staging)
    CLIPTokenizer.shipped(FAMILIES[model]).save_folder(staging / "tokenizer")
    index = json.loads((staging / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (staging / "model_index.json").write_text(json.dumps(index))
    staging.rename(folder)
    return folder


def _with_shipped_tokenizers(staging, folder):
    """A saved two-encoder pipeline (SDXL, SD 3 without T5) finished: CLIP's
    shipped tokenizers written in (padded as SD 1.x's and SD 2.x's), named
    in model_index.json, and the folder moved into place."""
    from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer

    index = json.loads((staging / "model_index.json").read_text())
    for name, family in (("tokenizer", "sd1"), ("tokenizer_2", "sd2")):
        CLIPTokenizer.shipped(family).save_folder(staging / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    (staging / "model_index.json").write_text(json.dumps(index))
    staging.rename(folder)
    return folder


def _write_random_xl(source, folder):
    """`write_random_pipeline` for SDXL base: both encoders, the shipped
    tokenizers (CLIP's BPE, padded as SD 1.x's and SD 2.x's), weights in
    bfloat16, each part cast as soon as it is built (float32 throughout
    would hold 14 GB)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import EulerDiscreteScheduler
    from diffusers import StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = {part: json.loads((source / part / "config.json").read_text())
              for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
    parts = dict(
        unet=UNet2DConditionModel.from_config(config["unet"]).to(torch.bfloat16),
        vae=AutoencoderKL.from_config(config["vae"]).to(torch.bfloat16),
        text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])).to(torch.bfloat16),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig(**config["text_encoder_2"])).to(torch.bfloat16),
        scheduler=EulerDiscreteScheduler.from_config(
            json.loads((source / "scheduler" / "scheduler_config.json").read_text())))
    staging = folder.with_name(folder.name + ".partial")
    StableDiffusionXLPipeline(**parts, tokenizer=None, tokenizer_2=None).save_pretrained(staging)
    return _with_shipped_tokenizers(staging, folder)


def _write_random_sd3(source, folder):
    """`write_random_pipeline` for SD 3.5 medium without T5 (`text_encoder_3`
    null, as diffusers saves a pipeline loaded with `text_encoder_3=None`):
    the transformer, VAE and both CLIP encoders with projections, each built
    directly in bfloat16, and CLIP's shipped tokenizers."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = {part: json.loads((source / part / "config.json").read_text())
              for part in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: no float32 copy
    try:
        parts = dict(
            transformer=SD3Transformer2DModel.from_config(config["transformer"]),
            vae=AutoencoderKL.from_config(config["vae"]),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig(**config["text_encoder_2"])))
    finally:
        torch.set_default_dtype(default)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads((source / "scheduler" / "scheduler_config.json").read_text()))
    staging = folder.with_name(folder.name + ".partial")
    StableDiffusion3Pipeline(**parts, scheduler=scheduler, tokenizer=None, tokenizer_2=None,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(staging)
    return _with_shipped_tokenizers(staging, folder)


# ------------------------------------------------------------------ workers
def run_diffusers(args):
    import torch
    from diffusers import DiffusionPipeline
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import EulerDiscreteScheduler

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def synced(fn):  # CUDA runs asynchronously: a time must wait for the work
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    # SD 3 without T5: diffusers asks for the missing encoder by name.
    missing = dict(text_encoder_3=None, tokenizer_3=None) if args.model == "sd35m" else {}
    pipe = DiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype, **missing).to(device)
    load = time.perf_counter() - start
    sampler, guidance = IMAGE_SETTINGS[args.model]
    kind = EulerDiscreteScheduler if sampler == "euler" else DPMSolverMultistepScheduler
    pipe.scheduler = kind.from_config(pipe.scheduler.config)
    height, width = args.size
    factor = pipe.vae_scale_factor
    latents = torch.randn(2, 4, height // factor, width // factor, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    if args.model == "sd35m":  # the MMDiT: 16 channels, 77 + 256 tokens, the pooled prompt
        network = pipe.transformer
        latents = torch.randn(2, 16, height // factor, width // factor, device=device,
                              dtype=dtype)
        context = torch.randn(2, 333, network.config.joint_attention_dim, device=device,
                              dtype=dtype)
        added = {"pooled_projections": torch.randn(2, network.config.pooled_projection_dim,
                                                   device=device, dtype=dtype)}
        t = t.to(dtype)
    else:
        network = pipe.unet
        context = torch.randn(2, 77, network.config.cross_attention_dim, device=device,
                              dtype=dtype)
        added = {}
    if args.model == "sdxl":  # the pooled prompt and the six time ids
        added = {"added_cond_kwargs": {
            "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim,
                                       device=device, dtype=dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2,
                                     device=device, dtype=dtype)}}
    if args.model == "sd35m":  # (hidden_states, encoder_hidden_states, pooled, timestep)
        unet_step = synced(lambda: network(hidden_states=latents, timestep=t,
                                           encoder_hidden_states=context, **added))
    else:
        unet_step = synced(lambda: network(latents, t, context, **added))
    step = _timed(unet_step, 1)  # warm-up
    step = _timed(unet_step, args.repeats)

    def image():
        return pipe(PROMPT, height=height, width=width, num_inference_steps=args.steps,
                    guidance_scale=guidance, output_type="np").images

    seconds = _timed(synced(image), 1)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
              if getattr(pipe, name, None) is not None}
    return dict(library="diffusers", backend="torch", load_s=load, unet_step_s=step,
                image_s=seconds, first_image_s=seconds, peak_gb=_peak_gb(),
                parameters=counts)


def run_ours(args):
    import keras
    import numpy as np

    import keras_diffusion as kd
    from keras_diffusion import pipeline

    start = time.perf_counter()
    model = kd.load_model(args.folder, dtype=args.dtype)
    load = time.perf_counter() - start
    height, width = args.size
    factor = model.autoencoder.factor
    channels = model.sample_shape[-1]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, height // factor, width // factor, channels))
    sd3 = args.model == "sd35m"
    t = np.full((2,), 500, "float32" if sd3 else "int32")
    context = rng.standard_normal((2, 333 if sd3 else 77, model.network.context_dim))
    inputs = [latents.astype("float32"), t, context.astype("float32")]
    if hasattr(model, "added_conditions"):  # the pooled prompt (and SDXL's time ids)
        pooled = rng.standard_normal((2, model.network.pooled_dim if sd3
                                      else model.text_encoder.second.projection_dim))
        inputs += model.added_conditions(latents, pooled.astype("float32"))
    step_fn = pipeline.compiled_network(model)
    inputs = [keras.ops.convert_to_tensor(v) for v in inputs]
    compile_s = _timed(lambda: keras.ops.convert_to_numpy(step_fn(*inputs)), 1)
    step = _timed(lambda: keras.ops.convert_to_numpy(step_fn(*inputs)), args.repeats)

    sampler, guidance = IMAGE_SETTINGS[args.model]

    def image():
        return model.generate(1, prompts=PROMPT, guidance_scale=guidance, steps=args.steps,
                              sampler=sampler, image_size=tuple(args.size), seed=0)

    first = _timed(image, 1)
    seconds = _timed(image, 1) if args.image_repeats else first
    from keras_diffusion.stable_diffusion import weights as sd_weights

    # The checkpoint's parameters, as torch's `parameters()` counts them: the VAE's
    # scaling factor (a weight here) is not one, nor is a buffer such as SD 3's
    # position table (stored in the checkpoint, never trained).
    encoders = {"text_encoder": model.text_encoder}
    if hasattr(model.text_encoder, "second"):  # SDXL's pair, SD 3's CLIP pair
        encoders = {"text_encoder": model.text_encoder.first,
                    "text_encoder_2": model.text_encoder.second}
    network = "transformer" if args.model == "sd35m" else "unet"
    counts = {name: int(sum(np.prod(v.shape)
                            for key, (v, _) in sd_weights.checkpoint_table(part).items()
                            if not key.endswith(BUFFERS)))
              for name, part in ((network, model.network), ("vae", model.autoencoder),
                                 *encoders.items())}
    return dict(library="keras_diffusion", backend=keras.backend.backend(), load_s=load,
                unet_step_s=step, unet_compile_s=compile_s, image_s=seconds,
                first_image_s=first, peak_gb=_peak_gb(), parameters=counts)


# -------------------------------------------------------------- fine-tuning
def _encode_for_training(pipe, ids, xl, side):
    """The UNet's conditioning in a training step: SD's text features, or
    SDXL's two penultimate feature sets, pooled prompt and time ids (as
    diffusers' SDXL training scripts compute them)."""
    import torch

    if not xl:
        return pipe.text_encoder(ids[0])[0], {}
    first = pipe.text_encoder(ids[0], output_hidden_states=True)
    second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=context.dtype)
    return context, {"added_cond_kwargs": {"text_embeds": second[0], "time_ids": time_ids}}


def finetune_diffusers(args):
    """One LoRA training step as diffusers' train_text_to_image_lora.py (and
    its SDXL twin) takes it: VAE encode, text encode (both frozen), noise,
    UNet with peft LoRA (rank 8 on the attention projections), MSE,
    backward, AdamW. Over half-precision weights the LoRA matrices are
    float32, as the scripts' `cast_training_params`."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    pipe = DiffusionPipeline.from_pretrained(args.folder, torch_dtype=getattr(torch, args.dtype))
    xl = args.model == "sdxl"
    for part in (pipe.vae, pipe.text_encoder, pipe.unet, getattr(pipe, "text_encoder_2", None)):
        if part is not None:
            part.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for parameter in pipe.unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if args.checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = args.size[0]
    pixels = (torch.rand(1, 3, side, side) * 2 - 1).to(pipe.vae.dtype)
    ids = [tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                     return_tensors="pt").input_ids
           for tokenizer in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tokenizer]

    def step():
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            context, added = _encode_for_training(pipe, ids, xl, side)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        prediction = pipe.unet(noisy, t, context, **added).sample.float()
        loss = torch.nn.functional.mse_loss(prediction, noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    first = _timed(step, 1)
    seconds = _timed(step, args.repeats)

    def encode():  # what caching latents and prompt embeddings would save per step
        with torch.no_grad():
            pipe.vae.encode(pixels).latent_dist.sample()
            _encode_for_training(pipe, ids, xl, side)

    return dict(library="diffusers", backend="torch", checkpointing=args.checkpointing,
                step_s=seconds, first_step_s=first, encode_s=_timed(encode, 2),
                peak_gb=_peak_gb(), trainable=sum(p.numel() for p in params))


def finetune_ours(args):
    import keras
    import numpy as np

    import keras_diffusion as kd

    sd = kd.load_model(args.folder, dtype=args.dtype)  # LoRA matrices float32 either way
    sd.enable_lora(rank=8)
    if args.checkpointing:
        sd.enable_gradient_checkpointing()
    sd.compile(optimizer=keras.optimizers.AdamW(1e-4))
    height, width = args.size  # fit trains at any size the UNet divides
    images = np.random.default_rng(0).uniform(0, 1, (1 + args.repeats, height, width, 3))
    captions = ["a photo of sks dog"] * len(images)
    first = _timed(lambda: sd.fit(images[:1].astype("float32"), captions[:1], batch_size=1,
                                  epochs=1, verbose=0), 1)
    seconds = _timed(lambda: sd.fit(images[1:].astype("float32"), captions[1:], batch_size=1,
                                    epochs=1, verbose=0), 1) / args.repeats
    trainable = int(sum(np.prod(v.shape) for v in sd.trainable_variables))
    result = dict(library="keras_diffusion", backend=keras.backend.backend(),
                  checkpointing=args.checkpointing, step_s=seconds, first_step_s=first,
                  trainable=trainable)
    if not args.checkpointing:  # the same step on latents encoded once (encode_latents)
        latents = sd.encode_latents(images.astype("float32"), batch_size=1)
        _timed(lambda: sd.fit(latents[:1], captions[:1], batch_size=1, epochs=1, verbose=0), 1)
        result["cached_latents_step_s"] = _timed(
            lambda: sd.fit(latents[1:], captions[1:], batch_size=1, epochs=1, verbose=0),
            1) / args.repeats
    return dict(result, peak_gb=_peak_gb())


def finetune_table(runs, size):
    rows = [f"| run | gradient checkpointing | s per LoRA step ({size[0]}x{size[1]}, batch 1) "
            "| vs diffusers "
            "| on cached latents s | first step s | peak GB |", "|---|---|---|---|---|---|---|"]
    base = {r["checkpointing"]: r["step_s"] for r in runs
            if r["library"] == "diffusers" and "failed" not in r}
    for r in runs:
        name = "diffusers + peft" if r["library"] == "diffusers" else f"ours, {r['backend']}"
        if "failed" in r:
            rows.append(f"| {name} | {'yes' if r['checkpointing'] else 'no'} | "
                        f"failed: {r['failed']} | - | - | - | - |")
            continue
        base_step = base.get(r["checkpointing"])
        ratio = "-" if base_step is None else f"{base_step / r['step_s']:.2f}x"
        cached = r.get("cached_latents_step_s")
        if cached is None and "encode_s" in r:  # diffusers: its step less the encoding
            cached = r["step_s"] - r["encode_s"]
        cached = "-" if cached is None else f"{cached:.1f}"
        rows.append(f"| {name} | {'yes' if r['checkpointing'] else 'no'} | {r['step_s']:.1f} | "
                    f"{ratio} | {cached} | {r['first_step_s']:.1f} | {r['peak_gb']:.1f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------- driver
def _spawn(args, library, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, __file__, "--worker", library, "--folder", str(args.folder),
               "--model", args.model,
               *(["--finetune"] if args.finetune else []),
               *(["--checkpointing"] if args.checkpointing else []),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--dtype", args.dtype,
               "--size", f"{args.size[0]}x{args.size[1]}",
               "--image-repeats", str(args.image_repeats)]
    print(f"... {library} {backend}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-3000:])
        if args.finetune:  # a run that does not fit in memory is a result
            killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
            return dict(library=library, backend=backend, checkpointing=args.checkpointing,
                        failed=f"exit {done.returncode}{killed}")
        raise SystemExit(f"{library} on {backend} failed (exit {done.returncode})")
    print(lines[-1], file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def table(runs):
    base = [r for r in runs if r["library"] == "diffusers"]
    step = sum(r["unet_step_s"] for r in base) / len(base)
    image = sum(r["image_s"] for r in base) / len(base)
    load = sum(r["load_s"] for r in base) / len(base)
    rows = ["| run | load s | UNet step s (batch 2) | vs diffusers | image s | vs diffusers | "
            "first image s | peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        name = "diffusers (PyTorch eager)" if r["library"] == "diffusers" else f"ours, {r['backend']}"
        rows.append(f"| {name} | {r['load_s']:.1f} ({load / r['load_s']:.2f}x) | "
                    f"{r['unet_step_s']:.2f} | {step / r['unet_step_s']:.2f}x | {r['image_s']:.1f} | "
                    f"{image / r['image_s']:.2f}x | {r['first_image_s']:.1f} | {r['peak_gb']:.1f} |")
    return "\n".join(rows)


def _size(text):
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the weights' dtype, in both libraries")
    parser.add_argument("--repeats", type=int, default=2, help="timed UNet steps")
    parser.add_argument("--image-repeats", type=int, default=0,
                        help="1: time a second image after the compiling one")
    parser.add_argument("--diffusers-runs", type=int, choices=(1, 2), default=2,
                        help="2: diffusers before and after our backends (to see drift); 1: "
                             "before only, for models whose image takes a quarter of an hour")
    parser.add_argument("--size", type=_size, default=None, help="HxW (default: the model's)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the random pipeline is written (default: build/sd-<model>)")
    parser.add_argument("--write", help="put the table into this Markdown file")
    parser.add_argument("--section", type=_section, default=None,
                        help="with --write: a table of its own, beside the others of this model "
                             "and dtype, named by this word (another CPU's, e.g. 'zen5')")
    parser.add_argument("--finetune", action="store_true",
                        help="measure LoRA training steps instead (with and without gradient "
                             "checkpointing)")
    parser.add_argument("--runs", choices=("both", "plain", "checkpointing"), default="both",
                        help="with --finetune: with and without gradient checkpointing, or one")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.finetune and args.model == "sd35m":
        parser.error("--finetune measures the UNet models (sd15, sd21, sdxl)")
    if args.folder is None:
        args.folder = ROOT / "build" / f"sd-{args.model}"
    if args.size is None:
        args.size = DEFAULT_SIZES[args.model]
    if args.worker:
        workers = {(False, "diffusers"): run_diffusers, (False, "keras_diffusion"): run_ours,
                   (True, "diffusers"): finetune_diffusers, (True, "keras_diffusion"): finetune_ours}
        print(json.dumps(workers[args.finetune, args.worker](args)))
        return
    write_random_pipeline(args.model, args.folder)
    if args.finetune:
        runs = []
        for checkpointing in {"both": (False, True), "plain": (False,),
                              "checkpointing": (True,)}[args.runs]:
            args.checkpointing = checkpointing
            runs.append(_spawn(args, "diffusers", "torch"))
            runs += [_spawn(args, "keras_diffusion", b) for b in args.backends.split(",")]
        text = finetune_table(runs, args.size)
        print(text)
        if args.write:
            suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
            _write(args, text, runs, f"sd-finetune-{args.model}{suffix}",
                   f"LoRA fine-tuning, {args.size[0]}x{args.size[1]}, {args.dtype}")
        return
    runs = [_spawn(args, "diffusers", "torch")]
    for backend in args.backends.split(","):
        runs.append(_spawn(args, "keras_diffusion", backend))
    if args.diffusers_runs == 2:
        runs.append(_spawn(args, "diffusers", "torch"))
    text = table(runs)
    print(text)
    if args.write:
        suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
        _write(args, text, runs, f"sd-inference-{args.model}{suffix}",
               f"{args.size[0]}x{args.size[1]}, {args.steps} steps, {args.dtype}")


def _section(word):
    if not word.isidentifier():
        raise argparse.ArgumentTypeError(f"a section is one word of letters, digits and "
                                         f"underscores, e.g. zen5; got {word!r}")
    return word


def _write(args, text, runs, key, what):
    """The table into `args.write` under the marker `key`; with
    `--section`, under `key-section`, placed first after `key`'s own."""
    command = "python benchmarks/stable_diffusion.py " + " ".join(sys.argv[1:])
    block = "\n".join([
        f"#### {hardware()}, {args.model}, {what}", "",
        f"Measured with `{command}`, {time.strftime('%Y-%m-%d %H:%M')}.", "", text, "",
        "```", *[json.dumps(r) for r in runs], "```"])
    section = args.section
    write_between_markers(Path(args.write), f"{key}-{section}" if section else key, block,
                          "Stable Diffusion checkpoints", after=f"{key}:" if section else None)


if __name__ == "__main__":
    main()
