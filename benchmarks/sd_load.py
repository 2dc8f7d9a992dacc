"""Load time of a Stable Diffusion folder on each backend: the banded layout
copies `load_model` makes against NumPy's one-call transposed copies they
replaced, side by side, each load in a fresh process.

    python benchmarks/sd_load.py                      # SD 1.5, float32
    python benchmarks/sd_load.py --model sdxl --repeats 1

The random pipeline is `stable_diffusion.py`'s (`build/sd-<model>`, written
there first if missing). Each line: backend, copies, seconds from the folder
to a model ready to sample.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time
import numpy as np
import keras_diffusion as kd
from keras_diffusion.stable_diffusion import weights

folder, copies, dtype = sys.argv[1:]
if copies == "numpy":
    def keras_array(value, layout, dtype="float32"):
        return np.ascontiguousarray(weights.to_keras(np.asarray(value), layout), dtype=dtype)

    weights.keras_array = keras_array
start = time.perf_counter()
kd.load_model(folder, dtype=None if dtype == "float32" else dtype)
print(f"{time.perf_counter() - start:.2f}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "sd21", "sdxl", "sd35m"))
    parser.add_argument("--backends", default="torch,tensorflow,jax")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=2, help="loads of each kind")
    args = parser.parse_args()
    folder = ROOT / "build" / f"sd-{args.model}"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from stable_diffusion import write_random_pipeline

        write_random_pipeline(args.model, folder)
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        for _ in range(args.repeats):
            for copies in ("numpy", "banded"):
                done = subprocess.run([sys.executable, "-c", WORKER, str(folder), copies,
                                       args.dtype], env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{backend} ({copies}) failed:\n{done.stderr[-2000:]}")
                print(f"{backend:10s} {copies:6s} {float(done.stdout.split()[-1]):6.2f} s",
                      flush=True)


if __name__ == "__main__":
    main()
