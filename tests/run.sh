#!/usr/bin/env bash
# Install keras-diffusion with all three backends, then run the test suite once
# per backend. Fails if any backend fails or collects no tests.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k sampler`.
#
# On a machine with two or more cores the backends run in two lanes at once,
# JAX in one and TensorFlow then PyTorch in the other, each framework on one
# thread: most of a test's time is tracing and compiling, which uses one core
# anyway, so two lanes take ~40% less wall time than one. Each lane's output
# is printed when it ends. KD_TEST_LANES=1 runs the backends one after another
# on all cores, printing as they go.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[jax,torch,dev]" || exit 1
export TF_CPP_MIN_LOG_LEVEL=2
# One JAX compilation cache for the three runs (tests/conftest.py sets it up).
JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR
logs=$(mktemp -d)
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR" "$logs"' EXIT

# Runs pytest under one backend; prints its summary line and returns 1 if it
# failed or collected nothing.
run_backend() {
  local backend=$1 start rc
  shift
  echo "=== KERAS_BACKEND=$backend"
  start=$(date +%s)
  # The 25 slowest tests of each backend, so a run shows where its time goes.
  KERAS_BACKEND=$backend ${PIN:-} python -m pytest -q -p no:cacheprovider --durations=25 "$@"
  rc=$?
  echo "=== $backend: pytest exit $rc in $(( $(date +%s) - start ))s"
  if [ "$rc" -eq 5 ]; then
    echo "error: no tests were collected under $backend" >&2
    return 1
  fi
  [ "$rc" -eq 0 ]
}

lanes=${KD_TEST_LANES:-$(( $(nproc) >= 2 ? 2 : 1 ))}
status=0
if [ "$lanes" -le 1 ]; then
  for backend in tensorflow jax torch; do
    run_backend "$backend" "$@" || status=1
  done
  exit $status
fi

# One thread per framework in each lane, in every process the tests start.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=2
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_multi_thread_eigen=false"
# XLA has no thread setting its convolutions obey (keras_diffusion puts them on
# XLA's Eigen kernels, which use every core the process may run on), so the JAX
# lane runs on one core, where it would otherwise slow both lanes down.
jax_pin=""
if command -v taskset >/dev/null; then
  jax_pin="taskset -c $(python -c 'import os; print(min(os.sched_getaffinity(0)))')"
fi
start=$(date +%s)
PIN=$jax_pin run_backend jax "$@" >"$logs/jax" 2>&1 &
jax_lane=$!
{ run_backend tensorflow "$@" && tf_ok=1 || tf_ok=0
  run_backend torch "$@" && [ "$tf_ok" -eq 1 ]; } >"$logs/tensorflow+torch" 2>&1 &
other_lane=$!
wait "$other_lane" || status=1
cat "$logs/tensorflow+torch"
wait "$jax_lane" || status=1
cat "$logs/jax"
echo "=== all backends in $(( $(date +%s) - start ))s, exit $status"
exit $status
