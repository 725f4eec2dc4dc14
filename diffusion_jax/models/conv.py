"""The U-Net's 3x3 convolution (TF "SAME" padding), with a choice of kernel gradient.

`conv3x3` is `lax.conv_general_dilated` with TF "SAME" padding. Its kernel gradient comes
in two forms, chosen by `kernel_grad` or the enclosing `kernel_gradient` context:

- "xla" (the default): JAX's own derivative, which XLA computes as another convolution
  whose window is the whole feature map. With the project's CPU compiler options
  (`diffusion_jax.compiler_options`: XLA's own CPU convolutions instead of YNNPACK's) it
  runs at convolution speed on CPU, and GPU and TPU compile it well.
- "matmul": a `jax.custom_vjp` whose kernel gradient is nine shifted matrix products,

    dW[i, j] = sum_{b, h, w} x_pad[b, s h + i, s w + j, :]^T  g[b, h, w, :]    # [Cin, Cout]

  and whose input gradient is XLA's transposed convolution. It was the faster form on CPU
  while XLA:CPU ran every convolution through YNNPACK (whose whole-map kernel-gradient
  convolution is slow: 3.8 s against 3.4 s for the products per CIFAR10 step at batch 32,
  and 2.5 s through XLA's own convolution with the project's options;
  `python -m benchmarks.conv_breakdown`). It is kept for such programs and for
  comparison. Being a custom VJP it supports reverse mode (grad, vjp, also nested and
  under vmap) but not forward mode (jvp, jacfwd).

Both modes compute the same forward convolution; the gradients agree up to the order of
sums.

On CPU, in "xla" mode, float32 convolutions run through oneDNN (`onednn.conv`: forward,
input and kernel gradient; faster than XLA:CPU's own on every shape; the stride-1 ones
with enough channels and tiles by Winograd's F(2x2, 3x3), see `onednn.conv`) when the
program sees a single device and the library could be built (`onednn.available()`); see
`cpu_library`. Being a custom VJP, that path has no forward mode: trace under
`cpu_library("xla")` for jvp. Otherwise convolutions with few output positions (at most
`PATCHES_MAX_POSITIONS` = batch x H' x W': the 4x4 maps of the CIFAR10 network at batch
8) are one matrix product of their 3x3 patches (`conv3x3_patches`), where XLA:CPU's
convolution is slow, and the rest XLA's convolution; the values agree up to the order of
sums.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Literal

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import onednn

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
KernelGradient = Literal["xla", "matmul"]
_MODES = ("xla", "matmul")
_DEFAULT_MODE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "conv3x3_kernel_gradient", default="xla")


@contextlib.contextmanager
def kernel_gradient(mode: KernelGradient) -> Iterator[None]:
  """Within the context, `conv3x3` calls without `kernel_grad` trace with `mode`.

  Meant for measurements (e.g. the train step with the nine-product kernel gradient); it
  acts when a function is traced, so use it around the first call of a jitted function.

  Args:
    mode: "xla" or "matmul" (see `conv3x3`).
  """
  _check_mode(mode)
  token = _DEFAULT_MODE.set(mode)
  try:
    yield
  finally:
    _DEFAULT_MODE.reset(token)


CpuLibrary = Literal["auto", "onednn", "xla"]
_CPU_LIBRARIES = ("auto", "onednn", "xla")
CPU_LIBRARY_ENV = "DIFFUSION_JAX_CPU_CONV"
_CPU_LIBRARY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "conv3x3_cpu_library", default=None)


@contextlib.contextmanager
def cpu_library(library: CpuLibrary) -> Iterator[None]:
  """Within the context, float32 `conv3x3` on CPU traces with `library`.

  - "auto" (the default, or `DIFFUSION_JAX_CPU_CONV` in the environment): oneDNN when it
    is available and JAX sees exactly one device (its custom calls carry no sharding
    rule, so a program partitioned over several devices keeps XLA's convolutions).
  - "onednn": oneDNN whenever available (for a program on one device of several, e.g.
    tests with fake CPU devices). Raises if it is not available.
  - "xla": XLA's convolutions.

  Like `kernel_gradient`, it acts when a function is traced.
  """
  if library not in _CPU_LIBRARIES:
    raise ValueError(f"cpu_library={library!r}; use one of {_CPU_LIBRARIES}.")
  token = _CPU_LIBRARY.set(library)
  try:
    yield
  finally:
    _CPU_LIBRARY.reset(token)


def _selected_cpu_library() -> str:
  library = _CPU_LIBRARY.get()
  if library is None:
    library = os.environ.get(CPU_LIBRARY_ENV, "") or "auto"
    if library not in _CPU_LIBRARIES:
      raise ValueError(f"{CPU_LIBRARY_ENV}={library!r}; use one of {_CPU_LIBRARIES}.")
  return library


def onednn_enabled(dtype=jnp.float32) -> bool:
  """Whether `conv3x3` traced now, on `dtype` inputs, runs through oneDNN (see `cpu_library`)."""
  if jax.default_backend() != "cpu" or dtype != jnp.float32:
    return False
  library = _selected_cpu_library()
  if library == "xla" or (library == "auto" and jax.device_count() != 1):
    return False
  if library == "onednn" and not onednn.available():
    raise onednn.OnednnUnavailable(
        "cpu_library('onednn') was asked for, but the oneDNN convolutions are "
        "unavailable; see the warning logged above.")
  return onednn.available()


def _check_mode(mode) -> None:
  if mode not in _MODES:
    raise ValueError(f"kernel_grad={mode!r}; use one of {_MODES}.")


def same_padding(size: int, stride: int, window: int = 3) -> tuple[int, int]:
  """TF "SAME" padding (low, high) of one spatial axis; the extra pixel goes high."""
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def _padding(x_shape, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return same_padding(x_shape[1], stride), same_padding(x_shape[2], stride)


def _accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for bfloat16/float16/float32 inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=_DIMENSION_NUMBERS,
      preferred_element_type=_accumulation_dtype(x.dtype))


# Shifted operands with at most this many channels are concatenated into one matrix
# [N, 9 c] (one wide matmul); wider ones are multiplied one by one (nine matmuls), which
# avoids writing a nine times larger copy.
_CONCAT_MAX_CHANNELS = 64


def _shifted_products(fixed: jax.Array, views: list[jax.Array]) -> jax.Array:
  """[9, c_fixed, c_view]: fixed^T @ view for each of the nine views ([N, c] each).

  fixed^T [c_fixed, N] is formed once; each view is the right operand as it lies in
  memory (contracting axis major), so XLA:CPU's matmul needs no transposing copy of it.
  """
  fixed_t = fixed.T  # [c_fixed, N]
  acc = _accumulation_dtype(fixed.dtype)
  c_view = views[0].shape[-1]
  if c_view <= _CONCAT_MAX_CHANNELS:
    out = lax.dot(fixed_t, jnp.concatenate(views, axis=-1),
                  preferred_element_type=acc)  # [c_fixed, 9 c_view]
    return out.reshape(fixed_t.shape[0], 9, c_view).transpose(1, 0, 2)
  return jnp.stack([lax.dot(fixed_t, v, preferred_element_type=acc) for v in views])


def _windows(x: jax.Array, stride: int) -> list[jax.Array]:
  """The nine [B, H', W', Cin] views x_pad[:, s h + i, s w + j, :] of the padded input."""
  batch, height, width, cin = x.shape
  out_h, out_w = -(-height // stride), -(-width // stride)
  (top, bottom), (left, right) = _padding(x.shape, stride)
  x_pad = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, Hp, Wp, Cin]
  return [lax.slice(x_pad, (0, i, j, 0),
                    (batch, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
                     cin), (1, stride, stride, 1))
          for i in range(3) for j in range(3)]


def kernel_grad_matmul(x: jax.Array, g: jax.Array, stride: int) -> jax.Array:
  """The kernel gradient of `conv3x3` as shifted matrix products.

  dW[i, j] = sum over output positions p of x_pad[s p + (i, j)]^T g[p]. The operand with
  fewer channels is the one shifted: nine shifted copies (windows) of the padded input
  x, multiplied by g^T [Cout, N] (N = B H' W'); or, at stride 1 when Cout < Cin, nine
  shifted copies of the zero-padded g (g[p - (i - 1, j - 1)] on x's grid), multiplied by
  x^T [Cin, N].

  Args:
    x: [B, H, W, Cin] the convolution's input.
    g: [B, H', W', Cout] the cotangent of its output.
    stride: 1 or 2 (any positive stride).

  Returns:
    [3, 3, Cin, Cout] in float32 (float64 for float64 inputs).
  """
  batch, height, width, cin = x.shape
  cout = g.shape[-1]
  g = g.astype(x.dtype)
  if stride == 1 and cout < cin:
    g_pad = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, H + 2, W + 2, Cout]
    views = [lax.slice(g_pad, (0, 2 - i, 2 - j, 0),
                       (batch, 2 - i + height, 2 - j + width, cout)).reshape(-1, cout)
             for i in range(3) for j in range(3)]  # [N, Cout] each
    out = _shifted_products(x.reshape(-1, cin), views)  # [9, Cin, Cout]
    return out.reshape(3, 3, cin, cout)
  views = [v.reshape(-1, cin) for v in _windows(x, stride)]  # [N, Cin] each
  out = _shifted_products(g.reshape(-1, cout), views)  # [9, Cout, Cin]
  return out.reshape(3, 3, cout, cin).transpose(0, 1, 3, 2)


def kernel_grad_xla(x: jax.Array, g: jax.Array, stride: int,
                    kernel_shape: tuple[int, ...]) -> jax.Array:
  """The kernel gradient as XLA derives it (the transpose of the convolution in W)."""
  padding = _padding(x.shape, stride)
  kernel = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
  transpose = jax.linear_transpose(lambda w: _conv(x, w, stride, padding), kernel)
  return transpose(g)[0].astype(_accumulation_dtype(x.dtype))


def _input_grad(kernel: jax.Array, g: jax.Array, stride: int, x_aval) -> jax.Array:
  padding = _padding(x_aval.shape, stride)
  transpose = jax.linear_transpose(lambda x: _conv(x, kernel, stride, padding), x_aval)
  return transpose(g)[0]


# On CPU, convolutions with at most this many output positions (batch x H' x W': the
# 4x4 maps of the CIFAR10 network at batch 8) are computed as one matrix product of the
# 3x3 patches (`conv3x3_patches`). XLA:CPU's convolution is slow on so few positions: per
# 4x4x256 -> 256 convolution at batch 8, forward 2.5 ms and both gradients 6.5 ms,
# against 1.8 and 3.1 ms for the patch product. With more positions the nine times larger
# patch matrix costs more than it saves (4x4 at batch 16, 256 positions: 1.28x the time
# of the convolution; `benchmarks/RESULTS.md`).
PATCHES_MAX_POSITIONS = 128


def patches3x3(x: jax.Array, stride: int) -> jax.Array:
  """The 3x3 windows of the TF-"SAME"-padded input: [B, H', W', 9 Cin], (i, j, c) order."""
  return jnp.concatenate(_windows(x, stride), axis=-1)


def conv3x3_patches(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`conv3x3` as patches [B H' W', 9 Cin] @ kernel [9 Cin, Cout] (plain autodiff)."""
  cin, cout = kernel.shape[2:]
  return lax.dot_general(patches3x3(x, stride), kernel.reshape(9 * cin, cout),
                         (((3,), (0,)), ((), ())),
                         preferred_element_type=_accumulation_dtype(x.dtype))


def _use_patches(x_shape, stride: int) -> bool:
  positions = x_shape[0] * -(-x_shape[1] // stride) * -(-x_shape[2] // stride)
  return positions <= PATCHES_MAX_POSITIONS and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _conv(x, kernel, stride, _padding(x.shape, stride))


def _conv3x3_fwd(x, kernel, stride):
  return _conv3x3_matmul(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, g):
  x, kernel = residuals
  g = g.astype(_accumulation_dtype(x.dtype))  # [B, H', W', Cout]
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
  dx = _input_grad(kernel, g, stride, x_aval).astype(x.dtype)
  dw = kernel_grad_matmul(x, g, stride)
  return dx, dw.astype(kernel.dtype)


_conv3x3_matmul.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1, *,
            kernel_grad: KernelGradient | None = None,
            bias: jax.Array | None = None) -> jax.Array:
  """3x3 convolution, TF "SAME" padding (for stride 2 on even sizes: right/bottom only).

  Args:
    x: [B, H, W, Cin] input (float32 or bfloat16).
    kernel: [3, 3, Cin, Cout] kernel (HWIO), in the dtype of `x`.
    stride: 1 or 2 (the same along H and W).
    kernel_grad: how the kernel gradient is computed: "xla" (JAX's own derivative) or
      "matmul" (nine shifted matrix products); None takes the mode of the enclosing
      `kernel_gradient` context ("xla" outside). In "xla" mode on CPU, float32
      convolutions go through oneDNN where `cpu_library` allows (reverse-mode
      derivatives only), else those with at most `PATCHES_MAX_POSITIONS` output
      positions through `conv3x3_patches` (same values up to the order of sums; its
      derivatives are JAX's too).
    bias: [Cout] float32 added to the output (through oneDNN: inside its convolution,
      and its gradient with the kernel's), or None.

  Returns:
    [B, ceil(H / stride), ceil(W / stride), Cout] float32 (products accumulate in float32;
    float64 inputs give float64).
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"conv3x3 expects x [B, H, W, Cin] and kernel [3, 3, Cin, Cout]; got "
                     f"{tuple(x.shape)} and {tuple(kernel.shape)}.")
  kernel_grad = _DEFAULT_MODE.get() if kernel_grad is None else kernel_grad
  _check_mode(kernel_grad)
  if not isinstance(stride, int) or stride < 1:
    raise ValueError(f"stride must be a positive int, got {stride!r}.")
  if kernel_grad == "xla" and x.dtype == kernel.dtype and onednn_enabled(x.dtype):
    return onednn.conv(x, kernel, stride, _padding(x.shape, stride),
                       None if bias is None else bias.astype(jnp.float32))
  if kernel_grad == "matmul":
    y = _conv3x3_matmul(x, kernel, stride)
  elif _use_patches(x.shape, stride):
    y = conv3x3_patches(x, kernel, stride)
  else:
    y = _conv(x, kernel, stride, _padding(x.shape, stride))
  return y if bias is None else y + bias.astype(y.dtype)


def conv1x1(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias per pixel (the official `nin`): a 1x1 convolution.

  Through oneDNN where `conv3x3` would use it (CPU, float32, see `cpu_library`): its 1x1
  convolution with the bias inside is faster on CPU than XLA:CPU's matrix product
  followed by the bias pass, and takes the transposes of the gradients' products
  inside. Otherwise `lax.dot_general`.

  Args:
    x: [B, H, W, Cin] (float32 or bfloat16).
    kernel: [Cin, Cout] in the dtype of `x`.
    bias: [Cout] float32.

  Returns:
    [B, H, W, Cout] float32 (float64 for float64 inputs).
  """
  if x.ndim != 4 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(f"conv1x1 expects x [B, H, W, Cin] and kernel [Cin, Cout]; got "
                     f"{tuple(x.shape)} and {tuple(kernel.shape)}.")
  if x.dtype == kernel.dtype and onednn_enabled(x.dtype):
    return onednn.conv(x, kernel[None, None], 1, ((0, 0), (0, 0)),
                       bias.astype(jnp.float32))
  y = lax.dot_general(x, kernel, (((3,), (0,)), ((), ())),
                      preferred_element_type=_accumulation_dtype(x.dtype))
  return y + bias.astype(y.dtype)
