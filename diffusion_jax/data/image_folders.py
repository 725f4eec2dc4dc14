"""Image folders as a data source: every image file under a directory, decoded, cropped
and resized, with undecodable files named (or skipped and counted).

`sources.load_source` opens `data.dataset=folder` through `folder_images`.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow as tf

from diffusion_jax.data import sources


def folder_images(path: str, image_size: int, channels: int,
                  skip_bad_images: bool = False) -> np.ndarray:
  """Every image file under `path` (recursively, sorted by path) as uint8 [N, S, S, C].

  Each image is decoded (alpha dropped; grey images are repeated to RGB when
  channels == 3), center-cropped and resized to image_size. Colour images with
  channels == 1 are an error (converting them would lose information silently).

  A file that cannot be decoded is an error that names it (path, size, what the decoder
  said), or, with `skip_bad_images`, is left out with a warning that counts them.
  """
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"data.path={path!r} is not a directory; the folder dataset needs "
                            "--config.data.path=/path/to/images/.")
  files = sorted(
      os.path.join(root, f) for root, _, names in os.walk(path) for f in names
      if f.lower().endswith(sources.IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f"No image files ({', '.join(sources.IMAGE_EXTENSIONS)}) under {path}.")

  def load(index, file):
    image = tf.io.decode_image(tf.io.read_file(file), channels=0, expand_animations=False)
    native = tf.shape(image)[-1]
    colour = native >= 3
    if channels == 3:
      image = tf.cond(colour, lambda: image[..., :3],
                      lambda: tf.image.grayscale_to_rgb(image[..., :1]))
    else:
      image = image[..., :1]
    return sources.center_crop_and_resize(image, image_size), colour, index

  # Undecodable files are dropped here and named below (tf.data's error would not).
  ds = (tf.data.Dataset.from_tensor_slices((np.arange(len(files)), files))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors())
  batches = list(ds.batch(256).as_numpy_iterator())
  decoded = np.concatenate([b[2] for b in batches]) if batches else np.zeros(0, np.int64)
  bad = sorted(set(range(len(files))) - set(decoded.tolist()))
  if bad:
    problems = [_undecodable(files[i]) for i in bad]
    if not skip_bad_images:
      raise ValueError(f"{len(bad)} of {len(files)} image files under {path} cannot be "
                       f"decoded: {'; '.join(problems[:3])}"
                       f"{'; ...' if len(bad) > 3 else ''}. Replace or remove them, or "
                       "set --config.data.skip_bad_images=True to leave them out.")
    logging.warning("Skipping %d of %d image files under %s that cannot be decoded "
                    "(data.skip_bad_images=True): %s%s", len(bad), len(files), path,
                    "; ".join(problems[:10]), "; ..." if len(bad) > 10 else "")
    if len(bad) == len(files):
      raise ValueError(f"None of the {len(files)} image files under {path} can be decoded: "
                       f"{'; '.join(problems[:3])}.")
  images = np.concatenate([b[0] for b in batches])
  colour = np.concatenate([b[1] for b in batches])
  if channels == 1 and colour.any():
    raise ValueError(f"{int(colour.sum())} images under {path} are in colour (e.g. "
                     f"{files[int(decoded[np.argmax(colour)])]}) but data.channels=1; set "
                     "--config.data.channels=3.")
  return images


def _undecodable(file: str) -> str:
  """'<path> (<size> bytes): <what the decoder said>' for a file that fails to decode."""
  try:
    size = os.path.getsize(file)
  except OSError as e:
    return f"{file}: {e.strerror}"
  try:
    tf.io.decode_image(tf.io.read_file(file), channels=0, expand_animations=False)
    reason = "decoded alone, but not in the pipeline (center crop and resize)"
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, "message", str(e))
    reason = message.split("} ")[-1].split(" [Op:")[0].strip().rstrip(".")
  return f"{file} ({size} bytes): {reason}"
