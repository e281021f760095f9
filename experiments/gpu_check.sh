#!/usr/bin/env bash
# One short run on a lent GPU machine (jax with CUDA preinstalled): the kernel tests on the
# device, then the GPU attention, selective-scan, MoE and Monarch benchmarks, Hydra's bfloat16
# SGA (blocked, on the attention core, dense) and workspace against float32 inputs, and Hydra's
# long-context throughput; prints the result tables last. Every step has its own time limit
# (seconds, summing to 530: a device command may run 600 s, and the tables print after the
# steps) so that one slow compile or hang cannot spend the whole device budget: what finished
# is still printed at the end, and the benchmarks write their rows as they go.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT_DIR="${OUT:-experiments/results}"
python -c "import jax; print(jax.__version__, jax.devices())"
# one process on the one GPU (pyproject's addopts start CPU workers; pytest-xdist may be absent)
timeout 100 python -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" tests/test_pallas_attention.py tests/test_pallas_ssm.py \
  tests/test_pallas_linear_scan.py tests/test_moe.py tests/test_monarch.py tests/test_expert_parallel.py -k "gpu or lower" 2>&1 | tail -8
timeout 90 python -m jaxsparse.cli bench attention_gpu --lengths 4096 16384 --repeats 5 --out "$OUT_DIR" \
  > /tmp/attention_gpu.txt 2>&1
# batch 4 x d_inner 1024: the recurrence peers' [B, L, D, N] states at 8192 tokens fit an H100
# (batch 8 x 1536 compiled to ~84 GiB of temporaries for the associative scan's backward)
timeout 90 python -m jaxsparse.cli bench ssm --lengths 1024 8192 --batch 4 --d-inner 1024 --backward \
  --packed 8 --repeats 5 --name ssm_gpu --out "$OUT_DIR" > /tmp/ssm_gpu.txt 2>&1
timeout 45 python -m jaxsparse.cli bench linear_scan --shapes 8x4096x1024 1x65536x512 --backward \
  --repeats 5 --name linear_scan_gpu --out "$OUT_DIR" > /tmp/linear_scan_gpu.txt 2>&1
timeout 45 python -m jaxsparse.cli bench moe --experts 8 64 --repeats 5 --name moe_gpu \
  --out "$OUT_DIR" > /tmp/moe_gpu.txt 2>&1
timeout 50 python -m jaxsparse.cli bench monarch --d 1024 4096 8192 --repeats 5 --name monarch_gpu \
  --out "$OUT_DIR" > /tmp/monarch_gpu.txt 2>&1
timeout 50 python -m jaxsparse.cli bench hydra_precision --lengths 4096 8192 --repeats 3 --name hydra_precision_gpu \
  --out "$OUT_DIR" > /tmp/hydra_precision_gpu.txt 2>&1
timeout 60 python experiments/hydra/study.py throughput --lengths 1024,2048,4096,8192 --repeats 5 \
  --out "$OUT_DIR/hydra_gpu" > /tmp/hydra_gpu.txt 2>&1
tail -30 /tmp/attention_gpu.txt
tail -8 /tmp/hydra_gpu.txt
tail -10 /tmp/hydra_precision_gpu.txt
tail -16 /tmp/monarch_gpu.txt
tail -20 /tmp/moe_gpu.txt
tail -40 /tmp/ssm_gpu.txt
tail -10 /tmp/linear_scan_gpu.txt
