"""Load time of a Stable Diffusion folder, from the folder to a model ready
to sample: diffusers' `from_pretrained` and our `load_model` on each
backend, side by side, each load in a fresh process.

    python benchmarks/sd_load.py                      # SD 1.5, float32
    python benchmarks/sd_load.py --model sdxl --repeats 1
    python benchmarks/sd_load.py --backends jax --numpy-copies

The random pipeline is `stable_diffusion.py`'s (`build/sd-<model>`, written
there first if missing). Each line: who loaded, seconds, and the process's
peak resident memory (`VmHWM`). `--numpy-copies` adds, for each backend, a
load whose layout copies are NumPy's one-call transposed copies on one
thread (what loading did before its banded, split copies).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each worker runs with this folder on its path (for `_memory`).
OURS = """
import sys, time
from _memory import resident_gb
import numpy as np
import keras_diffusion as kd
from keras_diffusion.stable_diffusion import weights

folder, copies, dtype = sys.argv[1:]
if copies == "numpy":
    def keras_array(value, layout, dtype="float32"):
        return np.array(weights.to_keras(np.asarray(value), layout), dtype=dtype, order="C")

    weights.keras_array = keras_array
start = time.perf_counter()
kd.load_model(folder, dtype=dtype)
print(f"{time.perf_counter() - start:.2f} {resident_gb()[1]:.2f}")
"""

DIFFUSERS = """
import sys, time
from _memory import resident_gb
import torch
from diffusers import DiffusionPipeline

folder, _, dtype = sys.argv[1:]
start = time.perf_counter()
DiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
print(f"{time.perf_counter() - start:.2f} {resident_gb()[1]:.2f}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "sd21", "sdxl"))
    parser.add_argument("--backends", default="torch,tensorflow,jax")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=2, help="loads of each kind")
    parser.add_argument("--numpy-copies", action="store_true",
                        help="also load with NumPy's one-call layout copies")
    args = parser.parse_args()
    folder = ROOT / "build" / f"sd-{args.model}"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from stable_diffusion import write_random_pipeline

        write_random_pipeline(args.model, folder)
    runs = [("diffusers", "torch", DIFFUSERS, "-")]
    for backend in args.backends.split(","):
        runs.append(("ours", backend, OURS, "banded"))
        if args.numpy_copies:
            runs.append(("ours", backend, OURS, "numpy"))
    for _ in range(args.repeats):
        for who, backend, worker, copies in runs:
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "benchmarks"),
                                                                os.environ.get("PYTHONPATH")])))
            done = subprocess.run([sys.executable, "-c", worker, str(folder), copies, args.dtype],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{who} on {backend} failed:\n{done.stderr[-2000:]}")
            seconds, peak = done.stdout.split()[-2:]
            name = who if who == "diffusers" else f"ours, {backend}"
            if copies == "numpy":
                name += " (one-call copies)"
            print(f"{name:36s} {float(seconds):6.2f} s  peak {float(peak):5.2f} GB", flush=True)


if __name__ == "__main__":
    main()
