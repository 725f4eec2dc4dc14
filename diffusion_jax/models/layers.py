"""Layers of the official DDPM U-Net (Ho et al. 2020), NHWC, in Flax Linen.

Parameter names follow Flax (`kernel`, `bias`, `scale`) and the module names follow the
official TensorFlow variable scopes, so that an official variable `.../conv1/W` is the Flax
parameter `.../conv1/kernel` with the same shape (conv kernels HWIO, dense and 1x1 "nin"
kernels [in, out]).

Mixed precision: parameters are always float32. With `dtype=bfloat16` activations and
matmul/conv inputs are bfloat16, products accumulate in float32, and GroupNorm statistics
and the attention softmax are computed in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import conv
from diffusion_jax.models import native_dropout
from diffusion_jax.models import norm

Dtype = Any
GROUP_NORM_EPSILON = 1e-6  # tf.contrib.layers.group_norm default; diffusers' DDPM norm_eps.


class _UniformPool:
  """Consecutive slices of a single U(-1, 1) draw, handed out in request order."""

  def __init__(self, key: jax.Array, size: int):
    self.noise = jax.random.uniform(key, (size,), jnp.float32, -1.0, 1.0)  # [size]
    self.offset = 0

  def take(self, shape: tuple[int, ...]) -> jax.Array:
    size = math.prod(shape)
    if self.offset + size > self.noise.shape[0]:
      raise ValueError("The pooled initialization noise is smaller than the parameters.")
    out = self.noise[self.offset:self.offset + size].reshape(shape)
    self.offset += size
    return out


_POOL: contextvars.ContextVar[_UniformPool | None] = contextvars.ContextVar(
    "uniform_pool", default=None)


@contextlib.contextmanager
def pooled_init_noise(key: jax.Array, size: int) -> Iterator[_UniformPool]:
  """Within the context, `default_init` kernels take their noise from one draw.

  Compiling one random-number program per parameter costs about a second each on a CPU
  (minutes for a U-Net); one draw of all `size` kernel entries compiles once. The
  distribution of every kernel is unchanged.

  Args:
    key: PRNG key of the single draw.
    size: total number of kernel entries that will be initialized.

  Yields:
    The pool (its `offset` tells how much was used).
  """
  pool = _UniformPool(key, size)
  token = _POOL.set(pool)
  try:
    yield pool
  finally:
    _POOL.reset(token)


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The official `default_init`: fan-avg uniform variance scaling.

  Args:
    scale: variance scale; 0 means "near zero" and becomes 1e-10, as in the official code.

  Returns:
    An initializer drawing from U(-sqrt(3 s / fan_avg), +sqrt(3 s / fan_avg)), where for a
    kernel [..., in, out] fan_avg = (in + out) / 2 times the receptive field size (the
    product of the leading dimensions), as TF's variance_scaling(mode='fan_avg').
  """
  scale = 1e-10 if scale == 0 else float(scale)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    receptive = math.prod(shape[:-2])
    fan_avg = receptive * (shape[-2] + shape[-1]) / 2
    limit = math.sqrt(3.0 * scale / fan_avg)
    pool = _POOL.get()
    noise = (jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) if pool is None
             else pool.take(tuple(shape)))
    return (limit * noise).astype(dtype)

  return init


class Conv3x3(nn.Module):
  """3x3 convolution with TF "SAME" padding (for stride 2: pads right/bottom only).

  The only spatial convolution of the network. It runs through `conv.conv3x3` (JAX's own
  derivative by default; nine shifted matrix products for the kernel gradient on request).

  Attributes:
    features: output channels.
    strides: 1 or 2.
    init_scale: `default_init` scale (0 for near-zero initialization).
    dtype: compute dtype.
  """
  features: int
  strides: int = 1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', features]
    kernel = self.param("kernel", default_init(self.init_scale),
                        (3, 3, x.shape[-1], self.features), jnp.float32)  # HWIO
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = conv.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                     bias=bias)
    return y.astype(self.dtype)


