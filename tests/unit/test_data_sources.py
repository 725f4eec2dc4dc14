"""Tests for diffusion_jax.data_sources: every source, checked against independent readings.

References: the values in scikit-learn's digits, np.load of the files the tests write,
PIL for decoding and for the Lanczos resize of the official LSUN preparation, a float64
NumPy bilinear interpolation, and tfds' own tf.data reading of mock data.
"""

import io
import os

import numpy as np
import PIL.Image
import pytest
import shared_data
import tensorflow_datasets as tfds
from fake_tfds_records import mock_record_data

from diffusion_jax import config_base
from diffusion_jax.data import sources

SHARED = shared_data.DATA_DIR


def data_config(**overrides):
  config = config_base.get_base_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


def bilinear_reference(image, size):
  """float64 bilinear resize with half-pixel centers and edge clamping, rounded half-even."""
  n = image.shape[0]
  src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  f = src - lo
  x = image.astype(np.float64)
  rows = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
  out = rows[:, lo] * (1 - f)[None, :, None] + rows[:, hi] * f[None, :, None]
  return np.clip(np.round(out), 0, 255)


def pil_crop_lanczos(image, size):
  """The official LSUN preparation: center crop to the shorter side, PIL ANTIALIAS resize."""
  h, w = image.shape[:2]
  m = min(h, w)
  crop = image[(h - m) // 2:(h + m) // 2, (w - m) // 2:(w + m) // 2]
  return np.asarray(PIL.Image.fromarray(crop).resize((size, size), PIL.Image.LANCZOS))


def smooth_images(rng, shapes):
  """Natural-ish RGB images (low frequencies plus mild noise) of the given (h, w)."""
  out = []
  for h, w in shapes:
    coarse = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    image = np.asarray(PIL.Image.fromarray(coarse).resize((w, h), PIL.Image.BICUBIC))
    out.append(np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8))
  return out


# --- digits -----------------------------------------------------------------------


def test_digits_are_round_v_255_over_16_and_upsampled_bilinearly():
  from sklearn.datasets import load_digits
  raw = load_digits().images  # [1797, 8, 8] in {0..16}
  table = np.array([round(v * 255 / 16) for v in range(17)])  # Python round: half to even
  expected = table[raw.astype(int)][..., None]
  source = sources.load_source(data_config(dataset="digits", image_size=8, channels=1),
                                    "train")
  assert source.images.dtype == np.uint8 and source.images.shape == (1797, 8, 8, 1)
  np.testing.assert_array_equal(source.images, expected)
  assert table[16] == 255 and table[8] == 128

  up = sources.load_source(data_config(dataset="digits", image_size=16, channels=1),
                                "train[:50]")
  assert up.images.shape == (50, 16, 16, 1)
  reference = np.stack([bilinear_reference(x, 16) for x in expected[:50].astype(np.uint8)])
  np.testing.assert_array_equal(up.images, reference)

  held_out = sources.load_source(data_config(dataset="digits", image_size=8, channels=1),
                                      "train[90%:]")
  np.testing.assert_array_equal(held_out.images, expected[1617:])


def test_digits_errors():
  with pytest.raises(ValueError, match=r"channel\(s\) but data.channels=3.*channels=1"):
    sources.load_source(data_config(dataset="digits", image_size=8, channels=3), "train")
  with pytest.raises(ValueError,
                     match="Split 'test' does not exist for digits.*eval_split=train"):
    sources.load_source(data_config(dataset="digits", image_size=8, channels=1), "test")


# --- npz --------------------------------------------------------------------------


def test_npz_key_choice_shapes_splits_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
  grey_test = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
  rgb = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
  paths = {}
  for name, arrays in {"split": dict(x_train=grey, x_test=grey_test, y_train=np.arange(10)),
                       "x": dict(x=rgb, y=np.arange(5)), "only": dict(pics=rgb),
                       "named": dict(a=grey, b=rgb), "float": dict(x=rgb.astype(np.float32)),
                       "bad_shape": dict(x=grey[:, :, :, None, None])}.items():
    paths[name] = str(tmp_path / f"{name}.npz")
    np.savez(paths[name], **arrays)

  def load(name, split="train", channels=1, key=""):
    config = data_config(dataset="npz", path=paths[name], npz_key=key, image_size=6,
                         channels=channels)
    return sources.load_source(config, split).images

  np.testing.assert_array_equal(load("split"), grey[..., None])
  np.testing.assert_array_equal(load("split", "test"), grey_test[..., None])
  np.testing.assert_array_equal(load("split", "test[1:3]"), grey_test[1:3, ..., None])
  np.testing.assert_array_equal(load("x", channels=3), rgb)
  np.testing.assert_array_equal(load("only", channels=3), rgb)
  np.testing.assert_array_equal(load("named", key="a"), grey[..., None])
  np.testing.assert_array_equal(load("named", key="b", channels=3), rgb)
  with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\].*npz_key"):
    load("named")
  with pytest.raises(ValueError, match="none is c"):
    load("named", key="c")
  with pytest.raises(ValueError, match="no array 'x_test'.*eval_split=train"):
    load("x", "test", channels=3)
  with pytest.raises(ValueError, match="dtype float32; expected uint8"):
    load("float", channels=3)
  with pytest.raises(ValueError, match=r"shape \(10, 6, 6, 1, 1\)"):
    load("bad_shape")
  with pytest.raises(ValueError, match=r"3 channel\(s\) but data.channels=1"):
    load("x", channels=1)
  with pytest.raises(FileNotFoundError, match="data.path='.*missing.npz' is not a file"):
    sources.load_source(data_config(dataset="npz", path=str(tmp_path / "missing.npz")),
                             "train")
  # A fixed size that differs: an error unless data.resize, then center crop + resize.
  with pytest.raises(ValueError, match=r"are 6x6 but data.image_size=4.*image_size=6.*resize"):
    sources.load_source(data_config(dataset="npz", path=paths["x"], image_size=4),
                             "train")
  config = data_config(dataset="npz", path=paths["x"], image_size=12)
  config.resize = True
  up = sources.load_source(config, "train").images
  np.testing.assert_array_equal(up, np.stack([bilinear_reference(x, 12) for x in rgb]))


