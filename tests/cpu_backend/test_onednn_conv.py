"""The CPU backend's oneDNN convolutions (`backends/cpu/conv.py`) against float64 NumPy,
diffusers and XLA, and the kernel policy that picks them.

The reference convolution is `kernel_references.numpy_conv_and_grads` (float64 NumPy from
the definition). Geometries cover batch 1 (one slice), odd batches (unequal slices on
XLA's two threads), stride 2 with odd sizes, three input or output channels (the
network's first and last convolutions) and the 4x4 maps.

Every test here runs oneDNN's direct convolution (`make_ops(mesh, winograd=False)`, or
`algorithm="direct"`); Winograd's algorithm has its own tests in test_winograd.py, and
the runs over 8 devices theirs in test_per_shard.py. The operations here are those of a
one-device mesh, where each kernel is called directly.
"""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_references import eight_device_mesh
from kernel_references import numpy_conv_and_grads
from kernel_references import one_device_mesh
from kernel_references import rel
from unet_fixtures import SMALL
from unet_fixtures import assert_gradients_close
from unet_fixtures import random_params
from unet_fixtures import small_unet_against_diffusers
from unet_fixtures import small_unet_parameter_gradients

from diffusion_jax import ops
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import library
from diffusion_jax.models import UNet

pytestmark = pytest.mark.native

TARGET = "diffusion_jax_onednn_conv"
CPU_TARGETS = ("diffusion_jax_onednn_conv_forward", "diffusion_jax_group_norm_forward")


def direct_ops():
  """The CPU backend's operations on one device, every convolution oneDNN's direct one."""
  return cpu.make_ops(one_device_mesh(), winograd=False)


def test_the_library_builds_and_loads_here():
  # Everything below depends on it; a machine without g++ fails here, by name.
  assert cpu.unavailable_reason() is None
  assert library.unavailable_reason() is None


GEOMETRIES = [  # batch, height, width, cin, cout, stride
    (1, 8, 8, 4, 5, 1),
    (3, 9, 7, 5, 4, 1),
    (5, 6, 6, 3, 7, 2),
    (2, 9, 7, 5, 4, 2),
    (2, 16, 16, 3, 16, 1),
    (2, 8, 8, 32, 3, 1),
    (8, 4, 4, 64, 32, 1),
]


@pytest.mark.parametrize("batch,height,width,cin,cout,stride", GEOMETRIES)
def test_values_and_both_gradients_match_float64_numpy(batch, height, width, cin, cout,
                                                       stride):
  rng = np.random.default_rng(batch * 100 + height * 10 + stride)
  x = rng.standard_normal((batch, height, width, cin)).astype(np.float32)
  w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  out = (batch, -(-height // stride), -(-width // stride), cout)
  g = rng.standard_normal(out).astype(np.float32)
  want_y, want_dx, want_dw = numpy_conv_and_grads(x, w, g, stride)

  conv3x3 = direct_ops().conv3x3
  f = jax.jit(lambda x, w: jax.vjp(lambda a, b: conv3x3(a, b, stride), x, w))
  y, vjp = f(x, w)
  dx, dw = vjp(jnp.asarray(g))
  hlo = jax.jit(lambda x, w: conv3x3(x, w, stride)).lower(x, w).as_text()
  assert TARGET in hlo
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  assert (y.shape, dx.shape, dw.shape) == (want_y.shape, want_dx.shape, want_dw.shape)
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    assert rel(got, want) < 2e-6


@pytest.mark.parametrize("batch,height,width,cin,cout,stride", GEOMETRIES[1:5])
def test_bias_inside_the_convolution_and_its_gradient(batch, height, width, cin, cout,
                                                      stride):
  rng = np.random.default_rng(batch * 10 + cin)
  x = rng.standard_normal((batch, height, width, cin)).astype(np.float32)
  w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  b = rng.standard_normal(cout).astype(np.float32)
  out = (batch, -(-height // stride), -(-width // stride), cout)
  g = rng.standard_normal(out).astype(np.float32)
  want_y, want_dx, want_dw = numpy_conv_and_grads(x, w, g, stride)
  want_y = want_y + b
  want_db = np.asarray(g, np.float64).sum(axis=(0, 1, 2))
  conv3x3 = direct_ops().conv3x3
  f = lambda x, w, b: conv3x3(x, w, stride, bias=b)
  y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, w, b)
  dx, dw, db = jax.jit(vjp)(jnp.asarray(g))
  hlo = jax.jit(f).lower(x, w, b).as_text()
  assert TARGET in hlo and "add" not in hlo.split(TARGET)[-1]  # no separate bias pass
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw), (db, want_db)):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert rel(got, want) < 2e-6


@pytest.mark.parametrize("batch,size,cin,cout", [(1, 4, 8, 5), (3, 8, 12, 16),
                                                 (5, 4, 64, 32)])
def test_1x1_convolution_matches_float64_numpy(batch, size, cin, cout):
  rng = np.random.default_rng(cin)
  x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
  w = rng.standard_normal((cin, cout)).astype(np.float32)
  b = rng.standard_normal(cout).astype(np.float32)
  g = rng.standard_normal((batch, size, size, cout)).astype(np.float32)
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  want = (x64 @ w64 + b, g64 @ w64.T, np.einsum("bhwc,bhwo->co", x64, g64),
          g64.sum(axis=(0, 1, 2)))
  for backend in (direct_ops(), ops.XLA):
    y, vjp = jax.jit(lambda *a, f=backend.conv1x1: jax.vjp(f, *a))(x, w, b)
    grads = jax.jit(vjp)(jnp.asarray(g))
    hlo = jax.jit(backend.conv1x1).lower(x, w, b).as_text()
    assert (TARGET in hlo) == (backend.name == "native")
    for got, w_ in zip((y,) + grads, want):
      assert got.shape == w_.shape and rel(got, w_) < 2e-6, backend.name


def test_grad_under_vmap_matches_numpy_per_example():
  rng = np.random.default_rng(7)
  xs = rng.standard_normal((3, 2, 6, 6, 4)).astype(np.float32)  # 3 batches of 2
  w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  g = rng.standard_normal((3, 2, 6, 6, 5)).astype(np.float32)
  conv3x3 = direct_ops().conv3x3
  loss = lambda x, w, g: jnp.vdot(conv3x3(x, w), g)
  dws = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None, 0)))(xs, w, g)
  for k in range(3):
    assert rel(dws[k], numpy_conv_and_grads(xs[k], w, g[k], 1)[2]) < 2e-6


