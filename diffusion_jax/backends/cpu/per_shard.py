"""Running the CPU kernels on each device's rows of the batch (`jax.shard_map`).

The compiled kernels are XLA custom calls without a sharding rule: in a program
partitioned over several devices XLA could only gather their operands onto one device.
`per_shard` runs them under `jax.shard_map` instead: each device applies the kernel to its
rows of the batch (the leading axis, split over the mesh's data axis) with the replicated
operands (kernels, biases, GroupNorm scales, keys) in full; the gradients of the
replicated operands are summed over the devices by `shard_map`'s transpose. On a
one-device mesh the kernel is called directly.

A batch that does not divide by the number of devices (e.g. a sample grid of 4 images on
8 devices) is padded with zero rows to the next multiple, and the padding is dropped.
Padding rows come after every real row, so their presence changes no real row's global
position (dropout masks) and, having a zero cotangent, no gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from diffusion_jax import sharding


def shard_index(mesh: Mesh):
  """Inside a function run by `per_shard`: this device's index along the data axis
  (0 on a one-device mesh)."""
  if mesh.devices.size == 1:
    return 0
  return jax.lax.axis_index(sharding.DATA_AXIS)


def per_shard(fn: Callable, mesh: Mesh, batched: Sequence[int]) -> Callable:
  """`fn` applied per device to the rows of its batched arguments.

  Args:
    fn: fn(*args) -> one array whose leading axis is the batch of the batched arguments
      (a batched argument of rank 0 has no batch: `fn` is then called as it is).
    mesh: the program's one-axis data-parallel mesh (`sharding.make_mesh`).
    batched: positions of the arguments whose leading axis is the batch; the others are
      replicated.

  Returns:
    A function of the same arguments and result.
  """
  num_devices = mesh.devices.size
  if num_devices == 1:
    return fn
  batched = tuple(batched)

  def run(*args):
    if jnp.ndim(args[batched[0]]) == 0:
      return fn(*args)
    rows = args[batched[0]].shape[0]
    pad = -rows % num_devices
    if pad:
      args = tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if i in batched else a
                   for i, a in enumerate(args))
    specs = tuple(P(sharding.DATA_AXIS) if i in batched else P() for i in range(len(args)))
    out = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(sharding.DATA_AXIS),
                        check_vma=False)(*args)
    return out[:rows] if pad else out

  return run
