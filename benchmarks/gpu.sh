#!/usr/bin/env bash
# Throughput of keras_diffusion on one lent GPU (H100 or H200): JAX and PyTorch
# backends, mixed_bfloat16, the DDPM CIFAR-10 UNet (35.7M parameters), with
# achieved TFLOP/s, next to diffusers' UNet2DModel of the same shape; then
# Stable Diffusion 1.5 (random weights, float32) against diffusers' pipeline.
#
# The GPU image has PyTorch, JAX and NumPy but no Keras, TensorFlow or
# diffusers, and no network. So, in two steps:
#
#   1. here, once (needs PyPI):   bash benchmarks/gpu.sh fetch
#      saves the missing wheels (keras, namex, optree, importlib_metadata,
#      diffusers) under build/gpu-wheels, which .gitignore already ignores;
#   2. on the device, carrying them, with about 9 minutes to spare:
#      run(command="bash benchmarks/gpu.sh", carry=["build/gpu-wheels"], timeout_s=560)
#      It prints the table and writes $OUT/performance-gpu.md (the table and
#      raw JSON results) and $OUT/gpu-log.txt.
#
# Sizes are chosen to fit one command's 10-minute limit: 10 timed training
# steps of 128 after 3 warm-up steps, and one timed generate of 256 images per
# sampler after a compiling call. JAX compiles the training step and each
# sampling loop once (about a minute each for this UNet).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu-wheels

if [ "${1:-}" = fetch ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    keras==3.15.1 namex==0.1.0 optree==0.20.0 importlib_metadata diffusers==0.42.1
  # benchmarks/stable_diffusion.py: transformers and what it and diffusers need (no torch;
  # numpy is skipped at install, the image has its own).
  python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" diffusers==0.42.1 transformers==5.24.0 safetensors
  du -sh "$WHEELS"
  exit 0
fi

ls "$WHEELS"/keras-*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'bash benchmarks/gpu.sh fetch' here first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls "$WHEELS"/*.whl | grep -v '/numpy-')
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
# One process at a time holds the GPU; let JAX take memory as it needs it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT_DIR="${OUT:-build/gpu-results}"
mkdir -p "$OUT_DIR"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, torch, keras; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.get_device_name(0), '| keras', keras.__version__)"
  python3 benchmarks/throughput.py --model cifar10 --backends jax,torch --precisions mixed_bfloat16 \
    --batch 128 --train-steps 10 --warmup-steps 3 --sample-batch 256 --vs-diffusers \
    --write "$OUT_DIR/performance-gpu.md"
  # Stable Diffusion 1.5 at real size, random weights, float32, against diffusers on the GPU.
  python3 benchmarks/stable_diffusion.py --backends jax,torch --repeats 5 --image-repeats 1 \
    --folder /tmp/sd-sd15 --write "$OUT_DIR/stable-diffusion-gpu.md"
} 2>&1 | tee "$OUT_DIR/gpu-log.txt"