def test_real_shared_npz_files():
  cifar_path = os.path.join(SHARED, "cifar10_train_first4000.npz")
  mnist_path = os.path.join(SHARED, "mnist.npz")
  cifar = sources.load_source(data_config(dataset="npz", path=cifar_path), "train")
  with np.load(cifar_path) as f:
    np.testing.assert_array_equal(cifar.images, f["x"])
  assert cifar.images.shape == (4000, 32, 32, 3)
  config = data_config(dataset="npz", path=mnist_path, image_size=28, channels=1)
  with np.load(mnist_path) as f:
    x_train, x_test = f["x_train"], f["x_test"]
  train = sources.load_source(config, "train").images
  test = sources.load_source(config, "test").images
  assert train.shape == (60000, 28, 28, 1) and test.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(train[..., 0], x_train)
  np.testing.assert_array_equal(test[..., 0], x_test)


# --- folder -----------------------------------------------------------------------


def test_folder_recursive_sorted_channels_and_resize(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (12, 12), dtype=np.uint8)
  rgba = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
  (big,) = smooth_images(rng, [(40, 30)])
  (tmp_path / "b" / "deep").mkdir(parents=True)
  PIL.Image.fromarray(rgb).save(tmp_path / "b" / "deep" / "0.png")
  PIL.Image.fromarray(grey).save(tmp_path / "a_grey.png")
  PIL.Image.fromarray(rgba).save(tmp_path / "b" / "alpha.PNG")
  PIL.Image.fromarray(big).save(tmp_path / "c.png")
  (tmp_path / "notes.txt").write_text("not an image")

  config = data_config(dataset="folder", path=str(tmp_path), image_size=12, channels=3)
  images = sources.load_source(config, "train").images
  # Sorted by path: a_grey.png, b/alpha.PNG, b/deep/0.png, c.png.
  assert images.shape == (4, 12, 12, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[0], np.repeat(grey[..., None], 3, axis=-1))
  np.testing.assert_array_equal(images[1], rgba[..., :3])
  np.testing.assert_array_equal(images[2], rgb)
  diff = np.abs(images[3].astype(int) - pil_crop_lanczos(big, 12))
  assert diff.max() <= 4 and diff.mean() < 0.6, (diff.max(), diff.mean())

  with pytest.raises(ValueError, match=r"3 images under .* are in colour .*channels=3"):
    sources.load_source(data_config(dataset="folder", path=str(tmp_path), image_size=12,
                                         channels=1), "train")
  grey_only = tmp_path / "grey_only"
  grey_only.mkdir()
  PIL.Image.fromarray(grey).save(grey_only / "g.png")
  one = sources.load_source(data_config(dataset="folder", path=str(grey_only),
                                             image_size=24, channels=1), "train").images
  np.testing.assert_array_equal(one[0], bilinear_reference(grey[..., None], 24))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No image files"):
    sources.load_source(data_config(dataset="folder", path=str(tmp_path / "empty")),
                             "train")
  with pytest.raises(FileNotFoundError, match="is not a directory.*data.path"):
    sources.load_source(data_config(dataset="folder", path=str(tmp_path / "nope")),
                             "train")


