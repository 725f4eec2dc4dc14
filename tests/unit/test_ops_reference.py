"""The pure-JAX operations (`ops.reference`: the reference of every backend, and what runs
on TPU and GPU) against independent references.

conv3x3: `jax.vjp` of `lax.conv_general_dilated(padding="SAME")` (TF "SAME" padding,
XLA's own derivatives) and, in float64, the kernel gradient written out in NumPy;
conv1x1: a NumPy product; dropout: `flax.linen.Dropout`'s mask under the same key. The
GroupNorm reference is tested in test_group_norm_vjp.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import reference

# (stride, height, width): even and odd sizes, square and not (TF SAME pads high first).
GEOMETRIES = ((1, 8, 8), (1, 5, 7), (2, 8, 8), (2, 7, 6), (1, 1, 1))


def _lax(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  preferred_element_type=jnp.promote_types(x.dtype,
                                                                           jnp.float32))


def _inputs(dtype, stride, height, width, seed=0, channels=(4, 6)):
  rng = np.random.default_rng(seed)
  cin, cout = channels
  x = rng.standard_normal((2, height, width, cin))  # [B, H, W, Cin]
  kernel = rng.standard_normal((3, 3, cin, cout))  # HWIO
  out_shape = (2, -(-height // stride), -(-width // stride), cout)
  cotangent = rng.standard_normal(out_shape)
  return (jnp.asarray(x, dtype), jnp.asarray(kernel, dtype), jnp.asarray(cotangent, dtype))


def _both(x, kernel, g, stride):
  want, ref_vjp = jax.vjp(lambda a, b: _lax(a, b, stride), x, kernel)
  got, our_vjp = jax.vjp(lambda a, b: reference.conv3x3(a, b, stride), x, kernel)
  return (want,) + ref_vjp(g), (got,) + jax.jit(our_vjp)(g)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("stride,height,width", GEOMETRIES)
def test_conv3x3_float32_output_and_gradients_match_lax(stride, height, width):
  x, kernel, g = _inputs(jnp.float32, stride, height, width)
  (want_y, want_dx, want_dw), (y, dx, dw) = _both(x, kernel, g, stride)
  assert y.shape == want_y.shape and dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_array_equal(y, want_y)
  assert np.abs(np.asarray(dw)).max() > 1.0  # Non-trivial gradients.
  assert _rel(dx, want_dx) < 1e-6 and _rel(dw, want_dw) < 1e-6


@pytest.mark.parametrize("stride,height,width", GEOMETRIES[:4])
def test_conv3x3_float64_kernel_gradient_equals_the_written_out_sum(stride, height, width):
  with jax.enable_x64(True):
    x, kernel, g = _inputs(jnp.float64, stride, height, width, seed=1, channels=(6, 4))
    (_, want_dx, _), (_, dx, dw) = _both(x, kernel, g, stride)
    assert dx.dtype == dw.dtype == jnp.float64
    assert _rel(dx, want_dx) < 1e-14
    # Independent of XLA: dW[i, j] = sum over positions of x_pad[s h + i, s w + j] g[h, w].
    xn, gn = np.asarray(x), np.asarray(g)
    (top, bottom), (left, right) = reference.conv3x3_padding(xn.shape, stride)
    xp = np.pad(xn, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = gn.shape[1:3]
    direct = np.stack([
        np.einsum("bhwc,bhwo->co",
                  xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride],
                  gn) for i in range(3) for j in range(3)]).reshape(3, 3, 6, 4)
    assert _rel(dw, direct) < 1e-14


def test_tf_same_padding_puts_the_extra_pixel_high_only_when_needed():
  assert reference.same_padding(8, 1) == (1, 1)
  assert reference.same_padding(8, 2) == (0, 1)  # The official downsampling: right/bottom.
  assert reference.same_padding(7, 2) == (1, 1)
  assert reference.same_padding(1, 2) == (1, 1)


def test_conv3x3_bias_and_bfloat16_accumulate_in_float32():
  x, kernel, g = _inputs(jnp.float32, 1, 8, 8, seed=2)
  bias = jnp.arange(6, dtype=jnp.float32)
  np.testing.assert_allclose(reference.conv3x3(x, kernel, 1, bias),
                             _lax(x, kernel, 1) + bias, rtol=1e-6, atol=1e-6)
  _, (_, dx32, dw32) = _both(x, kernel, g, 1)
  xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
  _, (y, dx, dw) = _both(xb, kb, gb.astype(jnp.float32), 1)
  assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
  assert _rel(dx, dx32) < 2e-2 and _rel(dw, dw32) < 2e-2


def test_conv3x3_forward_mode_and_second_order_reverse_mode():
  x, kernel, g = _inputs(jnp.float32, 2, 7, 6, seed=5)
  tangent = jnp.ones_like(kernel)
  want = jax.jvp(lambda w: _lax(x, w, 2), (kernel,), (tangent,))
  got = jax.jvp(lambda w: reference.conv3x3(x, w, 2), (kernel,), (tangent,))
  np.testing.assert_array_equal(got[0], want[0])
  assert _rel(got[1], want[1]) < 1e-6 and np.abs(np.asarray(want[1])).max() > 1.0

  def grad_norm(conv_fn, w):
    dx = jax.grad(lambda a: jnp.vdot(conv_fn(a, w), g))(x)
    return jnp.sum(dx**2)

  want2 = jax.grad(lambda w: grad_norm(lambda a, b: _lax(a, b, 2), w))(kernel)
  got2 = jax.grad(lambda w: grad_norm(lambda a, b: reference.conv3x3(a, b, 2), w))(kernel)
  assert _rel(got2, want2) < 1e-5


def test_conv1x1_is_the_per_pixel_product_plus_bias():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
  kernel = rng.standard_normal((7, 4)).astype(np.float32)
  bias = rng.standard_normal(4).astype(np.float32)
  want = np.einsum("bhwc,co->bhwo", x.astype(np.float64), kernel.astype(np.float64)) + bias
  got = reference.conv1x1(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
  assert got.dtype == jnp.float32 and _rel(got, want) < 1e-6


def test_bad_shapes_and_settings_are_named():
  x, kernel, _ = _inputs(jnp.float32, 1, 4, 4)
  with pytest.raises(ValueError, match=r"\[3, 3, Cin, Cout\]"):
    reference.conv3x3(x, kernel[:, :, :2])
  with pytest.raises(ValueError, match="stride"):
    reference.conv3x3(x, kernel, 0)
  with pytest.raises(ValueError, match=r"\[Cin, Cout\]"):
    reference.conv1x1(x, jnp.ones((5, 2)), jnp.ones(2))
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    reference.dropout(x, jax.random.key(0), 1.0)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_mask_is_flax_dropouts_under_the_same_key(rate):
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 6, 6, 8)), jnp.float32)
  key = jax.random.key(7)
  want = nn.Dropout(rate).apply({}, x, deterministic=False, rng=key)
  got = reference.dropout(x, key, rate)
  np.testing.assert_array_equal(got, want)
  kept = np.asarray(got) != 0
  assert abs(kept.mean() - (1 - rate)) < 0.05
  np.testing.assert_allclose(np.asarray(got)[kept], np.asarray(x)[kept] / (1 - rate),
                             rtol=1e-6)
  np.testing.assert_array_equal(reference.dropout(x, key, 0.0), x)


def test_the_xla_ops_are_the_references_and_resolve_to_themselves():
  assert ops.XLA.name == "xla" and ops.XLA.jit_options() is None
  assert ops.XLA.conv3x3 is reference.conv3x3 and ops.XLA.dropout is reference.dropout
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  assert ops.resolve("xla", mesh) is ops.XLA
  with pytest.raises(ValueError, match="model.kernels"):
    ops.resolve("fast", mesh)