def test_the_callers_openmp_thread_count_is_left_as_it_was():
  # The handlers set OpenMP thread counts on the threads that run them, XLA's or (for
  # operations XLA runs inline) the caller's; PyTorch shares the process's libgomp.so.1,
  # so a count left at 1 made its next operations single-threaded.
  gomp = ctypes.CDLL("libgomp.so.1")
  before = gomp.omp_get_max_threads()
  gomp.omp_set_num_threads(3)
  try:
    x = jnp.ones((8, 16, 16, 32))
    w = jnp.ones((3, 3, 32, 32))
    conv3x3 = direct_ops().conv3x3
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv3x3(x, w)), (0, 1)))(x, w)
    jax.block_until_ready(grads)
    assert gomp.omp_get_max_threads() == 3
  finally:
    gomp.omp_set_num_threads(before)


def _lowered(backend, dtype=jnp.float32):
  x = jnp.zeros((2, 8, 8, 4), dtype)
  w = jnp.zeros((3, 3, 4, 4), dtype)
  return jax.jit(lambda x, w: backend.conv3x3(x, w)).lower(x, w).as_text()


def test_the_backends_lower_to_their_convolutions():
  assert TARGET in _lowered(direct_ops())
  assert TARGET in _lowered(cpu.make_ops(eight_device_mesh(), winograd=False))
  assert TARGET not in _lowered(ops.XLA)
  assert TARGET not in _lowered(direct_ops(), jnp.bfloat16)  # float32 only
  assert TARGET not in _lowered(ops.resolve("xla", one_device_mesh()))


def test_the_policy_does_not_depend_on_the_number_of_devices():
  # The CPU kernels run per device shard, so "auto" picks them on this CPU for one
  # device and for eight alike (not XLA's convolutions because of the device count).
  one, eight = one_device_mesh(), eight_device_mesh()
  assert ops.resolve("auto", one).name == ops.resolve("auto", eight).name == "native"
  assert ops.resolve("native", eight).name == "native"
  assert ops.resolve("xla", one) is ops.resolve("xla", eight) is ops.XLA
  with pytest.raises(ValueError, match="model.kernels='mkl'.*'auto', 'xla', 'native'"):
    ops.resolve("mkl", one)


def _lowered_small_unet(backend) -> str:
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        random_params(SMALL, seed=0))
  x = jax.ShapeDtypeStruct((2, SMALL.image_size, SMALL.image_size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  apply = lambda p, x, t: UNet(SMALL, ops=backend).apply({"params": p}, x, t, train=False)
  return jax.jit(apply).lower(params, x, t).as_text()


def test_the_policy_lowers_the_network_to_the_cpu_kernels_on_one_device_and_eight():
  for mesh in (one_device_mesh(), eight_device_mesh()):
    text = _lowered_small_unet(ops.resolve("auto", mesh))
    for target in CPU_TARGETS:
      assert target in text, (mesh.devices.size, target)
  assert "diffusion_jax_" not in _lowered_small_unet(ops.XLA)


def test_small_unet_matches_diffusers_with_onednn_convolutions():
  # Every convolution of the network, strided downsampling included, through oneDNN's
  # direct convolution.
  want, got, hlo = small_unet_against_diffusers(seed=1, ops=direct_ops())
  assert hlo.count(TARGET) >= 20 and "winograd = true" not in hlo
  assert np.linalg.norm(want) > 0.1 * np.sqrt(want.size)
  assert rel(got, want) <= 1e-5


def test_small_unet_parameter_gradients_match_xla_convolutions():
  grads = small_unet_parameter_gradients(3, {"native": direct_ops(), "xla": ops.XLA})
  assert_gradients_close(grads["native"], grads["xla"])


def test_build_errors_name_the_missing_piece_and_the_fix(tmp_path, monkeypatch):
  with pytest.raises(library.KernelsUnavailable, match="no C\\+\\+ compiler 'no-such-cxx'"):
    library.build(tmp_path, cxx="no-such-cxx")
  monkeypatch.setattr(library, "HEADERS_DIST", "no-such-onednn-headers")
  with pytest.raises(library.KernelsUnavailable,
                     match="'no-such-onednn-headers' is not installed.*pip install"):
    library.build(tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_build_compiles_once_into_the_cache_folder(tmp_path):
  first = library.build(tmp_path)
  stamp = first.stat().st_mtime_ns
  second = library.build(tmp_path)
  assert first == second and second.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left
