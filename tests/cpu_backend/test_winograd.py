"""Winograd's F(2x2, 3x3) convolutions (`backends/cpu/csrc/winograd.cc`,
`conv.conv(algorithm=...)`), and where the CPU backend uses them.

References: the float64 NumPy convolution and its two gradients of `kernel_references`
(written from the definition), diffusers' UNet2DModel, and XLA's convolutions. Geometries
cover odd and non-square maps (tiles cut by the border), a 1x1 map, channel counts that
are not multiples of the vector width, and enough tiles for several chunks per pool
thread, with chunks that straddle two images. Whether a program uses Winograd's algorithm
is the config's `cpu.winograd` (`make_ops(mesh, winograd=...)`), then the tile and
channel thresholds of `conv.use_winograd`.
"""

import ctypes

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from kernel_references import max_rel
from kernel_references import numpy_conv_and_grads
from kernel_references import one_device_mesh
from kernel_references import rel
from unet_fixtures import assert_gradients_close
from unet_fixtures import small_unet_against_diffusers
from unet_fixtures import small_unet_parameter_gradients

from diffusion_jax import ops
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import conv
from diffusion_jax.backends.cpu import library

pytestmark = pytest.mark.native

SAME = ((1, 1), (1, 1))
TARGET = "diffusion_jax_onednn_conv"


def _problem(batch, height, width, cin, cout, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, cin)).astype(np.float32)
  w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  b = rng.standard_normal(cout).astype(np.float32)
  g = rng.standard_normal((batch, height, width, cout)).astype(np.float32)
  return x, w, b, g


def _conv_and_grads(x, w, b, g, algorithm):
  f = lambda x, w, b: conv.conv(x, w, 1, SAME, b, algorithm=algorithm)
  y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, w, b)
  return (y, *jax.jit(vjp)(jnp.asarray(g)))


GEOMETRIES = [  # batch, height, width, cin, cout
    (1, 8, 8, 16, 16),
    (3, 7, 7, 32, 16),     # odd maps: the last row and column of tiles are half outside
    (2, 5, 6, 24, 40),     # non-square, odd height
    (1, 1, 1, 16, 16),     # one pixel: one tile, three quarters outside
    (2, 2, 3, 16, 17),
    (3, 30, 34, 16, 24),   # 765 tiles: several chunks per thread, chunks across images
    (2, 16, 16, 128, 64),  # the U-Net's channel counts
]


@pytest.mark.parametrize("batch,height,width,cin,cout", GEOMETRIES)
def test_values_and_all_gradients_match_float64_numpy(batch, height, width, cin, cout):
  x, w, b, g = _problem(batch, height, width, cin, cout, seed=height * 100 + cin)
  want_y, want_dx, want_dw = numpy_conv_and_grads(x, w, g, 1)
  want = (want_y + b, want_dx, want_dw, np.asarray(g, np.float64).sum(axis=(0, 1, 2)))
  got = _conv_and_grads(x, w, b, g, "winograd")
  direct = _conv_and_grads(x, w, b, g, "direct")
  for name, mine, theirs, exact in zip(("y", "dx", "dw", "db"), got, direct, want):
    assert mine.dtype == jnp.float32 and mine.shape == exact.shape, name
    # Rounding only: within a few float32 units of the largest value, like oneDNN's
    # direct convolution (the norm-relative error of both is ~1e-7).
    assert max_rel(mine, exact) < 3e-6, name
    assert rel(mine, exact) < 4 * rel(theirs, exact) + 2e-7, name


def test_non_finite_inputs_give_non_finite_outputs_around_them():
  # The transforms subtract inputs, so an inf turns into NaN (inf - inf) rather than inf;
  # either way it is not lost (NaN-loss checks see it).
  x, w, b, _ = _problem(1, 8, 8, 16, 16, seed=9)
  x[0, 3, 4, 5] = np.inf
  y = np.asarray(conv.conv(x, w, 1, SAME, b, algorithm="winograd"))
  assert not np.isfinite(y[0, 2:5, 3:6]).any()
  assert np.isfinite(np.delete(np.delete(y[0], range(1, 6), 0), range(2, 7), 1)).all()


def test_gradients_are_bitwise_reproducible():
  # The kernel gradient's partial sums are fixed per pool task, not per scheduling.
  x, w, b, g = _problem(3, 30, 34, 16, 24, seed=5)
  first = [np.asarray(a) for a in _conv_and_grads(x, w, b, g, "winograd")]
  for _ in range(3):
    again = _conv_and_grads(x, w, b, g, "winograd")
    for a, c in zip(first, again):
      np.testing.assert_array_equal(a, np.asarray(c))


