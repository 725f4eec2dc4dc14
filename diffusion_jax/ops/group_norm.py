"""Group normalization (optionally followed by swish) with its closed-form gradient.

One `jax.custom_vjp` for every backend: a backend supplies the two kernels
(`GroupNormKernels`: forward with the statistics, backward from them); the pure-JAX ones
here are the reference. Autodiff of the textbook GroupNorm reduces over (H, W, channels
of the group) several times forwards and backwards; here every reduction is a
per-channel sum over the pixels followed by a tiny sum within each group, and the
backward pass is the closed form

  x_hat = (x - mean) * rstd,   dy = g * swish'(a) with a = x_hat * scale + bias,
  dscale = sum_{b,h,w} dy x_hat,   dbias = sum_{b,h,w} dy,
  dx = rstd * (dy scale - mean_group(dy scale) - x_hat mean_group(dy scale x_hat)),

which keeps only the per-group statistics (and the input, which the caller holds anyway)
for the backward pass. Statistics and arithmetic are float32 (float64 for float64 input).

Reverse-mode differentiation (grad, vjp, also under vmap); no forward mode (jvp).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class GroupNormKernels(NamedTuple):
  """A backend's GroupNorm kernels.

  forward(x [B, ..., C], scale [C], bias [C], num_groups, epsilon, swish, out_dtype)
      -> (y like x in out_dtype, mean, rstd): the statistics in whatever layout the
      backward kernel takes.
  backward(x, scale, bias, mean, rstd, g, num_groups, swish) -> (dx, dscale, dbias).
  """
  forward: Callable
  backward: Callable


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the statistics and arithmetic: float32, or float64 for float64 input."""
  return jnp.promote_types(dtype, jnp.float32)


def _group_sum(per_channel: jax.Array, num_groups: int) -> jax.Array:
  """[B, C] -> [B, 1, C]: each channel gets the sum over the channels of its group."""
  batch, channels = per_channel.shape
  sums = per_channel.reshape(batch, num_groups, channels // num_groups).sum(-1)  # [B, G]
  return jnp.repeat(sums, channels // num_groups, axis=1)[:, None, :]


def _reference_forward(x, scale, bias, num_groups, epsilon, swish, out_dtype):
  shape = x.shape
  cdt = compute_dtype(x.dtype)
  xs = x.astype(cdt).reshape(shape[0], -1, shape[-1])  # [B, N = H W, C]
  count = xs.shape[1] * (xs.shape[2] // num_groups)
  mean = _group_sum(xs.sum(axis=1), num_groups) / count  # [B, 1, C]
  var = _group_sum(jnp.square(xs - mean).sum(axis=1), num_groups) / count  # two-pass
  rstd = lax.rsqrt(var + epsilon)  # [B, 1, C]
  a = (xs - mean) * (rstd * scale.astype(cdt)) + bias.astype(cdt)
  y = a * jax.nn.sigmoid(a) if swish else a
  return y.reshape(shape).astype(out_dtype or x.dtype), mean, rstd


def _reference_backward(x, scale, bias, mean, rstd, g, num_groups, swish):
  shape = x.shape
  cdt = compute_dtype(x.dtype)
  xs = x.astype(cdt).reshape(shape[0], -1, shape[-1])  # [B, N, C]
  gs = g.astype(cdt).reshape(xs.shape)
  scale_c, bias_c = scale.astype(cdt), bias.astype(cdt)
  x_hat = (xs - mean) * rstd
  if swish:
    a = x_hat * scale_c + bias_c
    sig = jax.nn.sigmoid(a)
    gs = gs * (sig * (1.0 + a * (1.0 - sig)))  # d swish(a) / da
  sum_g = gs.sum(axis=1)  # [B, C]
  sum_gx = (gs * x_hat).sum(axis=1)  # [B, C]
  count = xs.shape[1] * (xs.shape[2] // num_groups)
  mean_g = _group_sum(sum_g * scale_c, num_groups) / count  # [B, 1, C]
  mean_gx = _group_sum(sum_gx * scale_c, num_groups) / count
  dx = rstd * (gs * scale_c - mean_g - x_hat * mean_gx)
  return (dx.reshape(shape).astype(x.dtype), sum_gx.sum(0).astype(scale.dtype),
          sum_g.sum(0).astype(bias.dtype))


REFERENCE_KERNELS = GroupNormKernels(_reference_forward, _reference_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _group_norm(x, scale, bias, num_groups, epsilon, swish, out_dtype, kernels):
  return kernels.forward(x, scale, bias, num_groups, epsilon, swish, out_dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish, out_dtype, kernels):
  y, mean, rstd = kernels.forward(x, scale, bias, num_groups, epsilon, swish, out_dtype)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, out_dtype, kernels, residuals, g):
  del epsilon, out_dtype
  x, scale, bias, mean, rstd = residuals
  return kernels.backward(x, scale, bias, mean, rstd, g, num_groups, swish)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
               epsilon: float, swish: bool = False, out_dtype=None,
               kernels: GroupNormKernels = REFERENCE_KERNELS) -> jax.Array:
  """GroupNorm over (H, W, channels of a group), affine, then swish if asked.

  Args:
    x: [B, H, W, C] (any float dtype; statistics in float32 or float64).
    scale: [C] the affine scale (gamma).
    bias: [C] the affine shift (beta).
    num_groups: G, must divide C.
    epsilon: added to the variance.
    swish: apply a * sigmoid(a) to the normalized output a.
    out_dtype: the output dtype (default: x's).
    kernels: the backend's kernels (default: the pure-JAX reference).

  Returns:
    [B, H, W, C].
  """
  if x.ndim < 2 or x.shape[-1] % num_groups:
    raise ValueError(f"group_norm: {x.shape[-1]} channels of x {tuple(x.shape)} are not "
                     f"divisible by num_groups={num_groups}.")
  out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
  return _group_norm(x, scale, bias, int(num_groups), float(epsilon), bool(swish),
                     out_dtype, kernels)
