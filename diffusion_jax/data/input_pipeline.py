"""The tf.data input pipeline: global batches as sharded jax.Arrays, in a resumable order.

Training (`create_train_iterator`): row r of the batch of step s is the example that
`example_order.train_plan` picks for (seed, s, r): a per-epoch permutation of the whole
training set and a flip bit per position. The order is a pure function of (seed, step):
a run resumed at step N gets the batches an uninterrupted run gets, and `start_step`
costs nothing. Each process reads only the rows of the global batch that its devices hold
(taken from the sharding), and `jax.make_array_from_process_local_data` assembles the
global batch as one jax.Array.

The per-process tf.data graph, in the order of the classic recipe (split by process,
shuffle, repeat, batch with drop_remainder, map with AUTOTUNE, prefetch):
  Dataset.counter()                      chunks of 64 steps (repeat: forever)
  -> example indices and flip bits        shuffle + split by process, vectorized NumPy
  -> unbatch                              one element per step = one full local batch
  -> uint8 images                         in memory: tf.gather; tfds ArrayRecord: batched
                                          record reads, then parse, decode, crop/resize
                                          per image with AUTOTUNE parallelism
  -> prefetch(AUTOTUNE)
Batches continue across epoch boundaries, so every batch is full (drop_remainder holds
trivially). `data.shuffle_buffer_size` is not used: the shuffle is a full permutation.

The host sends uint8 images and the flip bits (4x fewer bytes than float32), and the
accelerator mirrors and scales them in one small jitted op (`to_model_input`: the float32
nearest to x / 127.5 - 1), sharded like the batch. The host's per-batch work is one gather.

Evaluation (`create_eval_iterator`): the split in its stored order, without flips, in
global batches; the last one is padded (with copies of the last image) and a boolean mask
marks the real rows, so every image counts exactly once (bits/dim, FID statistics).
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding

from diffusion_jax import sharding as sharding_lib
from diffusion_jax.data import example_order
from diffusion_jax.data import sources

AUTOTUNE = tf.data.AUTOTUNE
_STEPS_PER_CHUNK = 64  # Steps planned per NumPy call (amortizes Python overhead).


# The model input of pixel value v: the float32 nearest to v / 127.5 - 1, in [-1, 1].
PIXEL_VALUES = (np.arange(256, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)  # [256]


def to_model_input(images, flips=None) -> jax.Array:
  """uint8 [B, S, S, C] images, mirrored where flips [B] is True -> float32 in [-1, 1].

  A pixel value v becomes the float32 nearest to v / 127.5 - 1 (the official scaling).
  It is a table lookup rather than arithmetic because XLA computes x / 127.5 as
  x * (1 / 127.5), which differs by one ulp for about half of the values and may differ
  between backends; the table gives the same bits everywhere, jitted or not.
  """
  images = jnp.asarray(images)
  if flips is not None:
    images = jnp.where(jnp.asarray(flips)[:, None, None, None], images[:, :, ::-1], images)
  table = jnp.asarray(PIXEL_VALUES)
  return table.at[images.astype(jnp.int32)].get(mode="promise_in_bounds")


def train_dataset(source: sources.Source, data_config, *, rows: np.ndarray,
                  global_batch_size: int, seed: int, start_step: int = 0,
                  labels: bool = False) -> tf.data.Dataset:
  """The rows `rows` of every training batch from `start_step` on, as tf.data.

  Args:
    source: the opened train split (`sources.load_source`).
    data_config: the config's `data` section (random_flip).
    rows: the rows of the global batch to produce, int64 [b] (a process's rows:
      `sharding.addressable_rows`; all rows for one process).
    global_batch_size: examples per step over all processes.
    seed: the data seed; the order is a function of (seed, step) only.
    start_step: the step of the first element (a resumed run passes its step).
    labels: add the examples' class labels (the source must hold them).

  Returns:
    An infinite dataset of (images uint8 [b, S, S, C], flips bool [b][, labels int32
    [b]]); element k is the rows of the batch of step start_step + k.
    `to_model_input(images, flips)` makes the model input.
  """
  return _train_dataset(source, data_config, np.asarray(rows, np.int64), global_batch_size,
                        seed, start_step, labels)


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    sharding: Mesh | NamedSharding,
    source: sources.Source | None = None,
    labels: bool = False,
) -> Iterator[jax.Array] | Iterator[tuple[jax.Array, jax.Array]]:
  """Global training batches as jax.Arrays sharded over the batch axis.

  All checks (dataset, paths, sizes, channels, divisibility) run here, before the
  first batch and before any compile.

  Args:
    data_config: the config's `data` section.
    global_batch_size: examples per step over all devices and processes.
    seed: the data seed; batch k is a function of (seed, start_step + k) only.
    start_step: the step whose batch comes first (a run resumed at step N passes N).
    sharding: a NamedSharding of the batch (its first dimension), or a mesh with the
      data axis (`sharding_lib.batch_sharding`).
    source: the train split already opened by `sources.load_source` (which checks
      it); None opens it here.
    labels: also yield each example's class label (the source must hold labels).

  Returns:
    An infinite iterator of float32 [global_batch_size, S, S, C] jax.Arrays in [-1, 1]
    (with `labels`: pairs of those and int32 [global_batch_size] labels).
  """
  sharding = sharding_lib.batch_sharding(sharding)
  sharding_lib.check_batch_divisible(global_batch_size, sharding, "training.batch_size")
  if source is None:
    source = sources.load_source(data_config, data_config.train_split)
  shape = (global_batch_size, data_config.image_size, data_config.image_size,
           data_config.channels)
  rows = sharding_lib.addressable_rows(sharding, shape)
  ds = _train_dataset(source, data_config, rows, global_batch_size, seed, start_step,
                      labels)
  flip_sharding = sharding_lib.rows_sharding(sharding)
  convert = jax.jit(to_model_input, out_shardings=sharding)

  def place(batch):
    images = convert(jax.make_array_from_process_local_data(sharding, batch[0], shape),
                     jax.make_array_from_process_local_data(flip_sharding, batch[1],
                                                            shape[:1]))
    if not labels:
      return images
    return images, jax.make_array_from_process_local_data(flip_sharding, batch[2], shape[:1])
  return _global_arrays(_numpy_batches(ds), place)


class EvalIterator:
  """One pass over a split in global batches of (images, mask); iterable many times.

  Attributes:
    num_images: the images evaluated (the first `num_images` of the split).
    num_batches: ceil(num_images / global_batch_size).
    global_batch_size: rows per batch.

  Iterating yields (images float32 [B, S, S, C] in [-1, 1], mask bool [B]) jax.Arrays,
  both sharded over the batch axis; batch k row r is image k * B + r of the split when
  mask is True, padding (a copy of the last image) otherwise. Summing a per-example
  quantity times the mask over all batches counts every image exactly once.
  """

  def __init__(self, dataset: tf.data.Dataset, sharding: NamedSharding, num_images: int,
               global_batch_size: int, image_shape: tuple[int, int, int]):
    self._dataset = dataset
    self._sharding = sharding
    self._mask_sharding = sharding_lib.rows_sharding(sharding)
    self._convert = jax.jit(to_model_input, out_shardings=sharding)
    self.num_images = num_images
    self.global_batch_size = global_batch_size
    self.num_batches = -(-num_images // global_batch_size)
    self._shape = (global_batch_size, *image_shape)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
    def place(batch):
      images, mask = batch
      images = jax.make_array_from_process_local_data(self._sharding, images, self._shape)
      return (self._convert(images),
              jax.make_array_from_process_local_data(self._mask_sharding, mask,
                                                     self._shape[:1]))
    return _global_arrays(_numpy_batches(self._dataset), place)


def eval_dataset(data_config, split: str, *, global_batch_size: int, rows: np.ndarray,
                 num_images: int = -1, source: sources.Source | None = None
                 ) -> tuple[tf.data.Dataset, int]:
  """The rows `rows` of one ordered pass over `split` (see `EvalIterator`).

  Args:
    data_config: the config's `data` section.
    split: the split, e.g. data_config.eval_split or data_config.train_split.
    global_batch_size: rows per global batch.
    rows: the rows of each global batch to produce, int64 [b] (a process's rows; all
      rows for one process).
    num_images: evaluate the first num_images images of the split; -1: all of them.
    source: an already opened source of `split` (else opened here).

  Returns:
    (a finite dataset of (images uint8 [b, S, S, C], mask bool [b]), num_images).
  """
  if source is None:
    source = sources.load_source(data_config, split)
  return _eval_dataset(source, np.asarray(rows, np.int64), global_batch_size, num_images)


def create_eval_iterator(
    data_config,
    split: str,
    *,
    global_batch_size: int,
    sharding: Mesh | NamedSharding,
    num_images: int = -1,
) -> EvalIterator:
  """One deterministic pass over `split`: no shuffle, no flip, padded and masked.

  Args:
    data_config: the config's `data` section.
    split: the split to read (tfds split strings; array sources: see data_sources).
    global_batch_size: rows per global batch (divisible by the devices sharing it).
    sharding: a NamedSharding of the batch, or a mesh with the data axis.
    num_images: the first num_images images of the split; -1: the whole split.

  Returns:
    An `EvalIterator` (len() = number of batches; `.num_images`).
  """
  sharding = sharding_lib.batch_sharding(sharding)
  sharding_lib.check_batch_divisible(global_batch_size, sharding, "the eval batch size")
  source = sources.load_source(data_config, split)
  image_shape = (data_config.image_size, data_config.image_size, data_config.channels)
  rows = sharding_lib.addressable_rows(sharding, (global_batch_size, *image_shape))
  ds, count = _eval_dataset(source, rows, global_batch_size, num_images)
  return EvalIterator(ds, sharding, count, global_batch_size, image_shape)


# ----------------------------------------------------------------------------------
# The graph.


def _train_dataset(source, data_config, rows, global_batch_size, seed, start_step,
                   labels=False):
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  flip = bool(data_config.random_flip)
  n, b = source.num_examples, len(rows)

  def plan(chunk):  # -> indices [K, b], flips [K, b] for K consecutive steps
    steps = start_step + chunk * _STEPS_PER_CHUNK + np.arange(_STEPS_PER_CHUNK)
    idx, flips = example_order.train_plan(
        seed=seed, steps=steps, global_batch_size=global_batch_size, num_examples=n,
        rows=rows)
    return idx, flips & flip

  def numpy_plan(chunk):
    idx, flips = tf.numpy_function(plan, [chunk], (tf.int64, tf.bool), stateful=False)
    return (tf.ensure_shape(idx, [_STEPS_PER_CHUNK, b]),
            tf.ensure_shape(flips, [_STEPS_PER_CHUNK, b]))

  ds = tf.data.Dataset.counter(dtype=tf.int64).map(numpy_plan).unbatch()
  return _finish(_gather(source, ds, b, labels))


def _eval_dataset(source, rows, global_batch_size, num_images):
  n = source.num_examples
  if num_images == 0 or num_images > n:
    raise ValueError(f"num_images={num_images} but {source.name} holds {n} images; use "
                     f"1..{n}, or -1 for all of them.")
  count = n if num_images < 0 else num_images
  num_batches = -(-count // global_batch_size)
  positions = np.arange(num_batches)[:, None] * global_batch_size + rows  # [batches, b]
  ds = tf.data.Dataset.from_tensor_slices(
      (np.minimum(positions, count - 1), positions < count))
  return _finish(_gather(source, ds, len(rows))), count


def _gather(source, ds, size, labels=False):
  """(indices int64 [b], x [b]) -> (images uint8 [b, S, S, C], x [b][, labels [b]])."""
  if labels and getattr(source, "labels", None) is None:
    raise ValueError(f"{source.name} holds no class labels (load it with num_classes > 0).")
  if isinstance(source, sources.ArraySource):
    images = tf.constant(source.images)
    if labels:
      label_table = tf.constant(source.labels)
      return ds.map(lambda idx, x: (tf.gather(images, idx), x, tf.gather(label_table, idx)),
                    num_parallel_calls=AUTOTUNE)
    return ds.map(lambda idx, x: (tf.gather(images, idx), x), num_parallel_calls=AUTOTUNE)

  def read(idx, x):
    records = tf.numpy_function(source.read_records, [idx], tf.string, stateful=False)
    encoded = tf.io.parse_example(tf.ensure_shape(records, [size]),
                                  {"image": tf.io.FixedLenFeature([], tf.string)})
    return encoded["image"], x

  def decode(encoded, x):
    image = tf.io.decode_image(encoded, channels=source.channels, expand_animations=False)
    if source.crop_and_resize:
      image = sources.center_crop_and_resize(image, source.image_size)
    else:  # Fails at run time if a stored image has another size.
      image = tf.ensure_shape(image, [source.image_size, source.image_size, source.channels])
    return image, x

  ds = ds.map(read, num_parallel_calls=AUTOTUNE).unbatch()
  ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
  return ds.batch(size, drop_remainder=True)


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(AUTOTUNE)


def _numpy_batches(ds: tf.data.Dataset):
  """Iterates a dataset of tensor tuples as NumPy (zero-copy views; 2-3x less overhead
  per element than `as_numpy_iterator`)."""
  for element in ds:
    yield tuple(np.asarray(t) for t in element)


def _global_arrays(local_batches, place, buffer_size: int = 2):
  """Turns local NumPy batches into global jax.Arrays, `buffer_size` batches ahead.

  `place(batch)` makes the global arrays (`jax.make_array_from_process_local_data`);
  creating them ahead overlaps the host to device copies with the computation.
  """
  queue = collections.deque()

  def enqueue(n):
    for batch in local_batches:
      queue.append(place(batch))
      if len(queue) >= n:
        return

  def generate():
    enqueue(buffer_size)
    while queue:
      yield queue.popleft()
      enqueue(buffer_size)
  return generate()


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs (JAX owns them); a no-op once TF has started."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass


_hide_accelerators_from_tf()
