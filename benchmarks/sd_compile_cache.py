"""What a first Stable Diffusion image spends compiling on JAX, with JAX's
persistent compilation cache empty and then holding the sampling loop (the
cache `keras-diffusion` keeps between runs):

    python benchmarks/sd_compile_cache.py              # SD 1.5, 2 steps
    python benchmarks/sd_compile_cache.py --steps 20

Two fresh processes share a new cache folder. Each loads the random
pipeline of `stable_diffusion.py` (`build/sd-<model>`, written there first
if missing) and draws the same 512x512 guided DDIM image twice; the first
image's time over the second's is what compiling, or reading the program
back, costs. Each line: the cache's state, load, first and second image,
that difference, and the cache folder's size after the run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time
import keras_diffusion as kd

folder, steps = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
model = kd.load_model(folder)
times = [time.perf_counter() - start]
for _ in range(2):
    start = time.perf_counter()
    model.generate(1, prompts="a photo of an astronaut", guidance_scale=7.5, steps=steps,
                   sampler="ddim", image_size=(512, 512), seed=0)
    times.append(time.perf_counter() - start)
print(*times)
"""


def _folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "sd21", "sdxl"))
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    folder = ROOT / "build" / f"sd-{args.model}"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from stable_diffusion import write_random_pipeline

        write_random_pipeline(args.model, folder)
    with tempfile.TemporaryDirectory(prefix="kd-jax-cache-") as cache:
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
                   JAX_COMPILATION_CACHE_DIR=cache)
        for state in ("empty cache", "warm cache"):
            done = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(args.steps)],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {state} run failed:\n{done.stderr[-2000:]}")
            load, first, second = (float(t) for t in done.stdout.split()[-3:])
            print(f"{state:12s} load {load:5.2f} s  first image {first:6.2f} s  second "
                  f"{second:6.2f} s  first - second {first - second:5.2f} s  cache "
                  f"{_folder_bytes(cache) / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
