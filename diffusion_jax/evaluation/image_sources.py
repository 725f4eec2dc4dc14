"""Image sets for FID/IS from files: an array in an .npz, or a folder of image files.

A source is named by a string:
  * `path.npz` or `path.npz:key`: a uint8 array [N, H, W], [N, H, W, C] (C = 1 or 3) or
    [N, C, H, W] (channel-first is transposed); without a key, `x_train`, `x`, `images` or
    the only array in the file;
  * a sample set written by the sampling job (a directory of `shard_*.npz`), in index
    order;
  * any other directory: its image files (png, jpg, jpeg, bmp, webp; searched recursively, sorted
    by path), read with Pillow; all must have one size; grey files stay one channel.
Images are yielded in [0, 255] as uint8 batches (see `features.InceptionFeatures`).
"""

from __future__ import annotations

import glob
import os
from typing import Iterator, Optional, Tuple

import numpy as np

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_DEFAULT_KEYS = ("x_train", "x", "images")


def _split_spec(spec: str) -> Tuple[str, Optional[str]]:
  if ".npz:" in spec:
    path, key = spec.rsplit(":", 1)
    return path, key
  return spec, None


def is_statistics_file(spec: str) -> bool:
  """True when `spec` is an .npz holding FID statistics (`mu` and `sigma`)."""
  path, key = _split_spec(spec)
  if key is not None or not path.endswith(".npz") or not os.path.isfile(path):
    return False
  with np.load(path, allow_pickle=False) as data:
    return "mu" in data.files and "sigma" in data.files


def _as_nhwc(array: np.ndarray, origin: str) -> np.ndarray:
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim == 4 and array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
    array = array.transpose(0, 2, 3, 1)
  if array.ndim != 4 or array.shape[-1] not in (1, 3):
    raise ValueError(f"{origin}: expected images [N, H, W(, C)] with C = 1 or 3, got "
                     f"shape {array.shape}.")
  if array.dtype != np.uint8:
    if np.issubdtype(array.dtype, np.floating) and (array.min() < 0 or array.max() > 255):
      raise ValueError(f"{origin}: float images must be in [0, 255]; got values in "
                       f"[{array.min():.3g}, {array.max():.3g}].")
  return array


def load_npz_images(spec: str, num: int = -1) -> np.ndarray:
  """Returns the images [N, H, W, C] of `path.npz[:key]` (the first `num` if num > 0)."""
  path, key = _split_spec(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Image file {path!r} not found.")
  with np.load(path, allow_pickle=False) as data:
    if key is None:
      candidates = [k for k in _DEFAULT_KEYS if k in data.files]
      if not candidates and len(data.files) == 1:
        candidates = list(data.files)
      if not candidates:
        raise ValueError(f"{path} holds {sorted(data.files)}; name the array as "
                         f"'{path}:KEY'.")
      key = candidates[0]
    if key not in data.files:
      raise ValueError(f"{path} has no array {key!r}; it holds {sorted(data.files)}.")
    array = data[key]
  array = _as_nhwc(array, f"{path}:{key}")
  return array[:num] if num > 0 else array


def _folder_files(directory: str):
  files = []
  for root, _, names in os.walk(directory):
    files.extend(os.path.join(root, n) for n in names
                 if n.lower().endswith(_IMAGE_EXTENSIONS))
  return sorted(files)


def iterate_folder_images(directory: str, num: int = -1,
                          batch_size: int = 256) -> Iterator[np.ndarray]:
  """Yields uint8 batches [b, H, W, C] of a folder's image files, in sorted path order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = _folder_files(directory)
  if not files:
    raise ValueError(f"No image files ({', '.join(_IMAGE_EXTENSIONS)}) under {directory}.")
  files = files[:num] if num > 0 else files
  shape = None
  batch = []
  for name in files:
    with Image.open(name) as img:
      img = img.convert("L") if img.mode in ("L", "1", "I;16", "I") else img.convert("RGB")
      array = np.asarray(img, np.uint8)
    array = array[..., None] if array.ndim == 2 else array
    if shape is None:
      shape = array.shape
    elif array.shape != shape:
      raise ValueError(f"{name} has shape {array.shape}, the first image {shape}; all "
                       "images of a set must have one size.")
    batch.append(array)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)


def iterate_images(spec: str, num: int = -1, batch_size: int = 256) -> Iterator[np.ndarray]:
  """Yields uint8/float batches [b, H, W, C] in [0, 255] of the source named by `spec`."""
  path, _ = _split_spec(spec)
  if os.path.isdir(path) and glob.glob(os.path.join(path, "shard_*.npz")):
    from diffusion_jax.evaluation import sample_job  # pylint: disable=g-import-not-at-top
    yield from sample_job.iterate_samples(path, num)
    return
  if os.path.isdir(path):
    yield from iterate_folder_images(path, num, batch_size)
    return
  if path.endswith(".npz"):
    images = load_npz_images(spec, num)
    for i in range(0, images.shape[0], batch_size):
      yield images[i:i + batch_size]
    return
  raise ValueError(f"Unknown image source {spec!r}: give an .npz (optionally "
                   "'file.npz:key') or a directory of image files.")

