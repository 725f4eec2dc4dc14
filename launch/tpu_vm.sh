#!/usr/bin/env bash
# Train on a single-host Cloud TPU VM (v3-8, the paper's hardware: 8 TPU cores, one host).
#
#   PROJECT=my-project ZONE=europe-west4-a BUCKET=gs://my-bucket bash launch/tpu_vm.sh
#
# Steps: create the VM, copy this repository to it, install, start training in the
# background (nohup; the log goes to ~/train.log on the VM). After a preemption rerun the
# same command: it creates the VM only if it is missing, reinstalls, and training resumes
# from the newest checkpoint in the bucket's workdir.
# Needs the gcloud CLI, authenticated, with the TPU API enabled.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${PROJECT:?set PROJECT}"
ZONE="${ZONE:-europe-west4-a}"
TPU_NAME="${TPU_NAME:-ddpm-v3-8}"
ACCELERATOR="${ACCELERATOR:-v3-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/cifar10.py}"
BUCKET="${BUCKET:?set BUCKET=gs://... for the workdir}"
WORKDIR="${WORKDIR:-$BUCKET/ddpm/$(basename "${CONFIG%%:*}" .py)}"
TFDS_DIR="${TFDS_DIR:-$BUCKET/tensorflow_datasets}"

tpu() { gcloud compute tpus tpu-vm "$@" --project "$PROJECT" --zone "$ZONE"; }

# 1. Create the VM (skip if it exists).
tpu describe "$TPU_NAME" >/dev/null 2>&1 || \
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"

# 2. Copy the code and install (JAX for TPU, then this package).
tar czf /tmp/diffusion_jax.tgz --exclude .git --exclude .venv --exclude workdirs .
tpu scp /tmp/diffusion_jax.tgz "$TPU_NAME":~/diffusion_jax.tgz
tpu ssh "$TPU_NAME" --command "mkdir -p ~/diffusion_jax && tar xzf ~/diffusion_jax.tgz -C ~/diffusion_jax \
  && cd ~/diffusion_jax && python3 -m venv .venv && .venv/bin/pip install -q -U 'jax[tpu]' \
  && .venv/bin/pip install -q -e ."

# 3. Train (datasets are read from TFDS_DIR: prepare them there once with tfds build).
tpu ssh "$TPU_NAME" --command "cd ~/diffusion_jax && nohup .venv/bin/python -m diffusion_jax.main \
  --config $CONFIG --workdir $WORKDIR --config.data.tfds_data_dir=$TFDS_DIR $* \
  > ~/train.log 2>&1 &"
echo "Training started; follow it with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --command 'tail -f ~/train.log'"
echo "TensorBoard: tensorboard --logdir $WORKDIR"
