"""Float32 convolutions on CPU through oneDNN (the library PyTorch's CPU convolutions use),
the 3x3 stride-1 ones by Winograd's F(2x2, 3x3) where it pays.

XLA:CPU's own convolutions are slower than oneDNN's on every shape of the U-Net (timed
alone: 10%-20% on the large maps, up to 3x on strided ones and those with three
channels; `python -m benchmarks.conv_breakdown`). `conv` is a `jax.custom_vjp` of NHWC
images, HWIO kernels and a bias per output channel whose forward and gradients are the
FFI handlers of `csrc/onednn_conv.cc` (the bias added, and its gradient summed, inside
oneDNN's own passes). The 3x3 stride-1 convolutions with enough channels and tiles are
computed by Winograd's F(2x2, 3x3) instead (`csrc/winograd.cc`: transforms of 4x4 input
blocks, 16 matrix products over the channels through oneDNN's sgemm, 2.25x fewer
multiplications than the direct convolution; this oneDNN build has no Winograd kernels of
its own). For finite inputs the values differ by float32 rounding only (an inf input
gives NaN outputs around it, where the direct convolution gives infs: the transforms
subtract inputs).

Reverse-mode differentiation only (grad, vjp, also under vmap); no forward mode.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.backends.cpu import library

Padding = tuple[tuple[int, int], tuple[int, int]]
Algorithm = Literal["auto", "direct", "winograd"]
ALGORITHMS = ("auto", "direct", "winograd")
_FORWARD = "diffusion_jax_onednn_conv_forward"
_BACKWARD = "diffusion_jax_onednn_conv_backward"

# Winograd's products are [tiles, Cin] @ [Cin, Cout] (a tile: 2x2 outputs): with fewer
# channels than this on either side (the U-Net's first and last convolutions, 3 or 1 image
# channels) the transforms cost more than the products save.
WINOGRAD_MIN_CHANNELS = 16
# ... and with fewer tiles than these (batch x ceil(H / 2) x ceil(W / 2)) the kernel
# transforms and the small products cost more than they save; the gradients need more
# tiles than the forward (their kernel gradient is a product over the tiles). Timed on
# the U-Net's shapes on 2 cores (`python -m benchmarks.conv_breakdown`): the forward
# mostly faster from 16 tiles on (0.8x-1.9x at 16-64 tiles), the gradients 0.5x-0.9x
# below 128 tiles and 1.0x-2x from 128 tiles on (no gain on the 4x4 maps at 128, 1.6x-2x
# on the large maps).
WINOGRAD_MIN_TILES_FORWARD = 32
WINOGRAD_MIN_TILES_BACKWARD = 128


def winograd_applies(kernel_shape, stride: int, padding: Padding) -> bool:
  """Whether Winograd's F(2x2, 3x3) computes this convolution: a 3x3 kernel, stride 1,
  one pixel of zero padding on every side (the U-Net's "SAME" 3x3 convolutions)."""
  return (tuple(kernel_shape[:2]) == (3, 3) and stride == 1
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)))


