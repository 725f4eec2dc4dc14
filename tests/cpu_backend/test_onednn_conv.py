"""The oneDNN convolutions (`models/onednn.py`) against float64 NumPy and diffusers.

The reference convolution is written here in NumPy from the definition (zero padding,
strided 3x3 windows), in float64, with its two gradients: dx scatters g @ W[i, j]^T back
onto the windows, dW[i, j] sums window^T @ g. Geometries cover batch 1 (one slice), odd
batches (unequal slices on XLA's two threads), stride 2 with odd sizes, three input or
output channels (the network's first and last convolutions) and the 4x4 maps.

Every test here runs oneDNN's direct convolution (`DIFFUSION_JAX_WINOGRAD=0`, an autouse
fixture); Winograd's algorithm has its own tests in test_winograd.py.

The session runs with 8 fake CPU devices, where `conv3x3` leaves oneDNN off by default
(its custom calls carry no sharding rule), so these tests ask for it with
`conv.cpu_library("onednn")`; one test checks the default in a one-device process.
"""

import ctypes
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unet_fixtures import assert_gradients_close
from unet_fixtures import small_unet_against_diffusers
from unet_fixtures import small_unet_parameter_gradients

from diffusion_jax.models import conv
from diffusion_jax.models import onednn

TARGET = "diffusion_jax_onednn_conv"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def direct_convolutions(monkeypatch):
  """oneDNN's direct convolution for every call here (Winograd's: test_winograd.py)."""
  monkeypatch.setenv(onednn.WINOGRAD_ENV, "0")


def test_the_library_builds_and_loads_here():
  # Everything below depends on it; a machine without g++ fails here, by name.
  assert onednn.available(), onednn._state.get("error")


def _windows(x_pad, stride, out_h, out_w):
  for i in range(3):
    for j in range(3):
      yield i, j, x_pad[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride, :]


def numpy_conv_and_grads(x, w, g, stride):
  """float64 y = conv(x, w) with TF "SAME" padding, and dx, dw for output cotangent g.

  (With a bias b, y + b, and db = g summed over batch and positions.)
  """
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  (top, bottom), (left, right) = [conv.same_padding(n, stride) for n in x.shape[1:3]]
  x_pad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = g.shape[1:3]
  y = np.zeros(g.shape)
  dx_pad = np.zeros(x_pad.shape)
  dw = np.zeros(w.shape)
  for i, j, window in _windows(x_pad, stride, out_h, out_w):
    y += window @ w[i, j]
    dw[i, j] = np.einsum("bhwc,bhwo->co", window, g)
    dx_pad[:, i:i + stride * (out_h - 1) + 1:stride,
           j:j + stride * (out_w - 1) + 1:stride, :] += g @ w[i, j].T
  dx = dx_pad[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return y, dx, dw


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


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

  with conv.cpu_library("onednn"):
    f = jax.jit(lambda x, w: jax.vjp(lambda a, b: conv.conv3x3(a, b, stride), x, w))
    y, vjp = f(x, w)
    dx, dw = vjp(jnp.asarray(g))
    hlo = jax.jit(lambda x, w: conv.conv3x3(x, w, stride)).lower(x, w).as_text()
  assert TARGET in hlo
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  assert (y.shape, dx.shape, dw.shape) == (want_y.shape, want_dx.shape, want_dw.shape)
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    assert _rel(got, want) < 2e-6


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
  with conv.cpu_library("onednn"):
    f = lambda x, w, b: conv.conv3x3(x, w, stride, bias=b)
    y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, w, b)
    dx, dw, db = jax.jit(vjp)(jnp.asarray(g))
    hlo = jax.jit(f).lower(x, w, b).as_text()
  assert TARGET in hlo and "add" not in hlo.split(TARGET)[-1]  # no separate bias pass
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw), (db, want_db)):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert _rel(got, want) < 2e-6


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
  for library in ("onednn", "xla"):
    with conv.cpu_library(library):
      y, vjp = jax.jit(lambda *a: jax.vjp(conv.conv1x1, *a))(x, w, b)
      grads = jax.jit(vjp)(jnp.asarray(g))
      hlo = jax.jit(lambda *a: conv.conv1x1(*a)).lower(x, w, b).as_text()
    assert (TARGET in hlo) == (library == "onednn")
    for got, w_ in zip((y,) + grads, want):
      assert got.shape == w_.shape and _rel(got, w_) < 2e-6, library


