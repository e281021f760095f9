#!/usr/bin/env bash
# Emulate a multi-host job on this machine: N processes (default 4), one CPU device each,
# gloo collectives, FSDP across processes. Ctrl-C or kill it, run it again: it resumes from
# the last checkpoint in the workdir. This is what tests/test_parallel.py does.
#   bash experiments/tpu/local_cpu.sh [N] [extra --set args]
set -euo pipefail
N=${1:-4}; shift || true
WORKDIR=${WORKDIR:-runs/local_cpu_$N}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1 \
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    jaxsparse train --config transformer_tiny --workdir "$WORKDIR" \
      --set mesh.data=-1 --set mesh.fsdp=2 --set mesh.preset=fsdp "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
wait "${pids[@]}"
