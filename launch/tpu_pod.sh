#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (several hosts, e.g. v3-32 = 4 hosts x 8 cores).
#
#   PROJECT=my-project ZONE=europe-west4-a BUCKET=gs://my-bucket ACCELERATOR=v3-32 \
#     bash launch/tpu_pod.sh
#
# The same command runs on every worker (--worker=all); on a TPU VM each process calls
# jax.distributed.initialize() (forced here by --distributed), which finds its peers. The mesh
# then spans all cores of all hosts; each host feeds its own rows of every global batch.
# The workdir must be a gs:// path (every host writes its part of each checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${PROJECT:?set PROJECT}"
ZONE="${ZONE:-europe-west4-a}"
TPU_NAME="${TPU_NAME:-ddpm-pod}"
ACCELERATOR="${ACCELERATOR:-v3-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/cifar10.py}"
BUCKET="${BUCKET:?set BUCKET=gs://... for the workdir}"
WORKDIR="${WORKDIR:-$BUCKET/ddpm/$(basename "${CONFIG%%:*}" .py)-pod}"
TFDS_DIR="${TFDS_DIR:-$BUCKET/tensorflow_datasets}"

tpu() { gcloud compute tpus tpu-vm "$@" --project "$PROJECT" --zone "$ZONE"; }

# 1. Create the slice (skip if it exists).
tpu describe "$TPU_NAME" >/dev/null 2>&1 || \
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"

# 2. Copy the code to every worker and install.
tar czf /tmp/diffusion_jax.tgz --exclude .git --exclude .venv --exclude workdirs .
tpu scp /tmp/diffusion_jax.tgz "$TPU_NAME":~/diffusion_jax.tgz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "mkdir -p ~/diffusion_jax \
  && tar xzf ~/diffusion_jax.tgz -C ~/diffusion_jax && cd ~/diffusion_jax \
  && python3 -m venv .venv && .venv/bin/pip install -q -U 'jax[tpu]' && .venv/bin/pip install -q -e ."

# 3. Train on all workers at once.
tpu ssh "$TPU_NAME" --worker=all --command "cd ~/diffusion_jax && nohup .venv/bin/python \
  -m diffusion_jax.main --distributed --config $CONFIG --workdir $WORKDIR \
  --config.data.tfds_data_dir=$TFDS_DIR $* > ~/train.log 2>&1 &"
echo "Training started on all workers of $TPU_NAME; logs in ~/train.log on each worker."
echo "TensorBoard: tensorboard --logdir $WORKDIR"
