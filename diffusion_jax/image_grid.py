"""Sample grids: images in [-1, 1] tiled into one uint8 picture and written as PNG."""

from __future__ import annotations

import io
import math
import os

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255]: round((x + 1) * 127.5), clipped.

  Args:
    images: float array in [-1, 1] (any shape), or uint8 (returned unchanged).
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.all(np.isfinite(images)):
    raise ValueError("Images contain NaN or infinite values.")
  return np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, num_cols: int | None = None, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Tiles images row by row into one uint8 image.

  Args:
    images: [N, H, W, C] in [-1, 1] (float) or uint8; C is 1 or 3.
    num_cols: images per row; default ceil(sqrt(N)).
    padding: pixels between images and around the border.
    pad_value: uint8 value of the padding.

  Returns:
    [rows * (H + padding) + padding, cols * (W + padding) + padding, C] uint8; empty
    cells (when N is not a multiple of cols) are left at `pad_value`.
  """
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"make_grid expects [N, H, W, C] images, got shape {images.shape}.")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("make_grid got no images.")
  cols = num_cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c),
                 pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    y, x = padding + r * (h + padding), padding + q * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray) -> str:
  """Writes a uint8 [H, W, 1 or 3] image as PNG (creating the directory) and returns path.

  `path` may be local or remote (gs://...).
  """
  grid = to_uint8(grid)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
  target.write_bytes(buffer.getvalue())
  return os.fspath(path)
