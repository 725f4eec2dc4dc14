"""Device mesh and shardings for data parallelism over every device of every process.

One mesh axis, `data`, spans `jax.devices()` (all processes). Parameters, EMA parameters and
optimizer state are replicated; batches are split along their leading axis. The update is
`jax.jit` with these shardings declared (no `pmap`); XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
PyTree = Any


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with axis `data` over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that splits the leading (batch) axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "batch") -> int:
  """Returns the per-device batch, or raises a ValueError naming the fix.

  Args:
    global_batch_size: the batch over all devices and processes.
    mesh: the data-parallel mesh.
    what: the config field named in the message.
  """
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"{what}={global_batch_size} must be a positive multiple of the number of devices "
        f"({num_devices} over {jax.process_count()} process(es)); use e.g. "
        f"{what}={max(1, round(global_batch_size / num_devices)) * num_devices}.")
  return global_batch_size // num_devices


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Returns `tree` with every leaf placed fully on every device of `mesh`.

  Works across processes: each process must pass the same values (as it does after
  initializing from the same seed or restoring the same checkpoint).
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def _put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(_put, tree)


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """Returns a global array split over `data` from this process's slice of the batch.

  Args:
    array: this process's consecutive rows of the global batch (all rows when there is a
      single process), e.g. `[B_local, H, W, C]`.
    mesh: the data-parallel mesh.
  """
  sharding = batch_sharding(mesh)
  global_shape = (array.shape[0] * jax.process_count(),) + tuple(array.shape[1:])
  return jax.make_array_from_process_local_data(sharding, np.asarray(array), global_shape)
