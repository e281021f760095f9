#!/usr/bin/env bash
# Train on every host of an existing TPU VM pod slice. JAX detects the slice, so
# train.distributed=true is all jax.distributed needs; the workdir must be shared (here a
# gcsfuse mount at /mnt/ckpt on every worker).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash experiments/tpu/tpu_pod.sh [extra --set args]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-hydra_1p6b}
WORKDIR=${WORKDIR:-/mnt/ckpt/runs/$CONFIG}
REPO=${REPO:-https://github.com/jaxsparse/jaxsparse}
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d jaxsparse ] || git clone $REPO jaxsparse
  cd jaxsparse && pip install -q -e . 'jax[tpu]'
  jaxsparse train --config $CONFIG --workdir $WORKDIR --set train.distributed=true \
    --set mesh.data=1 --set mesh.fsdp=-1 --set mesh.preset=fsdp --set model.remat=true $EXTRA
"
