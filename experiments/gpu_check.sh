#!/usr/bin/env bash
# One short run on a lent GPU machine (jax with CUDA preinstalled, nothing to install): the
# GPU-only kernel tests, then the GPU attention, selective-scan, linear-scan, MoE and Monarch
# benchmarks, Hydra's bfloat16 SGA and workspace against float32 inputs, and Hydra's
# long-context throughput.
#
# Built for a device window of ~10 minutes that may be the only one:
# - every step has its own time limit (seconds, summing to 520: a device command may run
#   600 s), so one slow compile or hang cannot spend the whole budget; each benchmark writes
#   its results after every case, so a step stopped at its limit keeps what it measured;
# - each step's whole log and results go to a scratch folder, packed at the end into
#   $OUT/gpu_check.tar.gz; $OUT also gets tables.md (every results table) and status.txt
#   (each step's exit status and seconds; 124 = stopped at its limit): three files, as the
#   device returns at most eight;
# - printed last: the versions, the test verdict, the ratio tables and the status table.
#
#   bash experiments/gpu_check.sh          # OUT defaults to experiments/results/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the device's python3 holds its jax, flax, optax, orbax
OUT_DIR="${OUT:-experiments/results/gpu}"
WORK="$(mktemp -d)"
RESULTS="$WORK/results"
mkdir -p "$OUT_DIR" "$RESULTS"
STATUS="$WORK/status.txt"
printf "%-18s %4s %6s %6s\n" step rc secs limit > "$STATUS"

step() {  # step NAME LIMIT COMMAND...: COMMAND's output in $WORK/NAME.log, its status in $STATUS
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf "%-18s %4s %6s %6s%s\n" "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" \
    "$([ "$rc" = 124 ] && echo '  stopped at its limit')" >> "$STATUS"
  echo "done: $name (rc $rc)"
}

"$PY" -c "import jax, flax, optax, orbax.checkpoint, sys; print('python', sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'devices', jax.devices())" \
  > "$WORK/versions.log" 2>&1

# Only the tests that need the GPU (CI runs the lowering and interpret-mode ones on CPU); one
# process on the one GPU: pyproject's addopts would start CPU workers.
TIMEOUT_ARG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG=(--timeout 60)
step gpu_tests 100 "$PY" -m pytest -q -rfEs -p no:cacheprovider -o addopts="" \
  ${TIMEOUT_ARG[@]+"${TIMEOUT_ARG[@]}"} \
  tests/test_pallas_attention.py tests/test_pallas_ssm.py tests/test_pallas_linear_scan.py \
  tests/test_moe.py tests/test_monarch.py tests/test_expert_parallel.py \
  -k "on_gpu or on_device or on_a_gpu"
step attention_gpu 75 "$PY" -m jaxsparse.cli bench attention_gpu --lengths 4096 16384 --repeats 5 \
  --out "$RESULTS"
# batch 4 x d_inner 1024: the recurrence peers' [B, L, D, N] states at 8192 tokens fit an H100
# (batch 8 x 1536 compiled to ~84 GiB of temporaries for the associative scan's backward)
step ssm_gpu 75 "$PY" -m jaxsparse.cli bench ssm --lengths 1024 8192 --batch 4 --d-inner 1024 \
  --backward --packed 8 --repeats 5 --name ssm_gpu --out "$RESULTS"
step linear_scan_gpu 40 "$PY" -m jaxsparse.cli bench linear_scan --shapes 8x4096x1024 1x65536x512 \
  --backward --repeats 5 --name linear_scan_gpu --out "$RESULTS"
step moe_gpu 40 "$PY" -m jaxsparse.cli bench moe --experts 8 64 --repeats 5 --name moe_gpu \
  --out "$RESULTS"
step monarch_gpu 45 "$PY" -m jaxsparse.cli bench monarch --d 1024 4096 8192 --repeats 5 \
  --name monarch_gpu --out "$RESULTS"
step hydra_precision 45 "$PY" -m jaxsparse.cli bench hydra_precision --lengths 4096 8192 --repeats 3 \
  --name hydra_precision_gpu --out "$RESULTS"
# two lengths: each is two compiles of a 29M-parameter training step (Hydra and the Transformer)
step hydra_throughput 100 "$PY" experiments/hydra/study.py throughput --lengths 2048,8192 \
  --repeats 5 --out "$RESULTS/hydra"

for table in "$RESULTS"/*.md "$RESULTS"/hydra/*.md; do
  [ -f "$table" ] && { cat "$table"; echo; }
done > "$OUT_DIR/tables.md"
cp "$STATUS" "$OUT_DIR/status.txt"
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$WORK" .

echo "=== versions"; cat "$WORK/versions.log"
echo "=== GPU tests"; tail -n 12 "$WORK/gpu_tests.log"
for table in "$RESULTS"/*.md "$RESULTS"/hydra/*.md; do
  [ -f "$table" ] || continue
  echo "=== $(basename "$table" .md)"
  grep '^|' "$table" | cut -c1-160
done
echo "=== steps (rc 124: stopped at its limit; logs and results in $OUT_DIR/gpu_check.tar.gz)"
cat "$STATUS"
