#!/usr/bin/env bash
# One short run on a lent GPU machine (jax with CUDA preinstalled): the kernel tests on the
# device, then the GPU attention benchmark; prints the results table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
python -c "import jax; print(jax.__version__, jax.devices())"
python -m pytest -q -p no:cacheprovider tests/test_pallas_attention.py -k "gpu or lower" 2>&1 | tail -5
python -m jaxsparse.cli bench attention_gpu --lengths 4096 8192 16384 --repeats 5 --out "${OUT:-experiments/results}"