def test_grad_under_vmap_matches_numpy_per_example():
  x, w, b, g = _problem(2, 6, 6, 16, 16, seed=7)
  del b
  xs = np.stack([x, x[::-1]])
  f = lambda x, w: jnp.sum(conv.conv(x, w, 1, SAME, algorithm="winograd") * g)
  got = jax.jit(jax.vmap(jax.grad(f, argnums=1), in_axes=(0, None)))(xs, w)
  for i in range(2):
    assert max_rel(got[i], numpy_conv_and_grads(xs[i], w, g, 1)[2]) < 3e-6


def test_the_callers_openmp_thread_count_is_left_as_it_was():
  # Winograd's sgemm runs with one OpenMP thread per pool task; the count is put back.
  gomp = ctypes.CDLL("libgomp.so.1")
  before = gomp.omp_get_max_threads()
  gomp.omp_set_num_threads(3)
  try:
    x, w, b, g = _problem(2, 16, 16, 32, 32, seed=11)
    jax.block_until_ready(_conv_and_grads(x, w, b, g, "winograd"))
    assert gomp.omp_get_max_threads() == 3
  finally:
    gomp.omp_set_num_threads(before)


def test_auto_picks_winograd_where_it_pays_and_direct_elsewhere():
  use = conv.use_winograd
  unet = dict(kernel_shape=(3, 3, 128, 128), stride=1, padding=SAME)
  assert use("auto", x_shape=(8, 32, 32, 128), min_tiles=128, **unet)
  assert not use("auto", x_shape=(1, 8, 8, 128), min_tiles=128, **unet)  # 16 tiles
  assert use("auto", x_shape=(1, 8, 8, 128), min_tiles=16, **unet)
  assert not use("direct", x_shape=(8, 32, 32, 128), **unet)
  assert not use("auto", (3, 3, 3, 128), 1, SAME, (8, 32, 32, 3))  # image channels
  assert not use("auto", (3, 3, 128, 128), 2, ((0, 1), (0, 1)), (8, 32, 32, 128))
  assert not use("auto", (1, 1, 128, 128), 1, ((0, 0), (0, 0)), (8, 32, 32, 128))
  assert not use("auto", (3, 3, 128, 3), 1, SAME, (8, 32, 32, 128))  # to image channels
  assert use("auto", (3, 3, 16, 16), 1, SAME, (8, 32, 32, 16))  # the channel boundary
  assert not use("auto", (3, 3, 15, 16), 1, SAME, (8, 32, 32, 15))
  assert not use("auto", (3, 3, 16, 15), 1, SAME, (8, 32, 32, 16))
  assert use("auto", x_shape=(2, 16, 15, 128), min_tiles=128, **unet)  # 2 x 8 x 8 tiles
  assert not use("auto", x_shape=(2, 16, 13, 128), min_tiles=128, **unet)  # 2 x 8 x 7
  assert use("winograd", (3, 3, 3, 1), 1, SAME, (1, 2, 2, 3), min_tiles=128)  # forced
  # The thresholds the U-Net's programs use.
  assert conv.WINOGRAD_MIN_CHANNELS == 16
  assert conv.WINOGRAD_MIN_TILES_FORWARD == 32 and conv.WINOGRAD_MIN_TILES_BACKWARD == 128


def test_forward_and_gradients_take_their_own_tile_thresholds():
  # 64 tiles: enough for the forward (WINOGRAD_MIN_TILES_FORWARD = 32), not for the
  # gradients (WINOGRAD_MIN_TILES_BACKWARD = 128).
  assert conv.WINOGRAD_MIN_TILES_FORWARD <= 64 < conv.WINOGRAD_MIN_TILES_BACKWARD
  x = jnp.zeros((1, 16, 16, 32), jnp.float32)
  w = jnp.zeros((3, 3, 32, 32), jnp.float32)
  f = lambda x, w: jnp.sum(conv.conv(x, w, 1, SAME))
  text = jax.jit(jax.value_and_grad(f, (0, 1))).lower(x, w).as_text()
  assert text.count("winograd = true") == 1 and text.count("winograd = false") == 1


