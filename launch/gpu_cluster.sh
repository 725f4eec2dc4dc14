#!/usr/bin/env bash
# Train over several GPU hosts: run this script once on every host (by hand, pdsh, or as
# the body of a SLURM job step with one task per node).
#
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 bash launch/gpu_cluster.sh  # host 0
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=1 bash launch/gpu_cluster.sh  # host 1 ...
#
# Under SLURM, PROCESS_ID and NUM_PROCESSES default to SLURM_PROCID and SLURM_NTASKS.
# COORDINATOR is host:port of process 0, reachable from every host. WORKDIR must be on a
# file system that every host sees (checkpoints are written collectively).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/cifar10.py}"
WORKDIR="${WORKDIR:?set WORKDIR to a directory on a shared file system}"
COORDINATOR="${COORDINATOR:?set COORDINATOR=host:port of process 0}"
NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:?set NUM_PROCESSES}}"
PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:?set PROCESS_ID}}"

if [[ ! -d .venv ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e .
  .venv/bin/pip install -q -U "jax[cuda12]"
fi
. .venv/bin/activate

exec python -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
  --coordinator_address "$COORDINATOR" --num_processes "$NUM_PROCESSES" \
  --process_id "$PROCESS_ID" "$@"
