"""Inception pool3 features (and logits) of image sets: jit-compiled, batched, sharded.

One compiled program takes a batch of raw images (uint8 or float in [0, 255], any size,
1 or 3 channels), applies the TF graph's preprocessing (`resize.preprocess_for_inception`)
and the network, and returns replicated outputs. The batch is split over a 1-D device mesh
(`jax.jit` with `NamedSharding`; no pmap); the parameters are replicated. Every process
passes the same host batch and places only the slices its devices own, so the same code
runs on one device, several devices or several hosts. The last partial batch is padded to
the fixed batch size (one compilation per image shape) and the padding is dropped.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Union

from absl import logging
import jax
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.evaluation import resize

Images = Union[np.ndarray, Iterable[np.ndarray]]


class InceptionFeatures:
  """Computes FID features (`pool3`, [N, 2048]) and optional `logits` ([N, 1008]).

  Example:
    extractor = InceptionFeatures.from_file("inception_fid.npz", batch_size=200)
    out = extractor(images_uint8)  # {'pool3': [N, 2048] float32, ...}
  """

  def __init__(self, params: Any, with_logits: bool = False, batch_size: int = 200,
               devices: Optional[Sequence[jax.Device]] = None,
               jit_options: Optional[Dict[str, Any]] = None):
    """Builds the sharded program.

    Args:
      params: the `params` pytree of `inception.InceptionV3FID` (see `inception_weights`).
      with_logits: also return the 1008-way logits (the weights must include `fc`).
      batch_size: images per compiled call over all devices; rounded up to a multiple of
        the number of devices.
      devices: devices of the mesh (default: all devices of all processes).
      jit_options: compiler options of the program (`Ops.jit_options()` of the kernel
        policy: on the CPU backend, XLA:CPU options that speed up its convolutions).
    """
    if with_logits and "fc" not in params:
      raise ValueError("with_logits=True needs Inception weights with the 1008-way "
                       "classifier (convert pytorch-fid's pt_inception-2015-12-05 file).")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.mesh = sharding.make_mesh(devices)
    n = self.mesh.devices.size
    self.batch_size = -(-batch_size // n) * n
    self.with_logits = with_logits
    replicated = sharding.replicated(self.mesh)
    if not with_logits and "fc" in params:
      params = {k: v for k, v in params.items() if k != "fc"}
    self._params = jax.tree_util.tree_map(lambda a: sharding.put_global(a, replicated),
                                          params)
    model = inception.InceptionV3FID(with_logits=with_logits)

    def forward(p, images):  # images: [B, H, W, C] in [0, 255]
      return model.apply({"params": p}, resize.preprocess_for_inception(images))

    self._forward = jax.jit(forward, in_shardings=(replicated,
                                                   sharding.batch_sharding(self.mesh)),
                            out_shardings=replicated, compiler_options=jit_options)

  @classmethod
  def from_file(cls, path: str, with_logits: Optional[bool] = None,
                **kwargs) -> "InceptionFeatures":
    """Loads converted weights; `with_logits=None` means "if the file has them"."""
    params, has_logits, _ = inception_weights.load_weights(path)
    if with_logits and not has_logits:
      raise ValueError(
          f"{path} has no 1008-way classifier, so no logits / Inception Score. It was "
          "converted from a pool3-only network (e.g. the TorchScript FID network); convert "
          "pytorch-fid's pt_inception-2015-12-05-6726825d.pth for the Inception Score.")
    return cls(params, has_logits if with_logits is None else with_logits, **kwargs)

  def apply_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """Returns the outputs for one batch of at most `batch_size` images."""
    images = np.asarray(images)
    count = images.shape[0]
    if count > self.batch_size:
      raise ValueError(f"apply_batch got {count} images; batch_size is {self.batch_size}.")
    if count < self.batch_size:
      pad = np.zeros((self.batch_size - count,) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad], axis=0)
    out = self._forward(self._params, sharding.put_rows(images, self.mesh))
    return {k: sharding.replicated_value(v)[:count] for k, v in out.items()}

  def __call__(self, images: Images, log_every: int = 0,
               on_batch: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    """Returns {'pool3': [N, 2048]} (+ 'logits') float32 for all images.

    Args:
      images: [N, H, W, C] / [N, H, W] array, or an iterable of such arrays (batches of
        any size, all of one image shape), values in [0, 255].
      log_every: log progress and images/s every this many batches (0: never).
      on_batch: called with the number of images done after each batch.
    """
    results: Dict[str, list] = {}
    done, start = 0, time.time()
    for step, batch in enumerate(_rebatch(images, self.batch_size)):
      for key, value in self.apply_batch(batch).items():
        results.setdefault(key, []).append(value)
      done += batch.shape[0]
      if on_batch is not None:
        on_batch(done)
      if log_every and (step + 1) % log_every == 0:
        logging.info("Inception features: %d images, %.1f images/s", done,
                     done / max(time.time() - start, 1e-9))
    if not results:
      raise ValueError("No images were given to the Inception network.")
    return {k: np.concatenate(v, axis=0) for k, v in results.items()}


def _rebatch(images: Images, batch_size: int) -> Iterator[np.ndarray]:
  """Yields batches of exactly `batch_size` images (the last may be smaller)."""
  if isinstance(images, np.ndarray):
    for i in range(0, images.shape[0], batch_size):
      yield images[i:i + batch_size]
    return
  buffer, buffered = [], 0
  for chunk in images:
    chunk = np.asarray(chunk)
    buffer.append(chunk)
    buffered += chunk.shape[0]
    while buffered >= batch_size:
      merged = np.concatenate(buffer, axis=0)
      yield merged[:batch_size]
      rest = merged[batch_size:]
      buffer, buffered = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
  if buffered:
    yield np.concatenate(buffer, axis=0)
