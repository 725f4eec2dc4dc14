"""Where the training and evaluation images come from, as uint8 at the configured size.

Two kinds of source, both random access by example index (the input pipeline gathers the
examples of each batch by index, see `example_order`):

* `ArraySource`: every image of the split in memory as uint8 [N, S, S, C] with
  S = `data.image_size`: scikit-learn's `digits`, an `npz` file, a `folder` of image files,
  and the tensorflow-datasets `cifar10` and `mnist` (150 MB and 47 MB).
* `RecordSource`: a prepared tensorflow-datasets dataset in ArrayRecord format opened
  with `as_data_source` (random access without loading it): `celeb_a_hq` and LSUN
  (`lsun/church_outdoor`, `lsun/bedroom`, `lsun/cat`). The encoded images are decoded,
  center-cropped and resized inside tf.data (`center_crop_and_resize`).

Sizes. LSUN images have varying sizes (the shorter side is 256): as in the official
preparation (StyleGAN's dataset tool: center crop to the shorter side, then PIL's
ANTIALIAS resize to 256) every image is center-cropped to a square and resized to
`data.image_size`. The same happens to every `folder` image and to the 8x8 digits (the
quickstart trains at their native 8x8, where this is the identity). Other sources have a
fixed size: if it differs from `data.image_size`, `data.resize=True` center-crops and
resizes them; otherwise it is an error. Resizing is antialiased Lanczos-3 when downsampling (`tf.image.resize`; it agrees
with PIL's LANCZOS/ANTIALIAS to within a few levels) and bilinear interpolation with
half-pixel centers when upsampling (no ringing); the result is rounded (half to even)
and clipped to uint8, so the data stay on the 256-level grid that the discretized
decoder and bits/dim assume.

Splits. tfds sources accept any tfds split string (`train`, `test[:10%]`, ...). Array
sources accept `train` and, for npz files, any `S` with an array `x_S` in the file
(`test` for mnist.npz), each optionally sliced as `name[a:b]` (ints or percents).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence
import zipfile
import zlib

import numpy as np
import tensorflow as tf

LSUN_DATASETS = ("lsun/church_outdoor", "lsun/bedroom", "lsun/cat")
TFDS_ARRAY_DATASETS = {"cifar10": (32, 3), "mnist": (28, 1)}  # name: (size, channels)
CELEBA_HQ_RESOLUTIONS = tuple(2**k for k in range(11))  # tfds configs celeb_a_hq/1 .. /1024
DATASETS = ("cifar10", "mnist", "celeb_a_hq", *LSUN_DATASETS, "digits", "npz", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """All images of a split in memory.

  Attributes:
    name: a description for messages.
    images: uint8 [N, S, S, C].
    labels: int32 [N] class labels, or None (loaded only for class-conditional runs).
  """
  name: str
  images: np.ndarray
  labels: np.ndarray | None = None

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Random access to the encoded images of a prepared tfds split.

  Attributes:
    name: the tfds name (with config), e.g. "lsun/church_outdoor".
    records: a random-access sequence (`len`, `__getitems__`) of serialized
      `tf.train.Example`s (tfds RAW_BYTES) whose "image" feature holds the encoded image.
    crop_and_resize: whether each decoded image is center-cropped and resized to
      `image_size` (else it must already be image_size x image_size).
    image_size: S.
    channels: C.
  """
  name: str
  records: Sequence[Any]
  crop_and_resize: bool
  image_size: int
  channels: int

  @property
  def num_examples(self) -> int:
    return len(self.records)

  def read_records(self, indices: np.ndarray) -> np.ndarray:
    """Returns the serialized examples at `indices`, object array [n] of bytes.

    `__getitems__` reads a batch of records at once (ArrayRecord reads the shards that
    hold them in parallel threads).
    """
    records = self.records.__getitems__([int(i) for i in indices])
    out = np.empty(len(records), dtype=object)
    out[:] = [bytes(r) for r in records]
    return out


Source = ArraySource | RecordSource


def load_source(data_config, split: str, num_classes: int = 0) -> Source:
  """Opens the split `split` of the dataset that `data_config` names.

  Args:
    data_config: the `data` section of the config (dataset, image_size, channels, path,
      npz_key, npz_label_key, tfds_data_dir, optionally resize).
    split: the split to read, e.g. data_config.train_split.
    num_classes: > 0 for a class-conditional run: the labels are loaded too (digits, the
      tfds label of cifar10 and mnist, an .npz labels array) and must lie in
      [0, num_classes).

  Returns:
    An `ArraySource` or a `RecordSource` with images of size data_config.image_size and
    data_config.channels channels.

  Raises:
    ValueError: unknown dataset or split, images whose size or channels do not match the
      config, a bad npz file, labels missing or out of range for a class-conditional run.
    FileNotFoundError: a missing npz file or folder, or a tfds dataset that is not prepared.
  """
  source = _load_source(data_config, split, num_classes > 0)
  if num_classes > 0:
    _check_labels(source, num_classes)
  return source