def test_undecodable_files_are_named_or_skipped_with_a_count(tmp_path, caplog):
  """A corrupt PNG and a truncated JPEG: the error names each (path, size, decoder's
  words); with data.skip_bad_images they are left out with a warning that counts them."""
  rng = np.random.default_rng(2)
  good = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(3)]
  for i, image in enumerate(good):
    PIL.Image.fromarray(image).save(tmp_path / f"good_{i}.png")
  png = (tmp_path / "good_0.png").read_bytes()
  (tmp_path / "bad.png").write_bytes(png[:30] + b"\0" * 40 + png[70:])
  buffer = io.BytesIO()
  PIL.Image.fromarray(good[1]).save(buffer, format="JPEG")
  (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  config = data_config(dataset="folder", path=str(tmp_path), image_size=12, channels=3)
  with pytest.raises(ValueError) as raised:
    sources.load_source(config, "train")
  message = str(raised.value)
  assert message.startswith(f"2 of 5 image files under {tmp_path} cannot be decoded")
  for name in ("bad.png", "cut.jpg"):
    size = os.path.getsize(tmp_path / name)
    assert f"{tmp_path / name} ({size} bytes): " in message, message
  assert "Invalid PNG" in message and "JPEG" in message and "skip_bad_images" in message
  config.skip_bad_images = True
  with caplog.at_level("WARNING"):
    images = sources.load_source(config, "train").images
  assert "Skipping 2 of 5 image files" in caplog.text and "cut.jpg" in caplog.text
  np.testing.assert_array_equal(images, np.stack(good))  # The good ones, in order.


def test_a_corrupt_npz_file_is_named(tmp_path):
  path = tmp_path / "images.npz"
  np.savez(path, x=np.zeros((4, 8, 8), np.uint8))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # Truncated.
  with pytest.raises(ValueError, match=rf"{path} \({len(data) // 2} bytes\) cannot be read "
                     r"as an .npz archive: \w+"):
    sources.load_source(data_config(dataset="npz", path=str(path), image_size=8,
                                    channels=1), "train")


# --- tensorflow-datasets ----------------------------------------------------------


@pytest.mark.parametrize("name,size,channels", [("cifar10", 32, 3), ("mnist", 28, 1)])
def test_tfds_in_memory_sources_on_mock_data(name, size, channels):
  with tfds.testing.mock_data(num_examples=12):
    source = sources.load_source(
        data_config(dataset=name, image_size=size, channels=channels), "train")
    # tfds' own streaming read of the same (mock) split.
    reference = np.stack([ex["image"] for ex in tfds.as_numpy(tfds.load(name, split="train"))])
  assert source.images.shape == (12, size, size, channels) and source.images.dtype == np.uint8
  np.testing.assert_array_equal(source.images, reference)


def test_tfds_size_and_channel_errors_come_before_reading():
  with pytest.raises(ValueError, match=r"cifar10 images are 32x32 but data.image_size=64.*"
                     r"image_size=32"):
    sources.load_source(data_config(dataset="cifar10", image_size=64), "train")
  with pytest.raises(ValueError, match=r"mnist images have 1 channel\(s\).*channels=1"):
    sources.load_source(data_config(dataset="mnist", image_size=28, channels=3), "train")
  with pytest.raises(ValueError, match=r"celeb_a_hq exists at .*256"):
    sources.load_source(data_config(dataset="celeb_a_hq", image_size=100), "train")
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*'cifar10'.*'lsun/cat'.*"
                     r"'digits'.*'npz'.*'folder'"):
    sources.load_source(data_config(dataset="imagenet"), "train")


def test_lsun_record_source_center_crops_and_resizes_like_the_official_preparation():
  rng = np.random.default_rng(2)
  images = smooth_images(rng, [(16, 24), (24, 16), (33, 40), (40, 21), (16, 16), (9, 12)])
  with mock_record_data(images):
    source = sources.load_source(data_config(dataset="lsun/church_outdoor",
                                                  image_size=16), "train")
  assert isinstance(source, sources.RecordSource) and source.num_examples == 6
  encoded = source.read_records(np.array([4, 0]))
  assert len(encoded) == 2
  import tensorflow as tf
  decoded = []
  for i in range(6):
    record = source.read_records(np.array([i]))
    parsed = tf.io.parse_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})
    image = tf.io.decode_image(parsed["image"][0], channels=3, expand_animations=False)
    decoded.append(sources.center_crop_and_resize(image, 16).numpy())
  np.testing.assert_array_equal(decoded[0], images[0][:, 4:20])  # crop only
  np.testing.assert_array_equal(decoded[1], images[1][4:20])
  np.testing.assert_array_equal(decoded[4], images[4])
  for i in (2, 3):  # downsampled: antialiased Lanczos-3 vs PIL's LANCZOS
    diff = np.abs(decoded[i].astype(int) - pil_crop_lanczos(images[i], 16))
    assert diff.max() <= 4 and diff.mean() < 0.6, (i, diff.max(), diff.mean())
  np.testing.assert_array_equal(decoded[5], bilinear_reference(images[5][:, 1:10], 16))


def test_tfds_not_prepared_messages_explain_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sources.load_source(data_config(dataset="celeb_a_hq", image_size=256,
                                         tfds_data_dir=str(tmp_path)), "train")
  message = str(info.value)
  for part in ("celeb_a_hq/256", "manual download", "data256x256.tar",
               os.path.join(str(tmp_path), "downloads", "manual"),
               "progressive_growing_of_gans", "tfds build celeb_a_hq/256",
               "--file_format=array_record", f"tfds_data_dir={tmp_path}"):
    assert part in message, (part, message)
  with pytest.raises(FileNotFoundError, match=r"tfds build lsun/bedroom --data_dir=.* "
                     r"--file_format=array_record"):
    sources.load_source(data_config(dataset="lsun/bedroom", image_size=256,
                                         tfds_data_dir=str(tmp_path)), "train")
