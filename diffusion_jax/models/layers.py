"""Layers of the official DDPM U-Net (Ho et al. 2020), NHWC, in Flax Linen.

Parameter names follow Flax (`kernel`, `bias`, `scale`) and the module names follow the
official TensorFlow variable scopes, so that an official variable `.../conv1/W` is the Flax
parameter `.../conv1/kernel` with the same shape (conv kernels HWIO, dense and 1x1 "nin"
kernels [in, out]).

The convolutions, GroupNorm(+swish) and dropout go through the `ops` attribute (an
`diffusion_jax.ops.Ops`: the pure-JAX reference by default, or a backend's kernels chosen
once by the kernel policy); everything else is plain JAX.

Mixed precision: parameters are always float32. With `dtype=bfloat16` activations and
matmul/conv inputs are bfloat16, products accumulate in float32, and GroupNorm statistics
and the attention softmax are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import ops as ops_lib

Dtype = Any
GROUP_NORM_EPSILON = 1e-6  # tf.contrib.layers.group_norm default; diffusers' DDPM norm_eps.


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The official `default_init`: fan-avg uniform variance scaling.

  Args:
    scale: variance scale; 0 means "near zero" and becomes 1e-10, as in the official code.

  Returns:
    An initializer drawing from U(-sqrt(3 s / fan_avg), +sqrt(3 s / fan_avg)), where for a
    kernel [..., in, out] fan_avg = (in + out) / 2 times the receptive field size (the
    product of the leading dimensions), as TF's variance_scaling(mode='fan_avg').
  """
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else float(scale), "fan_avg",
                                          "uniform")


class Conv3x3(nn.Module):
  """3x3 convolution with TF "SAME" padding (for stride 2: pads right/bottom only).

  Attributes:
    features: output channels.
    strides: 1 or 2.
    init_scale: `default_init` scale (0 for near-zero initialization).
    dtype: compute dtype.
    ops: the operations backend.
  """
  features: int
  strides: int = 1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', features]
    kernel = self.param("kernel", default_init(self.init_scale),
                        (3, 3, x.shape[-1], self.features), jnp.float32)  # HWIO
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = self.ops.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, bias)
    return y.astype(self.dtype)


class Dense(nn.Module):
  """Affine map of the last axis: the official `dense` ([B, C]) and `nin` ([B, H, W, C]).

  Attributes:
    features: output size.
    init_scale: `default_init` scale (0 for near-zero initialization).
    dtype: compute dtype.
    ops: the operations backend (its `conv1x1` for [B, H, W, C] inputs).
  """
  features: int
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., Cin] -> [..., features]
    kernel = self.param("kernel", default_init(self.init_scale),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if x.ndim == 4:  # [B, H, W, C]: a 1x1 convolution
      return self.ops.conv1x1(x.astype(self.dtype), kernel.astype(self.dtype),
                              bias).astype(self.dtype)
    y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return (y + bias).astype(self.dtype)


class GroupNorm(nn.Module):
  """Group normalization over (H, W, channels of the group), statistics in float32.

  `swish=True` fuses the activation that follows most normalizations of the network.

  Attributes:
    num_groups: number of channel groups (must divide the channel count).
    epsilon: added to the variance (1e-6 as the official code).
    dtype: output dtype.
    swish: apply swish to the output (the same as `nn.swish(GroupNorm(...)(x))`).
    ops: the operations backend.
  """
  num_groups: int = 32
  epsilon: float = GROUP_NORM_EPSILON
  dtype: Dtype = jnp.float32
  swish: bool = False
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by "
                       f"num_groups={self.num_groups}; choose num_groups dividing it.")
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    return self.ops.group_norm(x, scale, bias, num_groups=self.num_groups,
                               epsilon=self.epsilon, swish=self.swish,
                               out_dtype=self.dtype)


