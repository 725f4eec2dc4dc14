"""The compiled GroupNorm (+ swish) kernels (`models/native_norm.py`) against float64.

The reference is the textbook formula (mean and variance over the pixels and the channels
of each group of a [B, P, G, C/G] view, affine, swish) in float64 NumPy, its gradients
by JAX's autodiff of the same formula in float64: independent of both our XLA version's
closed form and the C++ kernels. Shapes cover batch 1 (one slice), odd batches (unequal
slices on XLA's two threads), 1, some and one-channel groups, inputs whose mean is far
from zero (where a one-pass variance would lose digits) and pre-activations far beyond
the range where exp over- or underflows (the kernel's own exp clamps).

The session runs with 8 fake CPU devices, where the kernels are off by default (like the
oneDNN convolutions), so these tests ask for them with `conv.cpu_library("onednn")`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conv
from diffusion_jax.models import native_norm
from diffusion_jax.models import norm
from diffusion_jax.models import onednn

EPS = 1e-6
TARGET = "diffusion_jax_group_norm"


def _reference(x, scale, bias, groups, swish):
  """float64 textbook GroupNorm (+ swish) in jax.numpy, for values and autodiff."""
  b, c = x.shape[0], x.shape[-1]
  grouped = x.reshape(b, -1, groups, c // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
  a = ((grouped - mean) / jnp.sqrt(var + EPS)).reshape(x.shape) * scale + bias
  return a * jax.nn.sigmoid(a) if swish else a


def _reference_values_and_grads(x, scale, bias, g, groups, swish):
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, bias))
    y, vjp = jax.vjp(lambda *a: _reference(*a, groups, swish), *args)
    grads = vjp(jnp.asarray(np.asarray(g, np.float64)))
    return tuple(np.asarray(a) for a in (y,) + grads)


def _native_values_and_grads(x, scale, bias, g, groups, swish):
  f = lambda *a: norm.group_norm(*a, num_groups=groups, epsilon=EPS, swish=swish)
  with conv.cpu_library("onednn"):
    y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, scale, bias)
    return (y,) + jax.jit(vjp)(g)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(shape, seed, offset=4.0, spread=2.0, scale_size=0.3):
  rng = np.random.default_rng(seed)
  x = (offset + spread * rng.standard_normal(shape)).astype(np.float32)
  scale = (1.0 + scale_size * rng.standard_normal(shape[-1])).astype(np.float32)
  bias = (0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return x, scale, bias, g


def test_the_kernels_are_built_and_registered():
  assert onednn.available(), onednn._state.get("error")  # pylint: disable=protected-access


SHAPES = [  # shape, groups
    ((1, 6, 6, 8), 2),
    ((3, 5, 7, 16), 4),
    ((5, 4, 4, 32), 32),
    ((2, 8, 8, 12), 1),
    ((4, 16, 16, 64), 32),
    ((3, 9, 24), 3),  # one spatial axis: [B, P, C]
]


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_values_and_gradients_match_float64(shape, groups, swish):
  x, scale, bias, g = _inputs(shape, seed=len(shape) * 100 + shape[0] + groups)
  got = _native_values_and_grads(x, scale, bias, g, groups, swish)
  want = _reference_values_and_grads(x, scale, bias, g, groups, swish)
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert a.dtype == jnp.float32 and a.shape == b.shape, name
    assert _rel(a, b) < 2e-6, (name, _rel(a, b))


def test_swish_beyond_the_range_of_exp():
  # Pre-activations out to about +-300: exp(-a) over- and underflows in float32 there;
  # the kernel clamps its argument, and swish and its derivative must still be right.
  x, scale, bias, g = _inputs((2, 8, 8, 16), seed=5, scale_size=0.0)
  scale = np.linspace(-150.0, 150.0, 16).astype(np.float32)
  got = _native_values_and_grads(x, scale, bias, g, 4, True)
  want = _reference_values_and_grads(x, scale, bias, g, 4, True)
  assert np.abs(want[0]).max() > 200.0  # the test reaches far beyond +-88
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert np.all(np.isfinite(a)), name
    assert _rel(a, b) < 2e-6, (name, _rel(a, b))
  # Elementwise too: no value is far off (float32's x_hat is good to about 1e-7 of it;
  # the scale multiplies that error).
  error = np.abs(np.asarray(got[0], np.float64) - want[0])
  assert np.all(error <= 1e-6 * (np.abs(want[0]) + np.abs(scale)) + 1e-6)


def test_agrees_with_the_xla_version_under_vmap():
  x, scale, bias, g = _inputs((3, 2, 6, 6, 8), seed=9)  # 3 batches of 2
  loss = lambda x, s, b, g: jnp.vdot(
      norm.group_norm(x, s, b, num_groups=4, epsilon=EPS, swish=True), g)
  grads = {}
  for library in ("onednn", "xla"):
    with conv.cpu_library(library):
      grads[library] = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)),
                                        in_axes=(0, None, None, 0)))(x, scale, bias, g)
  for a, b in zip(grads["onednn"], grads["xla"]):
    assert a.shape == b.shape
    assert _rel(a, b) < 1e-5


def _lowered(library, dtype=jnp.float32, out_dtype=None):
  x = jnp.zeros((2, 4, 4, 8), dtype)
  s = jnp.ones((8,))
  with conv.cpu_library(library):
    f = lambda x: norm.group_norm(x, s, s, num_groups=4, epsilon=EPS, out_dtype=out_dtype)
    return jax.jit(f).lower(x).as_text()


def test_used_where_the_onednn_convolutions_are():
  assert TARGET in _lowered("onednn")
  assert TARGET not in _lowered("xla")
  assert TARGET not in _lowered("onednn", jnp.bfloat16)  # float32 only
  assert TARGET not in _lowered("onednn", out_dtype=jnp.bfloat16)
  assert jax.device_count() == 8 and TARGET not in _lowered("auto")


def test_bad_input_is_named():
  x = jnp.zeros((2, 4, 4, 12))
  s = jnp.ones((12,))
  with pytest.raises(ValueError, match="num_groups=5"):
    native_norm.group_norm(x, s, s, num_groups=5, epsilon=EPS)
  with pytest.raises(ValueError, match="float32"):
    native_norm.group_norm(x.astype(jnp.bfloat16), s, s, num_groups=4, epsilon=EPS)
