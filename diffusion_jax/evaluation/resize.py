"""The image preprocessing of the TF FID/IS graph (`inception-2015-12-05`), in JAX.

TTUR's FID and OpenAI's Inception Score feed float images in [0, 255] to the graph's
`ExpandDims` input; the graph then resizes them to 299x299 with its own `ResizeBilinear` op
(TF1 semantics: `align_corners=False` and no half-pixel centres, i.e.
`tf.compat.v1.image.resize_bilinear(..., align_corners=False)`) and scales them as
`(x - 128) / 128`, which maps [0, 255] to [-1, 0.9921875].

`resize_bilinear_legacy` reproduces that op as a gather formulation: the source rows and
columns and the interpolation weights are computed once in float32 NumPy from the static
shapes exactly as TF's kernel computes them (`scale = in / out` in float32, `src = dst *
scale`, `lower = floor(src)`, `upper = min(ceil(src), in - 1)`, `lerp = src - floor(src)`),
and the interpolation uses TF's order of operations
(`top = tl + (tr - tl) * x_lerp`, `out = top + (bottom - top) * y_lerp`). Gathers instead of
an interpolation matrix keep the result exact on accelerators whose float32 matmuls
default to reduced precision.

Grey images (one channel, e.g. MNIST) are replicated to three identical channels before
the resize; the TF graph only accepts RGB, and replication is the usual convention for FID
on grey datasets. Resizing is per channel and linear, so replicating before or after the
resize gives the same result.
"""

from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299


def legacy_interpolation(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
  """Returns TF1 legacy bilinear source indices and weights along one axis.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    (lower [out] int32, upper [out] int32, lerp [out] float32), computed in float32 as
    TF's `ResizeBilinear` kernel with `align_corners=False, half_pixel_centers=False`.
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"Resize sizes must be positive, got in={in_size}, out={out_size}.")
  scale = np.float32(in_size) / np.float32(out_size)  # float32, as TF
  src = np.arange(out_size, dtype=np.float32) * scale  # [out] float32
  src_floor = np.floor(src)
  lower = np.maximum(src_floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  lerp = (src - src_floor).astype(np.float32)
  return lower.astype(np.int32), upper.astype(np.int32), lerp


def resize_bilinear_legacy(images: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """Resizes like `tf.compat.v1.image.resize_bilinear(images, size, align_corners=False)`.

  Args:
    images: [B, H, W, C] numbers (any real dtype; computed in float32).
    size: (out_height, out_width).

  Returns:
    [B, out_height, out_width, C] float32.
  """
  if images.ndim != 4:
    raise ValueError(f"resize_bilinear_legacy expects [B, H, W, C] images, got shape "
                     f"{tuple(images.shape)}.")
  x = jnp.asarray(images).astype(jnp.float32)
  _, height, width, _ = x.shape
  out_h, out_w = int(size[0]), int(size[1])
  y_lo, y_hi, y_lerp = legacy_interpolation(height, out_h)
  x_lo, x_hi, x_lerp = legacy_interpolation(width, out_w)
  top_rows = x[:, y_lo]  # [B, out_h, W, C]
  bottom_rows = x[:, y_hi]  # [B, out_h, W, C]
  top_left, top_right = top_rows[:, :, x_lo], top_rows[:, :, x_hi]  # [B, out_h, out_w, C]
  bottom_left, bottom_right = bottom_rows[:, :, x_lo], bottom_rows[:, :, x_hi]
  x_l = jnp.asarray(x_lerp)[None, None, :, None]  # [1, 1, out_w, 1]
  y_l = jnp.asarray(y_lerp)[None, :, None, None]  # [1, out_h, 1, 1]
  top = top_left + (top_right - top_left) * x_l
  bottom = bottom_left + (bottom_right - bottom_left) * x_l
  return top + (bottom - top) * y_l


def to_rgb(images: jnp.ndarray) -> jnp.ndarray:
  """Returns [B, H, W, 3] images; grey [B, H, W] or [B, H, W, 1] inputs are replicated.

  Raises:
    ValueError: for any other channel count.
  """
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"Inception inputs must be [B, H, W] grey, [B, H, W, 1] grey or [B, H, W, 3] RGB "
        f"images with values in [0, 255]; got shape {tuple(images.shape)}.")
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return images


def preprocess_for_inception(images: jnp.ndarray) -> jnp.ndarray:
  """Applies the TF FID graph's preprocessing to images with values in [0, 255].

  Args:
    images: [B, H, W, C] (C = 1 or 3) or [B, H, W]; uint8 or float values in [0, 255].

  Returns:
    [B, 299, 299, 3] float32 in [-1, 0.9921875]: legacy bilinear resize to 299x299, then
    (x - 128) / 128.
  """
  x = to_rgb(jnp.asarray(images)).astype(jnp.float32)
  if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
    x = resize_bilinear_legacy(x, (INCEPTION_SIZE, INCEPTION_SIZE))
  return (x - 128.0) / 128.0
