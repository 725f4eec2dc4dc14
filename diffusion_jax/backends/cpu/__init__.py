"""The CPU backend: compiled kernels for the U-Net's replaceable operations.

Loaded by the kernel policy (`diffusion_jax.ops.policy`) only when it picks `native`.
`make_ops(mesh)` returns the `Ops` whose float32 operations run through the compiled
library (`library`: built once per machine from `csrc/`): oneDNN and Winograd
convolutions (`conv`), GroupNorm(+swish) (`group_norm`) and dropout (`dropout`) kernels,
each applied per device shard of the batch (`per_shard`), and the XLA:CPU compiler options
(`compiler_options`). Other dtypes (bfloat16 compute) take the pure-JAX reference
operations. `host_memory` sets glibc's malloc for CPU jobs (called by `main` before JAX
starts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion_jax.backends.cpu import compiler_options as compiler_options_lib
from diffusion_jax.backends.cpu import conv as conv_lib
from diffusion_jax.backends.cpu import dropout as dropout_lib
from diffusion_jax.backends.cpu import group_norm as group_norm_lib
from diffusion_jax.backends.cpu import library
from diffusion_jax.backends.cpu import per_shard as per_shard_lib
from diffusion_jax.ops import group_norm as ops_group_norm
from diffusion_jax.ops import reference
from diffusion_jax.ops.interface import Ops

_NO_PADDING = ((0, 0), (0, 0))


def unavailable_reason() -> str | None:
  """None when the compiled kernels can be used here; else why not (builds them once)."""
  return library.unavailable_reason()


def _both_float32(*arrays: jax.Array) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays)


@functools.lru_cache(maxsize=None)
def make_ops(mesh: Mesh, *, winograd: bool = True, compiler_options: bool = True) -> Ops:
  """The CPU backend's `Ops` for programs over `mesh` (one axis, `sharding.DATA_AXIS`).

  Args:
    mesh: the program's data-parallel mesh of CPU devices.
    winograd: let the 3x3 stride-1 convolutions use Winograd's F(2x2, 3x3) where it pays
      (`conv.use_winograd`); False keeps oneDNN's direct convolutions for all.
    compiler_options: compile the programs with `compiler_options.options()`.

  Raises:
    library.KernelsUnavailable: the compiled library cannot be built or loaded.
  """
  reason = library.unavailable_reason()
  if reason is not None:
    raise library.KernelsUnavailable(reason)
  algorithm = "auto" if winograd else "direct"

  def conv3x3(x, kernel, stride=1, bias=None):
    reference.check_conv3x3(x, kernel, stride)
    if not _both_float32(x, kernel):
      return reference.conv3x3(x, kernel, stride, bias)
    padding = reference.conv3x3_padding(x.shape, stride)
    bias = jnp.zeros(kernel.shape[-1:], jnp.float32) if bias is None else bias
    run = lambda x, k, b: conv_lib.conv(x, k, stride, padding, b, algorithm)
    return per_shard_lib.per_shard(run, mesh, (0,))(x, kernel, bias.astype(jnp.float32))

  def conv1x1(x, kernel, bias):
    reference.check_conv1x1(x, kernel)
    if not _both_float32(x, kernel):
      return reference.conv1x1(x, kernel, bias)
    run = lambda x, k, b: conv_lib.conv(x, k[None, None], 1, _NO_PADDING, b, "direct")
    return per_shard_lib.per_shard(run, mesh, (0,))(x, kernel, bias.astype(jnp.float32))

  def group_norm(x, scale, bias, *, num_groups, epsilon, swish=False, out_dtype=None):
    if not group_norm_lib.applies(x, out_dtype):
      return reference.group_norm(x, scale, bias, num_groups=num_groups, epsilon=epsilon,
                                  swish=swish, out_dtype=out_dtype)
    run = lambda x, s, b: ops_group_norm.group_norm(
        x, s, b, num_groups=num_groups, epsilon=epsilon, swish=swish,
        kernels=group_norm_lib.KERNELS)
    if x.ndim < 2 or x.shape[-1] % num_groups:  # the same message as the reference's
      return run(x, scale, bias)
    return per_shard_lib.per_shard(run, mesh, (0,))(x, scale, bias)

  def dropout(x, key, rate):
    if x.dtype != jnp.float32:
      return reference.dropout(x, key, rate)
    reference.check_dropout_rate(rate)
    run = lambda x, k: dropout_lib.dropout(x, k, rate, shard=per_shard_lib.shard_index(mesh))
    return per_shard_lib.per_shard(run, mesh, (0,))(x, key)

  options = compiler_options_lib.options() if compiler_options else {}
  convolutions = "oneDNN" + (" (3x3 stride 1 by Winograd F(2x2, 3x3) where it pays)"
                             if winograd else "")
  return Ops(
      name="native", conv3x3=conv3x3, conv1x1=conv1x1, group_norm=group_norm,
      dropout=dropout, compiler_options=tuple(sorted(options.items())),
      description=(f"CPU backend: float32 convolutions through {convolutions}, compiled "
                   f"GroupNorm and dropout kernels, per shard over {mesh.devices.size} "
                   f"device(s); XLA:CPU options {options or 'none'}"))
