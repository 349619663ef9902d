#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU VM pod slice: the same command everywhere;
# jax.distributed.initialize() finds the coordinator and the process ids from the TPU runtime.
#
#   scripts/launch/launch_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. scripts/launch/launch_tpu_pod.sh my-v5e-32 us-west4-a experiments/configs/lm_shakespeare.py \
#            /gcs/my-bucket/runs/lm --config.mesh.fsdp=8 --config.data.batch_size=256
#
# What a user changes: TPU_NAME, ZONE (and PROJECT below), the config and its overrides, and a
# WORKDIR every worker sees as a file system path (a bucket mounted with gcsfuse on every worker,
# or Filestore NFS; metrics.jsonl is appended to, so a bare gs:// URL is not enough). The code
# must be on every worker: the first step copies this checkout there and installs it. Rerunning
# resumes from the workdir.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,11p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all)

# 1. The code on every worker (git archive: tracked files only), installed with TPU jax.
git -C "$REPO" archive --format=tar.gz -o /tmp/beyond.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/beyond.tar.gz "$TPU_NAME":/tmp/ --zone="$ZONE" --project="$PROJECT" --worker=all
"${SSH[@]}" --command "mkdir -p ~/beyond && tar -xzf /tmp/beyond.tar.gz -C ~/beyond && \
  cd ~/beyond && pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# 2. The same command on every worker.
"${SSH[@]}" --command "cd ~/beyond && python -m experiments.train --config=$CONFIG --workdir=$WORKDIR $*"