def test_the_lowered_program_carries_the_choice():
  x = jnp.zeros((8, 16, 16, 32), jnp.float32)
  w = jnp.zeros((3, 3, 32, 32), jnp.float32)
  conv3x3 = cpu.make_ops(one_device_mesh()).conv3x3
  text = jax.jit(lambda x, w: conv3x3(x, w)).lower(x, w).as_text()
  strided = jax.jit(lambda x, w: conv3x3(x, w, 2)).lower(x, w).as_text()
  assert TARGET in text and "winograd = true" in text
  assert TARGET in strided and "winograd = false" in strided


def _cifar10_counts(backend) -> tuple[int, int]:
  """('winograd = true', 'winograd = false') counts of the forward and gradients of a
  CIFAR10 3x3 convolution at batch 8 through `backend`."""
  x = jnp.zeros((8, 32, 32, 128), jnp.float32)
  w = jnp.zeros((3, 3, 128, 128), jnp.float32)
  f = lambda x, w: jnp.sum(backend.conv3x3(x, w))
  text = jax.jit(jax.value_and_grad(f, (0, 1))).lower(x, w).as_text()
  return text.count("winograd = true"), text.count("winograd = false")


def test_the_policy_uses_winograd_for_the_cifar10_shapes_and_the_config_turns_it_off():
  mesh = one_device_mesh()
  assert _cifar10_counts(ops.resolve("auto", mesh)) == (2, 0)
  assert _cifar10_counts(cpu.make_ops(mesh)) == (2, 0)
  assert _cifar10_counts(ops.resolve("auto", mesh, winograd=False)) == (0, 2)
  assert _cifar10_counts(cpu.make_ops(mesh, winograd=False)) == (0, 2)
  config = ml_collections.ConfigDict({"model": {"kernels": "native"},
                                      "cpu": {"winograd": False}})
  assert _cifar10_counts(ops.from_config(config, mesh)) == (0, 2)
  config.cpu.winograd = True
  assert _cifar10_counts(ops.from_config(config, mesh)) == (2, 0)
  # An explicit algorithm still holds whatever the thresholds say.
  shape = dict(kernel_shape=(3, 3, 64, 64), stride=1, padding=SAME, x_shape=(1, 2, 2, 64))
  assert conv.use_winograd("winograd", min_tiles=128, **shape)
  assert not conv.use_winograd("auto", min_tiles=128, **shape)


def test_bad_requests_fail_with_the_fix():
  x = jnp.zeros((1, 8, 8, 16), jnp.float32)
  with pytest.raises(ValueError, match="takes 3x3 kernels, stride 1.*algorithm='direct'"):
    conv.conv(x, jnp.zeros((3, 3, 16, 16)), 2, ((0, 1), (0, 1)), algorithm="winograd")
  with pytest.raises(ValueError, match="algorithm='fast'"):
    conv.conv(x, jnp.zeros((3, 3, 16, 16)), 1, SAME, algorithm="fast")
  # The handler checks the geometry itself too (a call that bypasses the Python check).
  with pytest.raises(Exception, match="Winograd's algorithm takes 3x3 kernels"):
    jax.block_until_ready(library.ffi_call(
        "diffusion_jax_onednn_conv_forward", [(1, 8, 8, 16)], x,
        jnp.zeros((1, 1, 16, 16)), jnp.zeros((16,)), stride_h=np.int64(1),
        stride_w=np.int64(1), pad_top=np.int64(0), pad_bottom=np.int64(0),
        pad_left=np.int64(0), pad_right=np.int64(0), winograd=True))


@pytest.fixture
def winograd_everywhere(monkeypatch):
  """Every convolution Winograd applies to uses it, whatever its size."""
  monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
  monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES_FORWARD", 0)
  monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES_BACKWARD", 0)


def test_small_unet_matches_diffusers(winograd_everywhere):
  del winograd_everywhere
  want, got, text = small_unet_against_diffusers(
      seed=2, ops=cpu.make_ops(one_device_mesh()))
  # All 38 3x3 stride-1 convolutions (2 in each of the 17 residual blocks, the first and
  # last, 2 after upsampling); the 2 strided downsamplings and the 1x1 ones stay direct.
  assert text.count("winograd = true") == 38 and text.count("winograd = false") >= 2
  assert np.linalg.norm(want) > 0.1 * np.sqrt(want.size)
  assert rel(got, want) <= 1e-5


def test_small_unet_parameter_gradients_match_xla_convolutions(winograd_everywhere):
  del winograd_everywhere
  grads = small_unet_parameter_gradients(
      4, {"native": cpu.make_ops(one_device_mesh()), "xla": ops.XLA})
  assert_gradients_close(grads["native"], grads["xla"])