def _check_labels(source: Source, num_classes: int) -> None:
  labels = getattr(source, "labels", None)
  if labels is None:
    raise ValueError(f"{source.name} has no class labels, but model.num_classes="
                     f"{num_classes}: use cifar10, mnist, digits or an .npz with a labels "
                     "array (y_train / y, or data.npz_label_key), or set model.num_classes=0.")
  if labels.shape != (source.num_examples,):
    raise ValueError(f"{source.name}: {labels.shape} labels for {source.num_examples} images.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{source.name} has labels in [{labels.min()}, {labels.max()}] but "
                     f"model.num_classes={num_classes}: labels must lie in "
                     f"[0, {num_classes}); set --config.model.num_classes="
                     f"{int(labels.max()) + 1}.")


def _load_source(data_config, split: str, labels: bool) -> Source:
  name = data_config.dataset
  size, channels = int(data_config.image_size), int(data_config.channels)
  resize = bool(data_config.get("resize", False))
  if size < 1 or channels not in (1, 3):
    raise ValueError(f"data.image_size must be >= 1 and data.channels 1 or 3; got "
                     f"{size} and {channels}.")
  if name == "digits":
    base, part = parse_split(split, ("train",), "digits")
    images = part(digits_images())
    return ArraySource("digits", _fit_array(images, size, channels, "digits", True),
                       part(digits_labels()) if labels else None)
  if name == "npz":
    images = npz_images(data_config.path, data_config.npz_key, split)
    return ArraySource(
        f"npz {data_config.path}",
        _fit_array(images, size, channels, f"npz {data_config.path}", resize),
        npz_labels(data_config.path, data_config.get("npz_label_key", ""), split)
        if labels else None)
  if name == "folder":
    base, part = parse_split(split, ("train",), "folder")
    from diffusion_jax.data import image_folders  # pylint: disable=g-import-not-at-top
    images = part(image_folders.folder_images(data_config.path, size, channels,
                                bool(data_config.get("skip_bad_images", False))))
    return ArraySource(f"folder {data_config.path}", images)
  data_dir = data_config.tfds_data_dir or None
  if name in TFDS_ARRAY_DATASETS:
    native, native_channels = TFDS_ARRAY_DATASETS[name]
    _check_channels(name, native_channels, channels)
    if native != size and not resize:
      _raise_size(name, native, size)
    images, label_array = tfds_images(name, split, data_dir, labels)
    return ArraySource(f"{name}:{split}", _fit_array(images, size, channels, name, resize),
                       label_array)
  if name == "celeb_a_hq" or name.startswith("celeb_a_hq/"):
    res = int(name.split("/")[1]) if "/" in name else size
    if res not in CELEBA_HQ_RESOLUTIONS:
      raise ValueError(f"celeb_a_hq exists at {CELEBA_HQ_RESOLUTIONS} pixels, not {res}; set "
                       "--config.data.image_size to one of them (the paper uses 256).")
    if res != size and not resize:
      _raise_size(f"celeb_a_hq/{res}", res, size)
    return tfds_records(f"celeb_a_hq/{res}", split, data_dir, size, channels, res != size)
  if name in LSUN_DATASETS:
    return tfds_records(name, split, data_dir, size, channels, True)
  raise ValueError(f"Unknown dataset {name!r}; data.dataset must be one of {DATASETS}.")


def parse_split(split: str, names: Sequence[str] | None, source: str):
  """Parses `name` or `name[a:b]` (ints or percents) for an array source.

  Args:
    split: the split string.
    names: the valid names, or None for any.
    source: a description for messages.

  Returns:
    (name, a function that slices an array's first axis accordingly).
  """
  match = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", split)
  if not match or (names is not None and match.group(1) not in names):
    raise ValueError(f"Split {split!r} does not exist for {source}; use one of {tuple(names)}"
                     " (optionally sliced, e.g. 'train[:90%]'), e.g. "
                     f"--config.data.eval_split={names[0] if names else 'train'}.")

  def bound(text, n):
    if text is None:
      return None
    return round(int(text[:-1]) * n / 100) if text.endswith("%") else int(text)

  def part(array):
    n = array.shape[0]
    out = array[bound(match.group(2), n):bound(match.group(3), n)]
    if not out.shape[0]:
      raise ValueError(f"Split {split!r} of {source} is empty ({n} examples in all).")
    return out
  return match.group(1), part