class Dropout(nn.Module):
  """Dropout drawing from the 'dropout' rng stream (the mask: see `ops.interface`).

  Attributes:
    rate: the probability of zeroing an element.
    deterministic: no dropout when True.
    ops: the operations backend.
  """
  rate: float
  deterministic: bool
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return self.ops.dropout(x, self.make_rng("dropout"), self.rate)


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """The official sinusoidal embedding: [sin(t f_i), cos(t f_i)], f_i = 10000^(-i/(half-1)).

  Args:
    t: [B] timesteps (any numeric dtype; computed in float32 as the official code).
    dim: embedding size (odd sizes get one zero column, as the official code).

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  if half < 2:
    raise ValueError(f"timestep_embedding needs dim >= 4, got {dim}.")
  exponent = math.log(10000.0) / (half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-exponent))  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)  # [B, 2 half]
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv, + dense(swish(temb)), GroupNorm-swish-dropout-conv, + shortcut.

  Attributes:
    out_ch: output channels; a 1x1 "nin_shortcut" maps the input when they differ.
    dropout: dropout rate before the second conv (train mode only).
    num_groups: GroupNorm groups.
    dtype: compute dtype.
    ops: the operations backend.
  """
  out_ch: int
  dropout: float
  num_groups: int
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, C], temb: [B, 4 ch] -> [B, H, W, out_ch]
    dtype, ops = self.dtype, self.ops
    h = GroupNorm(self.num_groups, dtype=dtype, swish=True, ops=ops, name="norm1")(x)
    h = Conv3x3(self.out_ch, dtype=dtype, ops=ops, name="conv1")(h)
    h = h + Dense(self.out_ch, dtype=dtype, ops=ops, name="temb_proj")(
        nn.swish(temb))[:, None, None, :]
    h = GroupNorm(self.num_groups, dtype=dtype, swish=True, ops=ops, name="norm2")(h)
    h = Dropout(self.dropout, deterministic=not train, ops=ops, name="Dropout_0")(h)
    h = Conv3x3(self.out_ch, init_scale=0.0, dtype=dtype, ops=ops, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = Dense(self.out_ch, dtype=dtype, ops=ops, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, scale C^-1/2, with a residual.

  Attributes:
    num_groups: GroupNorm groups.
    dtype: compute dtype (the softmax is always float32).
    ops: the operations backend.
  """
  num_groups: int
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
    batch, height, width, channels = x.shape
    dtype, ops = self.dtype, self.ops
    h = GroupNorm(self.num_groups, dtype=dtype, ops=ops, name="norm")(x)
    q = Dense(channels, dtype=dtype, ops=ops, name="q")(h).reshape(batch, -1, channels)
    k = Dense(channels, dtype=dtype, ops=ops, name="k")(h).reshape(batch, -1, channels)
    v = Dense(channels, dtype=dtype, ops=ops, name="v")(h).reshape(batch, -1, channels)
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (channels ** -0.5), axis=-1)  # [B, HW, HW] float32
    h = jnp.einsum("bij,bjc->bic", weights.astype(dtype), v,
                   preferred_element_type=jnp.float32).astype(dtype)
    h = h.reshape(batch, height, width, channels)
    h = Dense(channels, init_scale=0.0, dtype=dtype, ops=ops, name="proj_out")(h)
    return x + h


class Downsample(nn.Module):
  """Halves H and W: stride-2 3x3 conv (TF SAME padding) or 2x2 average pooling.

  Attributes:
    with_conv: conv (True) or average pooling (False).
    dtype: compute dtype.
    ops: the operations backend.
  """
  with_conv: bool
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
    batch, height, width, channels = x.shape
    if self.with_conv:
      return Conv3x3(channels, strides=2, dtype=self.dtype, ops=self.ops, name="conv")(x)
    pooled = x.astype(jnp.float32).reshape(
        batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
    return pooled.astype(self.dtype)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour x2, then a 3x3 conv when `with_conv`.

  Attributes:
    with_conv: follow the resize with a 3x3 conv.
    dtype: compute dtype.
    ops: the operations backend.
  """
  with_conv: bool
  dtype: Dtype = jnp.float32
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :],
                         (batch, height, 2, width, 2, channels))
    x = x.reshape(batch, 2 * height, 2 * width, channels)
    if self.with_conv:
      x = Conv3x3(channels, dtype=self.dtype, ops=self.ops, name="conv")(x)
    return x
