"""GroupNorm (+ swish) kernels on CPU (`csrc/group_norm.cc`), for `ops.group_norm`.

The same formulas as the pure-JAX reference kernels of `ops.group_norm` (which XLA runs
as several passes over the tensor, some on one thread), computed per image in three
passes forwards (mean, variance, output; statistics in double) and two backwards while
the image is in the cache, the batch shared out over XLA's threads. About twice as fast
as XLA's version at the U-Net's sizes. float32 only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.backends.cpu import library
from diffusion_jax.ops import group_norm as group_norm_lib

_FORWARD = "diffusion_jax_group_norm_forward"
_BACKWARD = "diffusion_jax_group_norm_backward"


def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
            epsilon: float, swish: bool, out_dtype=None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean [B, G], rstd [B, G]) for float32 x [B, ..., C] and scale, bias [C]."""
  if x.dtype != jnp.float32 or out_dtype not in (None, jnp.float32):
    raise ValueError(f"the CPU GroupNorm kernel takes float32 x and output; got {x.dtype} "
                     f"-> {out_dtype}.")
  groups = (x.shape[0], num_groups)
  return library.ffi_call(_FORWARD, (x.shape, groups, groups), x,
                          scale.astype(jnp.float32), bias.astype(jnp.float32),
                          groups=np.int64(num_groups), epsilon=np.float32(epsilon),
                          swish=np.int64(swish))


def backward(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
             rstd: jax.Array, g: jax.Array, num_groups: int,
             swish: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, dscale, dbias) for the output cotangent g of `forward`."""
  return library.ffi_call(_BACKWARD, (x.shape, scale.shape, bias.shape), x,
                          scale.astype(jnp.float32), bias.astype(jnp.float32), mean, rstd,
                          g.astype(jnp.float32), groups=np.int64(num_groups),
                          swish=np.int64(swish))


KERNELS = group_norm_lib.GroupNormKernels(forward, backward)


def applies(x: jax.Array, out_dtype) -> bool:
  """Whether the kernels take this call (float32 in and out); else the reference's run."""
  return x.dtype == jnp.float32 and (out_dtype is None or
                                     jnp.dtype(out_dtype) == jnp.float32)
