"""GroupNorm (+ swish) on CPU through this project's compiled kernels.

`norm.group_norm` computes the normalization with XLA: per-channel reductions and the
closed-form gradient, each a pass over the tensor, some of them on one thread. On CPU
that chain cost a train step of the CIFAR10 network at batch 32 several hundred
milliseconds (`benchmarks/RESULTS.md`). `diffusion_jax/native/group_norm.cc` computes the
same formulas in three passes forwards (mean, variance, output) and two backwards per
image while it is in the cache, the batch shared over XLA's threads; it is compiled into
the library of the oneDNN convolutions (`onednn.build`) and used where they are
(`conv.onednn_enabled`: CPU, float32, one device unless `conv.cpu_library` says
otherwise).

Reverse-mode differentiation (grad, vjp, under vmap); no forward mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import onednn

_FORWARD = "diffusion_jax_group_norm_forward"
_BACKWARD = "diffusion_jax_group_norm_backward"


def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
            epsilon: float, swish: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean [B, G], rstd [B, G]) for float32 x [B, ..., C] and scale, bias [C]."""
  groups = (x.shape[0], num_groups)
  return onednn.ffi_call(_FORWARD, (x.shape, groups, groups), x, scale, bias,
                         groups=np.int64(num_groups), epsilon=np.float32(epsilon),
                         swish=np.int64(swish))


def backward(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
             rstd: jax.Array, g: jax.Array, num_groups: int,
             swish: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, dscale, dbias) for the output cotangent g of `forward`."""
  return onednn.ffi_call(_BACKWARD, (x.shape, scale.shape, bias.shape), x, scale, bias,
                         mean, rstd, g, groups=np.int64(num_groups),
                         swish=np.int64(swish))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, swish):
  return forward(x, scale, bias, num_groups, epsilon, swish)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish):
  y, mean, rstd = forward(x, scale, bias, num_groups, epsilon, swish)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, residuals, g):
  del epsilon
  x, scale, bias, mean, rstd = residuals
  return backward(x, scale, bias, mean, rstd, g.astype(jnp.float32), num_groups, swish)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
               epsilon: float, swish: bool = False) -> jax.Array:
  """GroupNorm over (H, W, channels of a group), affine, then swish if asked (float32).

  Args:
    x: [B, ..., C] float32.
    scale, bias: [C] float32.
    num_groups: G, must divide C.
    epsilon: added to the variance.
    swish: apply a * sigmoid(a) to the normalized output a.

  Returns:
    float32, x's shape.
  """
  if x.dtype != jnp.float32 or x.ndim < 2 or x.shape[-1] % num_groups:
    raise ValueError(f"native_norm.group_norm takes float32 x [B, ..., C] with C "
                     f"divisible by num_groups={num_groups}; got {x.dtype} "
                     f"{tuple(x.shape)}.")
  return _group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                     int(num_groups), float(epsilon), bool(swish))
