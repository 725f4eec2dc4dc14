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


def make_grid_sampler(model, schedule, config, mesh, num_images: int):
  """Returns `sample(params) -> [N, H, W, C]` float images in [-1, 1], replicated.

  Uses `config.sampling` (ancestral, or DDIM with `num_steps` and `eta`) and fixed
  per-image keys (`run_setup.SAMPLE_STREAM` folded with the image index), so grids from
  different steps of a run show the same noise. The images are split over the devices when
  their number divides the device count, otherwise computed on every device.

  Args:
    model: the U-Net module.
    schedule: the diffusion's coefficients.
    config: the experiment config (`sampling`, `diffusion`, `data`, `seed`).
    mesh: the data-parallel mesh.
    num_images: N.
  """
  # Imported here so that the PNG helpers above need no JAX/Flax model code.
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import compiler_options  # pylint: disable=g-import-not-at-top
  from diffusion_jax import run_setup  # pylint: disable=g-import-not-at-top
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  from diffusion_jax import sharding  # pylint: disable=g-import-not-at-top

  s, d = config.sampling, config.diffusion
  shape = (int(config.data.image_size), int(config.data.image_size), int(config.data.channels))
  kwargs = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                clip_denoised=bool(s.clip_denoised))
  base = run_setup.stream_key(config, run_setup.SAMPLE_STREAM)
  split = num_images % mesh.devices.size == 0
  key_sharding = sharding.batch_sharding(mesh) if split else sharding.replicated(mesh)

  def sample(params):
    indices = jax.lax.with_sharding_constraint(np.arange(num_images), key_sharding)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)  # [N]
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    if s.sampler == "ddim":
      timesteps = samplers.ddim_timesteps(int(d.num_timesteps), int(s.num_steps))
      return samplers.ddim_sample(model_fn, schedule, keys, shape, timesteps=timesteps,
                                  eta=float(s.eta),
                                  eps_from_clipped_x0=bool(s.eps_from_clipped_x0), **kwargs)
    return samplers.ancestral_sample(model_fn, schedule, keys, shape, **kwargs)

  return jax.jit(sample, in_shardings=(sharding.replicated(mesh),),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=compiler_options.for_mesh(mesh))