def test_grad_under_vmap_matches_numpy_per_example():
  rng = np.random.default_rng(7)
  xs = rng.standard_normal((3, 2, 6, 6, 4)).astype(np.float32)  # 3 batches of 2
  w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  g = rng.standard_normal((3, 2, 6, 6, 5)).astype(np.float32)
  loss = lambda x, w, g: jnp.vdot(conv.conv3x3(x, w), g)
  with conv.cpu_library("onednn"):
    dws = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None, 0)))(xs, w, g)
  for k in range(3):
    assert _rel(dws[k], numpy_conv_and_grads(xs[k], w, g[k], 1)[2]) < 2e-6


def test_the_callers_openmp_thread_count_is_left_as_it_was():
  # The handlers set OpenMP thread counts on the threads that run them, XLA's or (for
  # operations XLA runs inline) the caller's; PyTorch shares the process's libgomp.so.1,
  # so a count left at 1 made its next operations single-threaded.
  gomp = ctypes.CDLL("libgomp.so.1")
  gomp.omp_set_num_threads(3)
  x = jnp.ones((8, 16, 16, 32))
  w = jnp.ones((3, 3, 32, 32))
  with conv.cpu_library("onednn"):
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv.conv3x3(x, w)), (0, 1)))(x, w)
  jax.block_until_ready(grads)
  assert gomp.omp_get_max_threads() == 3


def _lowered(library, dtype=jnp.float32):
  x = jnp.zeros((2, 8, 8, 4), dtype)
  w = jnp.zeros((3, 3, 4, 4), dtype)
  with conv.cpu_library(library):
    return jax.jit(lambda x, w: conv.conv3x3(x, w)).lower(x, w).as_text()


def test_choice_of_library():
  assert TARGET in _lowered("onednn")
  assert TARGET not in _lowered("xla")
  assert TARGET not in _lowered("onednn", jnp.bfloat16)  # float32 only
  # "auto" with several devices (this session has 8): XLA's, which the partitioner knows.
  assert jax.device_count() == 8 and TARGET not in _lowered("auto")
  with pytest.raises(ValueError, match="cpu_library"):
    _lowered("mkl")


def test_auto_uses_onednn_in_a_one_device_process_and_the_environment_turns_it_off():
  code = ("import jax, jax.numpy as jnp\n"
          "from diffusion_jax.models import conv\n"
          "x = jnp.zeros((2, 8, 8, 4)); w = jnp.zeros((3, 3, 4, 4))\n"
          "print(jax.device_count(), "
          f"{TARGET!r} in jax.jit(conv.conv3x3).lower(x, w).as_text())\n")
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  for setting, want in (("", "1 True"), ("xla", "1 False")):
    env[conv.CPU_LIBRARY_ENV] = setting
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == want, result.stderr[-2000:]


def test_small_unet_matches_diffusers_with_onednn_convolutions():
  # Every convolution of the network, strided downsampling included, through oneDNN's
  # direct convolution.
  with conv.cpu_library("onednn"):
    want, got, hlo = small_unet_against_diffusers(seed=1)
  assert hlo.count(TARGET) >= 20 and "winograd = true" not in hlo
  assert np.linalg.norm(want) > 0.1 * np.sqrt(want.size)
  assert _rel(got, want) <= 1e-5


def test_small_unet_parameter_gradients_match_xla_convolutions():
  grads = small_unet_parameter_gradients(
      3, {library: functools.partial(conv.cpu_library, library)
          for library in ("onednn", "xla")})
  assert_gradients_close(grads["onednn"], grads["xla"])


def test_build_errors_name_the_missing_piece_and_the_fix(tmp_path, monkeypatch):
  with pytest.raises(onednn.OnednnUnavailable, match="no C\\+\\+ compiler 'no-such-cxx'"):
    onednn.build(tmp_path, cxx="no-such-cxx")
  monkeypatch.setattr(onednn, "HEADERS_DIST", "no-such-onednn-headers")
  with pytest.raises(onednn.OnednnUnavailable,
                     match="'no-such-onednn-headers' is not installed.*pip install"):
    onednn.build(tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_build_compiles_once_into_the_cache_folder(tmp_path):
  first = onednn.build(tmp_path)
  stamp = first.stat().st_mtime_ns
  second = onednn.build(tmp_path)
  assert first == second and second.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left
