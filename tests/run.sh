#!/usr/bin/env bash
# Install keras-diffusion with all three backends, then run the test suite once
# per backend. Fails if any backend fails or collects no tests.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k sampler`.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[jax,torch,dev]" || exit 1
export TF_CPP_MIN_LOG_LEVEL=2
# One JAX compilation cache for the three runs (tests/conftest.py sets it up).
JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
status=0
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend"
  start=$(date +%s)
  # The 25 slowest tests of each backend, so a run shows where its time goes.
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider --durations=25 "$@"
  rc=$?
  echo "=== $backend: pytest exit $rc in $(( $(date +%s) - start ))s"
  if [ "$rc" -eq 5 ]; then
    echo "error: no tests were collected under $backend" >&2
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
done
exit $status