def use_winograd(algorithm: str, kernel_shape, stride: int, padding: Padding,
                 x_shape=None, min_tiles: int = 0) -> bool:
  """Whether `algorithm` computes this convolution by Winograd's algorithm.

  "auto": where it applies, both channel counts are at least `WINOGRAD_MIN_CHANNELS`
  and x has at least `min_tiles` 2x2 output tiles; "direct": never; "winograd": always
  (an error where it does not apply).
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm={algorithm!r}; use one of {ALGORITHMS}.")
  applies = winograd_applies(kernel_shape, stride, padding)
  if algorithm == "winograd":
    if not applies:
      raise ValueError(
          f"algorithm='winograd' takes 3x3 kernels, stride 1 and padding ((1, 1), (1, 1)); "
          f"got kernel {tuple(kernel_shape)}, stride {stride}, padding {padding}. Use "
          f"algorithm='direct' (or 'auto') for it.")
    return True
  if algorithm == "direct":
    return False
  tiles = x_shape[0] * -(-x_shape[1] // 2) * -(-x_shape[2] // 2) if x_shape else 0
  return (applies and tiles >= min_tiles and
          min(kernel_shape[2], kernel_shape[3]) >= WINOGRAD_MIN_CHANNELS)


def _attributes(stride: int, padding: Padding, winograd: bool) -> dict[str, object]:
  (top, bottom), (left, right) = padding
  return dict(stride_h=np.int64(stride), stride_w=np.int64(stride),
              pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right), winograd=bool(winograd))


def _out_size(size: int, low: int, high: int, window: int, stride: int) -> int:
  return (size + low + high - window) // stride + 1


def _check(name: str, *arrays: jax.Array) -> None:
  for a in arrays:
    if a.dtype != jnp.float32 or a.ndim != 4:
      raise ValueError(f"cpu conv.{name} takes 4-d float32 arrays; got {a.dtype} "
                       f"{tuple(a.shape)}.")


def _bias_or_zeros(bias: jax.Array | None, kernel: jax.Array) -> jax.Array:
  if bias is None:
    return jnp.zeros(kernel.shape[-1:], jnp.float32)
  if bias.dtype != jnp.float32 or bias.shape != kernel.shape[-1:]:
    raise ValueError(f"cpu conv: the bias must be float32 [{kernel.shape[-1]}] (the "
                     f"kernel's output channels); got {bias.dtype} {tuple(bias.shape)}.")
  return bias


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
                 bias: jax.Array | None = None, algorithm: Algorithm = "auto") -> jax.Array:
  """y = conv(x, kernel) + bias: x [B, H, W, Cin], kernel [KH, KW, Cin, Cout], bias [Cout]
  (None: zero) -> [B, H', W', Cout]; `algorithm` as in `conv`."""
  _check("conv_forward", x, kernel)
  winograd = use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                          WINOGRAD_MIN_TILES_FORWARD)
  (top, bottom), (left, right) = padding
  shape = (x.shape[0], _out_size(x.shape[1], top, bottom, kernel.shape[0], stride),
           _out_size(x.shape[2], left, right, kernel.shape[1], stride), kernel.shape[3])
  return library.ffi_call(_FORWARD, [shape], x, kernel, _bias_or_zeros(bias, kernel),
                          **_attributes(stride, padding, winograd))[0]


def conv_backward(x: jax.Array, kernel: jax.Array, g: jax.Array, stride: int,
                  padding: Padding, algorithm: Algorithm = "auto"
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three gradients of `conv_forward` for the output cotangent g [B, H', W', Cout].

  `algorithm` as in `conv`, with the gradients' tile threshold
  (`WINOGRAD_MIN_TILES_BACKWARD`) for "auto".

  Returns:
    (dx [B, H, W, Cin], dkernel [KH, KW, Cin, Cout], dbias [Cout]); dkernel[i, j] = sum
    over batch and output positions p of x_pad[s p + (i, j)]^T g[p], dbias = sum of g
    over batch and positions.
  """
  _check("conv_backward", x, kernel, g)
  winograd = use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                          WINOGRAD_MIN_TILES_BACKWARD)
  dx, dw, db = library.ffi_call(_BACKWARD, [x.shape, kernel.shape, kernel.shape[-1:]], x,
                                kernel, g, **_attributes(stride, padding, winograd))
  return dx, dw, db


# The algorithms arrive decided ("direct" or "winograd" each way) when the forward is
# traced, so a backward traced later keeps the choice made with its forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv(x, kernel, bias, stride, padding, forward_algorithm, backward_algorithm):
  del backward_algorithm
  return conv_forward(x, kernel, stride, padding, bias, forward_algorithm)


def _conv_fwd(x, kernel, bias, stride, padding, forward_algorithm, backward_algorithm):
  del backward_algorithm
  return conv_forward(x, kernel, stride, padding, bias, forward_algorithm), (x, kernel)


def _conv_bwd(stride, padding, forward_algorithm, backward_algorithm, residuals, g):
  del forward_algorithm
  x, kernel = residuals
  return conv_backward(x, kernel, g.astype(jnp.float32), stride, padding,
                       backward_algorithm)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
         bias: jax.Array | None = None, algorithm: Algorithm = "auto") -> jax.Array:
  """A float32 convolution (NHWC, HWIO, explicit padding) + bias, all parts in oneDNN.

  Reverse mode only (grad, vjp, also under vmap); forward mode (jvp) is not defined.

  Args:
    x: [B, H, W, Cin] float32.
    kernel: [KH, KW, Cin, Cout] float32.
    stride: the same along H and W.
    padding: ((top, bottom), (left, right)) zeros.
    bias: [Cout] float32, or None (zero; its gradient is computed and dropped).
    algorithm: "direct" (oneDNN's convolution), "winograd" (F(2x2, 3x3) over oneDNN's
      sgemm, csrc/winograd.h: 3x3 kernels, stride 1, padding 1 only; the products need
      2.25x fewer multiplications; for finite inputs the values differ by rounding
      only), or "auto": Winograd where it applies, both channel counts are at least
      `WINOGRAD_MIN_CHANNELS` and the batch has at least `WINOGRAD_MIN_TILES_FORWARD`
      (forward) or `WINOGRAD_MIN_TILES_BACKWARD` (gradients) 2x2 output tiles, else
      direct. Forward and gradients may thus use different algorithms.

  Returns:
    [B, H', W', Cout] float32.
  """
  decided = [
      "winograd" if use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                                 min_tiles) else "direct"
      for min_tiles in (WINOGRAD_MIN_TILES_FORWARD, WINOGRAD_MIN_TILES_BACKWARD)]
  return _conv(x, kernel, _bias_or_zeros(bias, kernel), stride, tuple(map(tuple, padding)),
               *decided)
