"""GroupNorm (+ swish) with its closed-form gradient vs autodiff of the textbook formula.

The reference is written here from the definition (mean and variance over H, W and the
channels of each group of a [B, H, W, G, C/G] view) and differentiated by JAX; in float64
the two must agree to rounding, in float32 to float32 accuracy, for inputs whose mean is
far from zero (where a one-pass variance would lose digits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.ops import reference as norm

EPS = 1e-6


def _reference(x, scale, bias, groups, swish):
  b, h, w, c = x.shape
  grouped = x.reshape(b, h, w, groups, c // groups)
  mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
  y = ((grouped - mean) / jnp.sqrt(var + EPS)).reshape(x.shape) * scale + bias
  return y * jax.nn.sigmoid(y) if swish else y


def _inputs(dtype, shape=(3, 5, 4, 12), seed=0):
  rng = np.random.default_rng(seed)
  x = 4.0 + 2.0 * rng.standard_normal(shape)  # Mean far from 0.
  scale = 1.0 + 0.3 * rng.standard_normal(shape[-1])
  bias = 0.3 * rng.standard_normal(shape[-1])
  g = rng.standard_normal(shape)
  return tuple(jnp.asarray(a, dtype) for a in (x, scale, bias, g))


def _both(x, scale, bias, g, groups, swish):
  ours = lambda *a: norm.group_norm(*a, num_groups=groups, epsilon=EPS, swish=swish)
  ref = lambda *a: _reference(*a, groups, swish)
  y, vjp = jax.vjp(ours, x, scale, bias)
  y_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
  return (y,) + jax.jit(vjp)(g), (y_ref,) + vjp_ref(g)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 12])
def test_float32_values_and_gradients(groups, swish):
  x, scale, bias, g = _inputs(jnp.float32)
  got, want = _both(x, scale, bias, g, groups, swish)
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert a.dtype == jnp.float32 and a.shape == b.shape, name
    assert _rel(a, b) < 2e-6, name


@pytest.mark.parametrize("swish", [False, True])
def test_float64_values_and_gradients_agree_to_rounding(swish):
  with jax.enable_x64(True):
    x, scale, bias, g = _inputs(jnp.float64, seed=1)
    got, want = _both(x, scale, bias, g, 4, swish)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
      assert a.dtype == jnp.float64, name
      assert _rel(a, b) < 1e-13, name


def test_bfloat16_input_keeps_dtypes_and_float32_statistics():
  x, scale, bias, g = _inputs(jnp.float32, seed=2)
  xb = x.astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda a, s, b: norm.group_norm(a, s, b, num_groups=4, epsilon=EPS,
                                                   swish=True), xb, scale, bias)
  dx, dscale, dbias = vjp(g.astype(jnp.bfloat16))
  assert y.dtype == dx.dtype == jnp.bfloat16 and dscale.dtype == jnp.float32
  want = _reference(xb.astype(jnp.float32), scale, bias, 4, True)
  assert _rel(y, want) < 1e-2
  y32 = norm.group_norm(xb, scale, bias, num_groups=4, epsilon=EPS, out_dtype=jnp.float32)
  assert y32.dtype == jnp.float32


def test_channels_not_divisible_by_groups_is_an_error():
  x, scale, bias, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="num_groups=5"):
    norm.group_norm(x, scale, bias, num_groups=5, epsilon=EPS)
