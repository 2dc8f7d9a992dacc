"""DreamBooth with LoRA on a Stable Diffusion model, end to end: a folder of
images of one object, `keras-diffusion finetune` with prior preservation,
and the model's images before and after.

    python examples/dreambooth_lora.py --data-dir ../shared/data
    python examples/dreambooth_lora.py --model path/to/sd15 --data-dir ../shared/data

The object is a CIFAR-10 class (`--object horse`): its first `--num` training
images are written to runs/examples/dreambooth/instance/ and captioned
"a photo of sks horse"; the model also draws `--num` images of "a photo of a
horse" first and trains on them beside yours (prior preservation), so the
class keeps its look while "sks horse" learns the object.

Without --model, a tiny random SD-1-style pipeline (32x32 images) is built
with diffusers first (the `diffusers` and `transformers` packages, as in
the `dev` extra): its pictures are not meaningful, but every step is the one
a real checkpoint takes, in about two minutes on a 2-core CPU. With an SD 1.x
/ 2.x folder the images are resized to its size, and each step takes tens of
seconds on a CPU.

Printed: the distance from the model's "sks" images to the nearest instance
image before and after (it shrinks: the LoRA learned the object), and how
far the class prompt's images moved (prior preservation keeps that small).
Written: dreambooth_lora.png, one row each: the instance images | "a photo
of sks horse" before | after | "a photo of a horse" before | after.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import keras_diffusion as kd
from keras_diffusion.images import write_images
from keras_diffusion.stable_diffusion.finetuning import read_training_images

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def tiny_pipeline(folder):
    """A random SD-1-style pipeline (32x32 images, CLIP's real tokenizer)
    saved by diffusers, as its own tests build their dummy components."""
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

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    staging = folder.with_name(folder.name + ".partial")
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=None,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(staging)
    CLIPTokenizer.shipped("sd1").save_folder(staging / "tokenizer")
    index = json.loads((staging / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (staging / "model_index.json").write_text(json.dumps(index))
    staging.rename(folder)
    return folder


def write_instances(folder, name, num, data_dir):
    """The first `num` CIFAR-10 training images of class `name`, as PNGs."""
    images, labels = kd.load_dataset("cifar10", data_dir=data_dir, split="train", limit=5000)
    chosen = images[np.asarray(labels).reshape(-1) == CLASSES.index(name)][:num]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(chosen):
        write_images(folder / f"{index:02d}.png", image[None])


def nearest_distance(samples, references):
    """Mean over `samples` of the RMS pixel distance to the nearest reference."""
    diff = samples[:, None] - references[None]
    return float(np.sqrt((diff ** 2).mean(axis=(2, 3, 4))).min(axis=1).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory holding cifar10.npz (offline use)")
    p.add_argument("--model", help="an SD 1.x / 2.x folder or file (default: a tiny random one)")
    p.add_argument("--object", choices=CLASSES, default="horse")
    p.add_argument("--num", type=int, default=8, help="instance images (and class images)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--out", default="dreambooth_lora.png")
    args = p.parse_args()

    root = Path("runs") / "examples" / "dreambooth"
    model = args.model or str(tiny_pipeline(root / "tiny-sd"))
    instance_prompt = f"a photo of sks {args.object}"
    class_prompt = f"a photo of a {args.object}"
    write_instances(root / "instance", args.object, args.num, args.data_dir)
    output = root / "lora"
    command = [sys.executable, "-m", "keras_diffusion.cli", "finetune", "--model", model,
               "--data-dir", str(root / "instance"), "--output", str(output),
               "--instance-prompt", instance_prompt, "--class-prompt", class_prompt,
               "--num-class-images", str(args.num), "--lora-rank", str(args.lora_rank),
               "--learning-rate", str(args.learning_rate), "--epochs", str(args.epochs),
               "--batch-size", "2", "--sample-every", str(args.epochs),
               "--sample-steps", str(args.steps)]
    if (output / "pytorch_lora_weights.safetensors").is_file():
        print(f"reusing {output}")
    else:
        print("$ keras-diffusion " + " ".join(command[3:]))
        subprocess.run(command, check=True)

    sd = kd.load_model(model)
    # The instance images as training saw them: cropped and resized to the model's size.
    instances, _ = read_training_images(root / "instance", sd.image_shape[:2], instance_prompt)
    draw = dict(steps=args.steps, guidance_scale=7.5, sampler="dpmpp_2m", seed=1)
    before = [sd.generate(args.num, prompts=prompt, **draw)
              for prompt in (instance_prompt, class_prompt)]
    sd.load_lora_weights(output)
    after = [sd.generate(args.num, prompts=prompt, **draw)
             for prompt in (instance_prompt, class_prompt)]
    print(f'"{instance_prompt}": RMS distance to the nearest instance image '
          f"{nearest_distance(before[0], instances):.3f} before, "
          f"{nearest_distance(after[0], instances):.3f} after")
    drift = float(np.sqrt(((after[1] - before[1]) ** 2).mean()))
    moved = float(np.sqrt(((after[0] - before[0]) ** 2).mean()))
    print(f'"{class_prompt}": moved {drift:.3f} RMS (the instance prompt\'s images: {moved:.3f})')
    rows = np.concatenate([instances, before[0], after[0], before[1], after[1]])
    kd.save_image_grid(rows, args.out, nrow=args.num,
                       title="instances | sks before | after | class before | after")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
