#!/usr/bin/env bash
# Train on every NVIDIA GPU of this host, in one process (JAX sees all local GPUs; the
# mesh spans them and the global batch is split over them).
#
#   bash launch/gpu_local.sh                                   # CIFAR10, the paper's setup
#   CONFIG=configs/celebahq256.py WORKDIR=/data/runs/celebahq bash launch/gpu_local.sh
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/gpu_local.sh          # a subset of the GPUs
#
# Needs an NVIDIA driver for CUDA 12. TensorFlow (only used for tf.data) is kept off the
# GPUs by diffusion_jax.main. Extra arguments go to diffusion_jax.main.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/cifar10.py}"
WORKDIR="${WORKDIR:-workdirs/$(basename "${CONFIG%%:*}" .py)}"

if [[ ! -d .venv ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e .
  .venv/bin/pip install -q -U "jax[cuda12]"
fi
. .venv/bin/activate

# Leave GPU memory to JAX's allocator (the default preallocates 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
python -c "import jax; print('JAX devices:', jax.devices())"
exec python -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
