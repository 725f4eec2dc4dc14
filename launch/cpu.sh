#!/usr/bin/env bash
# Train on the CPU of this machine.
#
#   bash launch/cpu.sh                                  # the digits quickstart (< 5 min, 2 cores)
#   CONFIG=configs/mnist.py WORKDIR=workdirs/mnist bash launch/cpu.sh
#   CONFIG=configs/cifar10.py:smoke bash launch/cpu.sh  # any config, shrunk to a smoke run
#
# FAKE_DEVICES=8 splits the CPU into 8 XLA devices: the same data-parallel program as on
# 8 accelerators (useful to try sharding; it does not make training faster).
# Extra arguments are passed to diffusion_jax.main (e.g. --config.training.num_train_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/digits.py}"
WORKDIR="${WORKDIR:-workdirs/$(basename "${CONFIG%%:*}" .py)}"
FAKE_DEVICES="${FAKE_DEVICES:-}"

if [[ ! -d .venv ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e .
fi
. .venv/bin/activate

export JAX_PLATFORMS=cpu
if [[ -n "$FAKE_DEVICES" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_DEVICES"
fi
exec python -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