def digits_labels() -> np.ndarray:
  """The digit (0..9) of each of scikit-learn's 1797 digits, int32 [1797]."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load_digits().target.astype(np.int32)


def npz_labels(path: str, key: str, split: str) -> np.ndarray:
  """The int32 class labels [N] of `split` in an .npz file: `key` (data.npz_label_key) if
  given, else `y_train` then `y` for split "train", `y_<split>` for any other split."""
  base, part = parse_split(split, None, f"npz {path}")
  with np.load(path, allow_pickle=False) as archive:
    keys = list(archive.keys())
    candidates = ([key] if key else ["y_train", "y"]) if base == "train" else [f"y_{base}"]
    chosen = next((k for k in candidates if k in keys), None)
    if chosen is None:
      raise ValueError(f"{path} has no labels array {' or '.join(candidates)} (arrays: "
                       f"{keys}); name it with --config.data.npz_label_key=NAME.")
    labels = part(archive[chosen])
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"Labels {chosen!r} in {path} have dtype {labels.dtype} and shape "
                     f"{labels.shape}; expected one integer label per image.")
  return labels.astype(np.int32)


def digits_images() -> np.ndarray:
  """scikit-learn's 1797 bundled 8x8 digits as uint8 [1797, 8, 8, 1]: round(v * 255 / 16)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  values = datasets.load_digits().images  # [1797, 8, 8] float64 in {0, ..., 16}
  return np.round(values * 255.0 / 16.0).astype(np.uint8)[..., None]


def npz_images(path: str, key: str, split: str) -> np.ndarray:
  """The uint8 images [N, H, W, C] of `split` in an .npz file.

  The array is `key` (data.npz_key) if given, else `x_train`, else `x`, else the only
  array, for split "train"; `x_<split>` for any other split. [N, H, W] arrays get C = 1.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"data.path={path!r} is not a file; the npz dataset needs "
                            "--config.data.path=/path/to/images.npz.")
  base, part = parse_split(split, None, f"npz {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      chosen = _npz_key(list(archive.keys()), key, base, split, path)
      images = part(archive[chosen])
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f"{path} ({os.path.getsize(path)} bytes) cannot be read as an .npz "
                     f"archive: {type(e).__name__}: {e}. Write it again (np.savez) or point "
                     "--config.data.path at another file.") from e
  if images.dtype != np.uint8:
    raise ValueError(f"Array {chosen!r} in {path} has dtype {images.dtype}; expected uint8 "
                     "images with values in [0, 255] (np.round(x).astype(np.uint8)).")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Array {chosen!r} in {path} has shape {images.shape}; expected "
                     "[N, H, W] or [N, H, W, C] with C = 1 or 3.")
  return images


def _npz_key(keys: list[str], key: str, base: str, split: str, path: str) -> str:
  if base != "train":
    if f"x_{base}" not in keys:
      raise ValueError(f"{path} has no array 'x_{base}' for split {split!r} (arrays: {keys}); "
                       "evaluate on the training images: --config.data.eval_split=train.")
    return f"x_{base}"
  if key:
    candidates = [key]
  else:
    candidates = ["x_train", "x"] + (keys if len(keys) == 1 else [])
  chosen = next((k for k in candidates if k in keys), None)
  if chosen is None:
    raise ValueError(f"{path} holds arrays {keys}; none is {key or 'x_train or x'}. Name "
                     "the image array with --config.data.npz_key=NAME.")
  return chosen


def tfds_images(name: str, split: str, data_dir: str | None, labels: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Loads a whole tfds split into memory: (images uint8 [N, H, W, C], labels int32 [N] or
  None) (cifar10, mnist)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=True)
  except Exception as e:  # Offline, unknown split, corrupt data: say what to do.
    raise RuntimeError(
        f"Could not load the tfds dataset {name!r} split {split!r} "
        f"(data_dir={data_dir}): {e}\nWithout internet, run `tfds build {name} "
        "--data_dir=DIR` on a machine with internet, copy DIR and set "
        "--config.data.tfds_data_dir=DIR; or use an array source "
        "(--config.data.dataset=npz --config.data.path=FILE.npz).") from e
  if not labels:
    batches = tfds.as_numpy(ds.map(lambda ex: ex["image"]).batch(4096))
    return np.concatenate(list(batches)), None
  batches = list(tfds.as_numpy(ds.map(lambda ex: (ex["image"], ex["label"])).batch(4096)))
  return (np.concatenate([b[0] for b in batches]),
          np.concatenate([b[1] for b in batches]).astype(np.int32))


def tfds_records(name: str, split: str, data_dir: str | None, image_size: int, channels: int,
                 crop_and_resize: bool) -> RecordSource:
  """Opens a prepared tfds dataset for random access (ArrayRecord), images left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  _check_channels(name, builder.info.features["image"].shape[-1], channels)
  prepared = builder.is_prepared()
  if prepared:
    splits = list(builder.info.splits)
    if re.match(r"\s*(\w+)", split).group(1) not in splits:
      raise ValueError(f"{name} has splits {splits}, not {split!r}; set e.g. "
                       f"--config.data.eval_split={splits[-1]}.")
  try:
    records = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except Exception as e:
    if not prepared:
      raise FileNotFoundError(_not_prepared_message(name, builder)) from e
    raise RuntimeError(
        f"{name} is prepared at {builder.data_dir} but not in a random-access format ({e}). "
        f"Convert it with `tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record`, or rebuild it with "
        f"`tfds build {name} --file_format=array_record`.") from e
  return RecordSource(name, records, crop_and_resize, image_size, channels)


