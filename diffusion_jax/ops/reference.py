"""The pure-JAX operations of the U-Net: the reference of every backend, and what runs on
TPU and GPU (see `ops.interface` for the contract).

Mixed precision: with bfloat16 inputs products accumulate in float32 and come out in
float32; the layers cast back to their compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.ops import group_norm as group_norm_lib

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for bfloat16/float16/float32 inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def same_padding(size: int, stride: int, window: int = 3) -> tuple[int, int]:
  """TF "SAME" padding (low, high) of one spatial axis; the extra pixel goes high."""
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def conv3x3_padding(x_shape, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The ((top, bottom), (left, right)) zeros of a 3x3 "SAME" convolution of x_shape."""
  return same_padding(x_shape[1], stride), same_padding(x_shape[2], stride)


def check_conv3x3(x: jax.Array, kernel: jax.Array, stride) -> None:
  """Raises ValueError for shapes or a stride `conv3x3` cannot take."""
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or (
      kernel.shape[2] != x.shape[-1]):
    raise ValueError(f"conv3x3 expects x [B, H, W, Cin] and kernel [3, 3, Cin, Cout]; got "
                     f"{tuple(x.shape)} and {tuple(kernel.shape)}.")
  if not isinstance(stride, int) or stride < 1:
    raise ValueError(f"stride must be a positive int, got {stride!r}.")


def check_conv1x1(x: jax.Array, kernel: jax.Array) -> None:
  """Raises ValueError for shapes `conv1x1` cannot take."""
  if x.ndim != 4 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(f"conv1x1 expects x [B, H, W, Cin] and kernel [Cin, Cout]; got "
                     f"{tuple(x.shape)} and {tuple(kernel.shape)}.")


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1,
            bias: jax.Array | None = None) -> jax.Array:
  """3x3 convolution with TF "SAME" padding (for stride 2 on even sizes: right/bottom).

  Args:
    x: [B, H, W, Cin].
    kernel: [3, 3, Cin, Cout] (HWIO) in x's dtype.
    stride: 1 or 2 (the same along H and W).
    bias: [Cout] added to the output, or None.

  Returns:
    [B, ceil(H / stride), ceil(W / stride), Cout] in float32 (float64 for float64 x).
  """
  check_conv3x3(x, kernel, stride)
  y = lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=conv3x3_padding(x.shape, stride),
      dimension_numbers=_DIMENSION_NUMBERS,
      preferred_element_type=accumulation_dtype(x.dtype))  # [B, H', W', Cout]
  return y if bias is None else y + bias.astype(y.dtype)


def conv1x1(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias per pixel (the official `nin`).

  Args:
    x: [B, H, W, Cin].
    kernel: [Cin, Cout] in x's dtype.
    bias: [Cout].

  Returns:
    [B, H, W, Cout] in float32 (float64 for float64 x).
  """
  check_conv1x1(x, kernel)
  y = lax.dot_general(x, kernel, (((3,), (0,)), ((), ())),
                      preferred_element_type=accumulation_dtype(x.dtype))
  return y + bias.astype(y.dtype)


def check_dropout_rate(rate: float) -> None:
  """Raises ValueError unless 0 <= rate < 1."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Zeroes each element with probability `rate` and scales the rest by 1 / (1 - rate).

  The mask is `jax.random.bernoulli(key, 1 - rate, (x.size,))` reshaped: the same mask as
  `flax.linen.Dropout` with that key (threefry's counters are the row-major element index
  for any shape), but the flat draw compiles several times faster on CPU. With JAX's
  partitionable threefry the bits do not depend on how x is sharded.

  Args:
    x: any shape, float dtype.
    key: a PRNG key.
    rate: in [0, 1).

  Returns:
    x's shape and dtype.
  """
  check_dropout_rate(rate)
  if rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.size,))
  return lax.select(mask.reshape(x.shape), x / keep, jnp.zeros_like(x))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int,
               epsilon: float, swish: bool = False, out_dtype=None) -> jax.Array:
  """GroupNorm(+swish) with the closed-form gradient (`ops.group_norm`), in pure JAX."""
  return group_norm_lib.group_norm(x, scale, bias, num_groups=num_groups, epsilon=epsilon,
                                   swish=swish, out_dtype=out_dtype,
                                   kernels=group_norm_lib.REFERENCE_KERNELS)