class Dense(nn.Module):
  """Affine map of the last axis: the official `dense` ([B, C]) and `nin` ([B, H, W, C]).

  Attributes:
    features: output size.
    init_scale: `default_init` scale (0 for near-zero initialization).
    dtype: compute dtype.
  """
  features: int
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., Cin] -> [..., features]
    kernel = self.param("kernel", default_init(self.init_scale),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if x.ndim == 4:  # [B, H, W, C]: a 1x1 convolution (through oneDNN on CPU)
      return conv.conv1x1(x.astype(self.dtype), kernel.astype(self.dtype),
                          bias).astype(self.dtype)
    y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return (y + bias).astype(self.dtype)


class GroupNorm(nn.Module):
  """Group normalization over (H, W, channels of the group), statistics in float32.

  Computed by `norm.group_norm` (per-channel reductions and a closed-form gradient, much
  faster on CPU than autodiff of the textbook form); `swish=True` fuses the activation
  that follows most normalizations of the network.

  Attributes:
    num_groups: number of channel groups (must divide the channel count).
    epsilon: added to the variance (1e-6 as the official code).
    dtype: output dtype.
    swish: apply swish to the output (the same as `nn.swish(GroupNorm(...)(x))`).
  """
  num_groups: int = 32
  epsilon: float = GROUP_NORM_EPSILON
  dtype: Dtype = jnp.float32
  swish: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by "
                       f"num_groups={self.num_groups}; choose num_groups dividing it.")
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    return norm.group_norm(x, scale, bias, num_groups=self.num_groups,
                           epsilon=self.epsilon, swish=self.swish, out_dtype=self.dtype)


class Dropout(nn.Module):
  """`nn.Dropout` with its mask drawn as one flat vector and reshaped.

  The same masks as `nn.Dropout` under the same name (the same key, and threefry's
  counters are the row-major element index for any shape), but the flat draw compiles
  several times faster on CPU (it removed about 20 s from the CIFAR10 train step's
  compilation). On CPU, for float32, where the oneDNN convolutions are used
  (`conv.onednn_enabled`), the compiled kernel of `native_dropout` draws and applies the
  mask instead (Philox from the same key: other masks, several times faster).

  Attributes:
    rate: the probability of zeroing an element.
    deterministic: no dropout when True.
  """
  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    if x.dtype == jnp.float32 and conv.onednn_enabled(jnp.float32):
      return native_dropout.dropout(x, self.make_rng("dropout"), self.rate)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.size,))
    return lax.select(mask.reshape(x.shape), x / keep, jnp.zeros_like(x))


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
  """
  out_ch: int
  dropout: float
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, C], temb: [B, 4 ch] -> [B, H, W, out_ch]
    h = GroupNorm(self.num_groups, dtype=self.dtype, swish=True, name="norm1")(x)
    h = Conv3x3(self.out_ch, dtype=self.dtype, name="conv1")(h)
    h = h + Dense(self.out_ch, dtype=self.dtype, name="temb_proj")(
        nn.swish(temb))[:, None, None, :]
    h = GroupNorm(self.num_groups, dtype=self.dtype, swish=True, name="norm2")(h)
    h = Dropout(self.dropout, deterministic=not train, name="Dropout_0")(h)
    h = Conv3x3(self.out_ch, init_scale=0.0, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = Dense(self.out_ch, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, scale C^-1/2, with a residual.

  Attributes:
    num_groups: GroupNorm groups.
    dtype: compute dtype (the softmax is always float32).
  """
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
    batch, height, width, channels = x.shape
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    q = Dense(channels, dtype=self.dtype, name="q")(h).reshape(batch, -1, channels)
    k = Dense(channels, dtype=self.dtype, name="k")(h).reshape(batch, -1, channels)
    v = Dense(channels, dtype=self.dtype, name="v")(h).reshape(batch, -1, channels)
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (channels ** -0.5), axis=-1)  # [B, HW, HW] float32
    h = jnp.einsum("bij,bjc->bic", weights.astype(self.dtype), v,
                   preferred_element_type=jnp.float32).astype(self.dtype)
    h = h.reshape(batch, height, width, channels)
    h = Dense(channels, init_scale=0.0, dtype=self.dtype, name="proj_out")(h)
    return x + h


class Downsample(nn.Module):
  """Halves H and W: stride-2 3x3 conv (TF SAME padding) or 2x2 average pooling.

  Attributes:
    with_conv: conv (True) or average pooling (False).
    dtype: compute dtype.
  """
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
    batch, height, width, channels = x.shape
    if self.with_conv:
      return Conv3x3(channels, strides=2, dtype=self.dtype, name="conv")(x)
    pooled = x.astype(jnp.float32).reshape(
        batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
    return pooled.astype(self.dtype)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour x2, then a 3x3 conv when `with_conv`.

  Attributes:
    with_conv: follow the resize with a 3x3 conv.
    dtype: compute dtype.
  """
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :],
                         (batch, height, 2, width, 2, channels))
    x = x.reshape(batch, 2 * height, 2 * width, channels)
    if self.with_conv:
      x = Conv3x3(channels, dtype=self.dtype, name="conv")(x)
    return x