def _not_prepared_message(name: str, builder) -> str:
  root = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
  if name.startswith("celeb_a_hq"):
    res = name.split("/")[1]
    manual = os.path.join(root, "downloads", "manual")
    return (
        f"The tfds dataset {name} is not prepared under {root}. CelebA-HQ needs a manual "
        f"download: create data{res}x{res}.tar (the CelebA-HQ images at {res}x{res}, made "
        "from CelebA and the CelebA-HQ deltas as described at https://github.com/tkarras/"
        "progressive_growing_of_gans#preparing-datasets-for-training),"
        f" put it in {manual}, then run `tfds build {name} --data_dir={root} "
        f"--manual_dir={manual} --file_format=array_record` and set "
        f"--config.data.tfds_data_dir={root}.")
  return (
      f"The tfds dataset {name} is not prepared under {root}. Prepare it once (it downloads "
      "LSUN from http://dl.yf.io/lsun and reads its LMDB files through tensorflow-io: "
      f"`pip install tensorflow-io`) with `tfds build {name} --data_dir={root} "
      f"--file_format=array_record` and set --config.data.tfds_data_dir={root}. Training "
      "reads it by random access, hence the ArrayRecord format.")


def center_crop_and_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Center-crops an image to a square and resizes it: uint8 [h, w, c] -> [size, size, c].

  The crop keeps rows [(h - m) // 2, (h + m) // 2) and the same for columns, m = min(h, w),
  as the official LSUN preparation. Downsampling is antialiased Lanczos-3, upsampling
  bilinear; the result is rounded and clipped to uint8. Works eagerly and in graphs.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  m = tf.minimum(h, w)
  image = image[(h - m) // 2:(h + m) // 2, (w - m) // 2:(w + m) // 2]
  out = tf.case([(m > size, lambda: _resize(image, size, "lanczos3")),
                 (m < size, lambda: _resize(image, size, "bilinear"))],
                default=lambda: image)
  return tf.ensure_shape(out, [size, size, image.shape[-1]])


def _resize(images: tf.Tensor, size: int, method: str) -> tf.Tensor:
  out = tf.image.resize(images, [size, size], method=method, antialias=method == "lanczos3")
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _fit_array(images: np.ndarray, size: int, channels: int, name: str, resize: bool):
  """Checks the channels and brings uint8 [N, H, W, C] images to [N, size, size, C]."""
  _check_channels(name, images.shape[-1], channels)
  _, h, w, _ = images.shape
  if h == w == size:
    return np.ascontiguousarray(images)
  if not resize:
    _raise_size(name, (h, w), size)
  m = min(h, w)
  images = images[:, (h - m) // 2:(h + m) // 2, (w - m) // 2:(w + m) // 2]
  if m == size:
    return np.ascontiguousarray(images)
  method = "lanczos3" if m > size else "bilinear"
  chunks = [_resize(tf.constant(images[i:i + 512]), size, method).numpy()
            for i in range(0, images.shape[0], 512)]
  return np.concatenate(chunks)


def _check_channels(name: str, native: int | None, channels: int) -> None:
  if native is not None and native != channels:
    raise ValueError(f"{name} images have {native} channel(s) but data.channels={channels}; "
                     f"set --config.data.channels={native}.")


def _raise_size(name: str, native, size: int):
  h, w = native if isinstance(native, tuple) else (native, native)
  fix = f"--config.data.image_size={h}" if h == w else "square images"
  shown = f"{h}x{w}"
  raise ValueError(
      f"{name} images are {shown} but data.image_size={size}. Use {fix}, or set "
      "data.resize=True to center-crop and resize them (antialiased Lanczos-3 down, "
      "bilinear up).")
