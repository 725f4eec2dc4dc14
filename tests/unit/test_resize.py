"""The Inception preprocessing against TensorFlow's own legacy bilinear resize."""

import numpy as np
import pytest
import shared_data
import tensorflow as tf

from diffusion_jax.evaluation import resize


def _tf_legacy(x, size=(299, 299)):
  return tf.compat.v1.image.resize_bilinear(x, size, align_corners=False).numpy()


@pytest.mark.parametrize("shape", [(3, 28, 28, 3), (3, 32, 32, 3), (2, 17, 40, 2),
                                   (1, 400, 311, 3)])
def test_resize_matches_tf_compat_v1_resize_bilinear(shape):
  rng = np.random.default_rng(sum(shape))
  x = rng.integers(0, 256, shape).astype(np.float32)
  ours = np.asarray(resize.resize_bilinear_legacy(x, (299, 299)))
  ref = _tf_legacy(x)
  assert ours.shape == ref.shape == (shape[0], 299, 299, shape[3])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # The check discriminates: TF2's half-pixel-centred bilinear resize is different.
  modern = tf.image.resize(x, (299, 299), method="bilinear").numpy()
  assert np.abs(modern - ref).max() > 1.0


def test_legacy_interpolation_indices():
  # 32 -> 299: src = i * (32 / 299); the last rows clamp to the last input row.
  lower, upper, lerp = resize.legacy_interpolation(32, 299)
  src = np.arange(299) * np.float32(32 / 299)
  np.testing.assert_array_equal(lower, np.floor(src).astype(np.int32))
  assert upper.max() == 31 and lower.min() == 0
  np.testing.assert_allclose(lerp, src - np.floor(src), atol=1e-6)
  # Identity size: no interpolation at all.
  lower, upper, lerp = resize.legacy_interpolation(299, 299)
  np.testing.assert_array_equal(lower, np.arange(299))
  assert not lerp.any()


def test_preprocess_grey_mnist_and_rgb_cifar():
  with np.load(shared_data.MNIST) as data:
    grey = data["x_test"][:3]  # [3, 28, 28] uint8
  with np.load(shared_data.CIFAR) as data:
    rgb = data["x"][:3]  # [3, 32, 32, 3] uint8
  # Grey digits: replicated to RGB (documented convention), then TF's resize.
  ours = np.asarray(resize.preprocess_for_inception(grey))
  ref = (_tf_legacy(np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)) - 128) / 128
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
  assert np.array_equal(ours[..., 0], ours[..., 2])
  ours = np.asarray(resize.preprocess_for_inception(rgb))
  ref = (_tf_legacy(rgb.astype(np.float32)) - 128) / 128
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
  # The TF graph's input range: [0, 255] -> [-1, 0.9921875].
  extremes = np.zeros((1, 299, 299, 3), np.uint8)
  extremes[:, :, 150:] = 255
  out = np.asarray(resize.preprocess_for_inception(extremes))
  assert out.min() == -1.0 and out.max() == 0.9921875


def test_bad_channel_count_is_rejected():
  with pytest.raises(ValueError, match="grey"):
    resize.preprocess_for_inception(np.zeros((1, 8, 8, 2), np.uint8))
