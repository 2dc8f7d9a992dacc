"""Where Stable Diffusion's memory goes, phase by phase: ours on each backend
against diffusers, the same random SD 1.5 weights, in one dtype.

    python benchmarks/sd_memory.py [--dtype bfloat16] [--write docs/stable_diffusion.md]

Each run is its own process. After each phase it reads the kernel's account
of the process (`/proc/self/status`: `VmRSS`, the resident memory now, and
`VmHWM`, the peak so far), which counts every native allocation (PyTorch's,
XLA's and TensorFlow's allocators, memory-mapped weights once touched), not
only Python's:

- start: the framework imported;
- load: the model ready to sample (diffusers' `from_pretrained`, our
  `load_model`);
- step: one guided UNet evaluation (batch 2, 64x64 latents), compiled;
- image: one 512x512 image of `--steps` DPM-Solver++ steps, guidance 7.5,
  VAE decode included (the peak of a 20-step image is reached in its first
  step and its decode, so a few steps show it).

The random pipeline is `benchmarks/stable_diffusion.py`'s (`--folder`).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_between_markers  # noqa: E402
from _memory import resident_gb  # noqa: E402
from stable_diffusion import PROMPT  # noqa: E402
from stable_diffusion import ROOT  # noqa: E402
from stable_diffusion import write_random_pipeline  # noqa: E402
from throughput import hardware  # noqa: E402

PHASES = ("start", "load", "step", "image")


def run_diffusers(args):
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import StableDiffusionPipeline

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    phases = {"start": resident_gb()}
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                   torch_dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    phases["load"] = resident_gb()
    latents = torch.randn(2, 4, 64, 64, dtype=dtype)
    context = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, dtype=dtype)
    pipe.unet(latents, torch.tensor([500, 500]), context)
    phases["step"] = resident_gb()
    pipe(PROMPT, height=512, width=512, num_inference_steps=args.steps, guidance_scale=7.5,
         output_type="np")
    phases["image"] = resident_gb()
    return {"library": "diffusers", "backend": "torch", "phases": phases}


def run_ours(args):
    import keras
    import numpy as np

    import keras_diffusion as kd
    from keras_diffusion import pipeline

    phases = {"start": resident_gb()}
    model = kd.load_model(args.folder, dtype=args.dtype)
    phases["load"] = resident_gb()
    rng = np.random.default_rng(0)
    inputs = [keras.ops.convert_to_tensor(value) for value in (
        rng.standard_normal((2, 64, 64, 4)).astype("float32"), np.full((2,), 500, "int32"),
        rng.standard_normal((2, 77, model.network.context_dim)).astype("float32"))]
    keras.ops.convert_to_numpy(pipeline.compiled_network(model)(*inputs))
    phases["step"] = resident_gb()
    model.generate(1, prompts=PROMPT, guidance_scale=7.5, steps=args.steps, sampler="dpmpp_2m",
                   image_size=(512, 512), seed=0)
    phases["image"] = resident_gb()
    return {"library": "keras_diffusion", "backend": keras.backend.backend(), "phases": phases}


def table(runs):
    base = next(r for r in runs if r["library"] == "diffusers")
    rows = ["| run | " + " | ".join(f"{phase}: now / peak GB" for phase in PHASES)
            + " | peak vs diffusers |", "|---" * (len(PHASES) + 2) + "|"]
    for r in runs:
        name = "diffusers" if r["library"] == "diffusers" else f"ours, {r['backend']}"
        cells = [f"{r['phases'][p][0]:.1f} / {r['phases'][p][1]:.1f}" for p in PHASES]
        ratio = r["phases"]["image"][1] / base["phases"]["image"][1]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=ROOT / "build" / "sd-sd15")
    parser.add_argument("--write", help="put the table into this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_diffusers if args.worker == "diffusers" else run_ours
        print("REPORT " + json.dumps(run(args)))
        return
    write_random_pipeline("sd15", args.folder)
    runs = []
    for library, backend in [("diffusers", "torch")] + [
            ("keras_diffusion", b) for b in args.backends.split(",")]:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        print(f"... {library} {backend}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", library, "--folder",
                               str(args.folder), "--dtype", args.dtype, "--steps",
                               str(args.steps)], env=env, capture_output=True, text=True,
                              cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"{library} on {backend} failed (exit {done.returncode})")
        runs.append(json.loads(lines[-1][len("REPORT "):]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    text = table(runs)
    print(text)
    if args.write:
        command = "python benchmarks/sd_memory.py " + " ".join(sys.argv[1:])
        block = "\n".join([
            f"#### {hardware()}: memory by phase, SD 1.5, {args.dtype}", "",
            f"Measured with `{command}`, {time.strftime('%Y-%m-%d %H:%M')}.", "", text, "",
            "```", *[json.dumps(r) for r in runs], "```"])
        write_between_markers(Path(args.write), f"sd-memory-{args.dtype}", block,
                              "Stable Diffusion checkpoints")


if __name__ == "__main__":
    main()
