"""Group normalization (optionally followed by swish) with a hand-written gradient.

Autodiff of the textbook GroupNorm reduces over (H, W, channels of the group) of a
[B, H, W, G, C/G] view, several times forwards and backwards; on CPU those strided
reductions and the stored intermediates cost as much as a third of the U-Net's
convolution time (benchmarks/RESULTS.md). Here every reduction is a per-channel sum over
the pixels (contiguous in the channel axis) followed by a tiny sum within each group, and
the backward pass is the closed form

  x_hat = (x - mean) * rstd,   dy = g * swish'(a) with a = x_hat * scale + bias,
  dscale = sum_{b,h,w} dy x_hat,   dbias = sum_{b,h,w} dy,
  dx = rstd * (dy scale - mean_group(dy scale) - x_hat mean_group(dy scale x_hat)),

which reads x and g twice and keeps only the per-group statistics (and the input, which
the caller holds anyway) for the backward pass: nothing of the normalized or activated
tensor is stored. Statistics and arithmetic are float32 (float64 for float64 input);
the output has the input's dtype unless `out_dtype` says otherwise.

Supports reverse-mode differentiation (grad, vjp, vmap), not forward mode (jvp).

On CPU, for float32, where the oneDNN convolutions are used (`conv.onednn_enabled`), the
same formulas run as compiled kernels instead (`native_norm`: three passes per image
forwards and two backwards, on XLA's threads; about twice as fast as this XLA version at
the U-Net's sizes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import conv
from diffusion_jax.models import native_norm


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _group_sum(per_channel: jax.Array, num_groups: int) -> jax.Array:
  """[B, C] -> [B, 1, C]: each channel gets the sum over the channels of its group."""
  batch, channels = per_channel.shape
  sums = per_channel.reshape(batch, num_groups, channels // num_groups).sum(-1)  # [B, G]
  return jnp.repeat(sums, channels // num_groups, axis=1)[:, None, :]


def _statistics(x: jax.Array, num_groups: int, epsilon: float):
  """Per-group mean and 1/std broadcast to channels: ([B, 1, C], [B, 1, C]); x [B, N, C]."""
  count = x.shape[1] * (x.shape[2] // num_groups)
  mean = _group_sum(x.sum(axis=1), num_groups) / count
  var = _group_sum(jnp.square(x - mean).sum(axis=1), num_groups) / count  # two-pass
  return mean, lax.rsqrt(var + epsilon)


def _forward(x, scale, bias, num_groups, epsilon, swish, out_dtype):
  shape = x.shape
  cdt = _compute_dtype(x.dtype)
  xs = x.astype(cdt).reshape(shape[0], -1, shape[-1])  # [B, N = H W, C]
  mean, rstd = _statistics(xs, num_groups, epsilon)
  a = (xs - mean) * (rstd * scale.astype(cdt)) + bias.astype(cdt)
  y = a * jax.nn.sigmoid(a) if swish else a
  return y.reshape(shape).astype(out_dtype or x.dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, num_groups, epsilon, swish, out_dtype):
  return _forward(x, scale, bias, num_groups, epsilon, swish, out_dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish, out_dtype):
  y, (mean, rstd) = _forward(x, scale, bias, num_groups, epsilon, swish, out_dtype)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, out_dtype, residuals, g):
  del epsilon, out_dtype
  x, scale, bias, mean, rstd = residuals
  shape = x.shape
  cdt = _compute_dtype(x.dtype)
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


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
               epsilon: float, swish: bool = False, out_dtype=None) -> jax.Array:
  """GroupNorm over (H, W, channels of a group), affine, then swish if asked.

  Args:
    x: [B, H, W, C] (any float dtype; statistics in float32 or float64).
    scale: [C] the affine scale (gamma).
    bias: [C] the affine shift (beta).
    num_groups: G, must divide C.
    epsilon: added to the variance.
    swish: apply x * sigmoid(x) to the normalized output.
    out_dtype: the output dtype (default: x's).

  Returns:
    [B, H, W, C].
  """
  if x.ndim < 2 or x.shape[-1] % num_groups:
    raise ValueError(f"group_norm: {x.shape[-1]} channels of x {tuple(x.shape)} are not "
                     f"divisible by num_groups={num_groups}.")
  out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
  if (x.dtype == jnp.float32 and out_dtype in (None, jnp.float32)
      and conv.onednn_enabled(jnp.float32)):
    return native_norm.group_norm(x, scale, bias, num_groups=num_groups, epsilon=epsilon,
                                  swish=swish)
  return _group_norm(x, scale, bias, int(num_groups), float(epsilon), bool(swish),
                     out_dtype)
