"""Device mesh and shardings for data parallelism over every device of every process.

The project's one sharding vocabulary. One mesh axis, `DATA_AXIS`, spans `jax.devices()`
(all processes). Parameters, EMA parameters and optimizer state are replicated; batches
(and per-example vectors such as keys, indices and masks) are split along their leading
axis. Updates are `jax.jit` with these shardings declared (no `pmap`); XLA inserts the
gradient all-reduce.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
PyTree = Any


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with axis `DATA_AXIS` over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh | NamedSharding) -> NamedSharding:
  """The sharding of a global batch: its leading axis split over `DATA_AXIS`.

  Args:
    mesh: a mesh with the axis `DATA_AXIS`, or a NamedSharding of the batch (returned
      as it is).
  """
  if isinstance(mesh, NamedSharding):
    return mesh
  if not isinstance(mesh, Mesh):
    raise TypeError(f"Expected a jax.sharding.Mesh or NamedSharding, got {type(mesh)}.")
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"The mesh has axes {mesh.axis_names}; batches are split over an axis "
                     f"named {DATA_AXIS!r} (make it with sharding.make_mesh, or pass a "
                     "NamedSharding).")
  return NamedSharding(mesh, P(DATA_AXIS))


def rows_sharding(batch: NamedSharding) -> NamedSharding:
  """The sharding of a per-row vector [B] (keys, flips, masks) that goes with a batch
  sharded as `batch`."""
  axes = batch.spec[0] if len(batch.spec) else None
  return NamedSharding(batch.mesh, P(axes))


def check_batch_divisible(global_batch_size: int, mesh: Mesh | NamedSharding,
                          what: str = "batch") -> int:
  """Returns the per-device batch, or raises a ValueError naming the fix.

  The global batch must split evenly over the devices that share it and over the
  processes (each process feeds its own rows).

  Args:
    global_batch_size: the batch over all devices and processes.
    mesh: the data-parallel mesh, or a NamedSharding of the batch.
    what: the config field named in the message.
  """
  sharding = batch_sharding(mesh)
  spec0 = sharding.spec[0] if len(sharding.spec) else None
  axes = () if spec0 is None else (spec0,) if isinstance(spec0, str) else tuple(spec0)
  parts = math.prod(sharding.mesh.shape[a] for a in axes)
  for count, who in ((parts, f"{parts} devices that share the batch"),
                     (jax.process_count(), f"{jax.process_count()} processes")):
    if global_batch_size < 1 or global_batch_size % count:
      good = max(count, -(-global_batch_size // count) * count)
      fix = f"--config.{what}={good}" if "." in what and " " not in what else str(good)
      raise ValueError(
          f"{what}={global_batch_size} must be a positive multiple of the {who} "
          f"({jax.device_count()} device(s) in {jax.process_count()} process(es)); use "
          f"e.g. {fix}.")
  return global_batch_size // parts


def addressable_rows(batch: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, sorted (int64 [b]).

  `jax.make_array_from_process_local_data` maps a process's local batch onto these rows
  in order.
  """
  rows = set()
  for index in batch.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return np.array(sorted(rows), dtype=np.int64)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Returns `tree` with every leaf placed fully on every device of `mesh`.

  Works across processes: each process must pass the same values (as it does after
  initializing from the same seed or restoring the same checkpoint).
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(lambda x: put_global(x, sharding), tree)


def put_global(array, sharding: NamedSharding) -> jax.Array:
  """Places a host array that every process holds in full (the same values everywhere)
  with `sharding`; each process fills only its own devices."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def put_rows(array, mesh: Mesh) -> jax.Array:
  """`put_global` split over `DATA_AXIS` along the leading axis (e.g. sample indices)."""
  return put_global(array, batch_sharding(mesh))


def replicated_value(x: jax.Array) -> np.ndarray:
  """A replicated jax.Array as a NumPy array on this host (its first local copy; every
  process holds the full value)."""
  return np.asarray(x.addressable_data(0))
