"""The U-Net's 3x3 convolution in both kernel-gradient modes vs autodiff of lax's convolution.

On CPU the smallest convolutions are a product of patches (`conv.PATCHES_MAX_POSITIONS`);
the tests of the convolution itself turn that off (`convolution_path`), the last ones
test the patch product.

The reference is `jax.vjp` of `lax.conv_general_dilated(padding="SAME")` (TF "SAME"
padding, XLA's own derivatives); `conv3x3` must give the same output, input gradient and
kernel gradient for every kernel-gradient mode, stride and parity of the image size.
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from diffusion_jax.models import conv

MODES = ("xla", "matmul")
# (stride, height, width): even and odd sizes, square and not (TF SAME pads high first).
GEOMETRIES = ((1, 8, 8), (1, 5, 7), (2, 8, 8), (2, 7, 6))
# (Cin, Cout): which operand is shifted (the one with fewer channels at stride 1), and
# whether the nine shifted copies are concatenated (<= 64 channels) or not.
CHANNELS = ((4, 6), (6, 4), (72, 80), (80, 72))


@pytest.fixture(name="convolution_path")
def _convolution_path(monkeypatch):
  """The convolution itself on CPU too, at the tests' small sizes (no patch product)."""
  monkeypatch.setattr(conv, "PATCHES_MAX_POSITIONS", 0)


def _reference(x, kernel, stride):
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


def _both(x, kernel, g, stride, mode):
  want, ref_vjp = jax.vjp(lambda a, b: _reference(a, b, stride), x, kernel)
  got, our_vjp = jax.vjp(lambda a, b: conv.conv3x3(a, b, stride, kernel_grad=mode),
                         x, kernel)
  return (want,) + ref_vjp(g), (got,) + jax.jit(our_vjp)(g)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride,height,width", GEOMETRIES)
@pytest.mark.usefixtures("convolution_path")
def test_float32_output_and_gradients_match_lax(mode, stride, height, width):
  x, kernel, g = _inputs(jnp.float32, stride, height, width)
  assert max(_float32_gradient_errors(x, kernel, g, stride, mode)) < 1e-6


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.usefixtures("convolution_path")
def test_float32_gradients_for_each_matmul_layout(channels, stride):
  x, kernel, g = _inputs(jnp.float32, stride, 6, 5, seed=4, channels=channels)
  assert max(_float32_gradient_errors(x, kernel, g, stride, "matmul")) < 1e-6


def _float32_gradient_errors(x, kernel, g, stride, mode) -> tuple[float, float]:
  """Relative errors of dx and dw against lax (after checking dtypes and the forward)."""
  (want_y, want_dx, want_dw), (y, dx, dw) = _both(x, kernel, g, stride, mode)
  assert y.shape == want_y.shape and dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_array_equal(y, want_y)  # The forward is lax's own convolution.
  assert np.abs(np.asarray(dw)).max() > 1.0  # Non-trivial gradients.
  return _rel(dx, want_dx), _rel(dw, want_dw)


@pytest.mark.parametrize("channels", CHANNELS[:2])
@pytest.mark.parametrize("stride,height,width", GEOMETRIES)
@pytest.mark.usefixtures("convolution_path")
def test_float64_gradients_are_exact(stride, height, width, channels):
  with jax.enable_x64(True):
    x, kernel, g = _inputs(jnp.float64, stride, height, width, seed=1, channels=channels)
    cin, cout = channels
    (_, want_dx, want_dw), (_, dx, dw) = _both(x, kernel, g, stride, "matmul")
    assert dx.dtype == dw.dtype == jnp.float64
    assert _rel(dx, want_dx) < 1e-14
    assert _rel(dw, want_dw) < 1e-14
    # Independent of XLA: dW[i, j] = sum over positions of x_pad[s h + i, s w + j] g[h, w].
    xn, gn = np.asarray(x), np.asarray(g)
    (top, bottom), (left, right) = (conv.same_padding(height, stride),
                                    conv.same_padding(width, stride))
    xp = np.pad(xn, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = gn.shape[1:3]
    direct = np.stack([
        np.einsum("bhwc,bhwo->co",
                  xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride],
                  gn) for i in range(3) for j in range(3)]).reshape(3, 3, cin, cout)
    assert _rel(dw, direct) < 1e-14


@pytest.mark.usefixtures("convolution_path")
def test_tf_same_padding_puts_the_extra_pixel_low_only_when_odd():
  assert conv.same_padding(8, 1) == (1, 1)
  assert conv.same_padding(8, 2) == (0, 1)  # The official downsampling: right/bottom.
  assert conv.same_padding(7, 2) == (1, 1)
  assert conv.same_padding(1, 2) == (1, 1)


@pytest.mark.usefixtures("convolution_path")
def test_bfloat16_gradients_keep_dtypes_and_are_close_to_float32():
  x, kernel, g = _inputs(jnp.float32, 1, 8, 8, seed=2)
  _, (_, dx32, dw32) = _both(x, kernel, g, 1, "matmul")
  xb, kb, gb = (a.astype(jnp.bfloat16) for a in (x, kernel, g))
  _, (y, dx, dw) = _both(xb, kb, gb.astype(jnp.float32), 1, "matmul")
  assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16
  assert _rel(dx, dx32) < 2e-2 and _rel(dw, dw32) < 2e-2


def _optimized_kernel_grad_hlo(mode):
  x, kernel, g = _inputs(jnp.float32, 1, 16, 16)
  loss = lambda w, x, g: jnp.vdot(conv.conv3x3(x, w, kernel_grad=mode), g)
  return jax.jit(jax.grad(loss)).lower(kernel, x, g).compile().as_text()


@pytest.mark.usefixtures("convolution_path")
def test_matmul_mode_computes_the_kernel_gradient_without_convolution():
  assert "convolution(" in _optimized_kernel_grad_hlo("xla")
  assert "convolution(" not in _optimized_kernel_grad_hlo("matmul")


@pytest.mark.usefixtures("convolution_path")
def test_default_mode_is_plain_autodiff_so_forward_mode_works():
  x, kernel, _ = _inputs(jnp.float32, 2, 7, 6, seed=5)
  tangent = jnp.ones_like(kernel)
  want = jax.jvp(lambda w: _reference(x, w, 2), (kernel,), (tangent,))
  got = jax.jvp(lambda w: conv.conv3x3(x, w, 2), (kernel,), (tangent,))
  np.testing.assert_array_equal(got[0], want[0])
  assert _rel(got[1], want[1]) < 1e-6 and np.abs(np.asarray(want[1])).max() > 1.0


@pytest.mark.usefixtures("convolution_path")
def test_context_sets_the_default_mode_and_bad_input_is_rejected():
  x, kernel, _ = _inputs(jnp.float32, 1, 4, 4)
  with conv.kernel_gradient("xla"):
    with pytest.raises(ValueError, match="kernel_grad"):
      conv.conv3x3(x, kernel, kernel_grad="fast")
  with pytest.raises(ValueError, match="kernel_grad"):
    with conv.kernel_gradient("fast"):
      pass
  with pytest.raises(ValueError, match=r"\[3, 3, Cin, Cout\]"):
    conv.conv3x3(x, kernel[:, :, :2])
  with pytest.raises(ValueError, match="stride"):
    conv.conv3x3(x, kernel, 0)


@pytest.mark.usefixtures("convolution_path")
def test_second_order_reverse_mode_matches_lax():
  x, kernel, g = _inputs(jnp.float32, 2, 8, 8, seed=3)

  def grad_norm(conv_fn, w):
    dx = jax.grad(lambda a: jnp.vdot(conv_fn(a, w), g))(x)
    return jnp.sum(dx**2)

  want = jax.grad(lambda w: grad_norm(lambda a, b: _reference(a, b, 2), w))(kernel)
  got = jax.grad(lambda w: grad_norm(lambda a, b: conv.conv3x3(a, b, 2), w))(kernel)
  assert _rel(got, want) < 1e-5


# --- Small maps on CPU: the product of 3x3 patches -----------------------------------------

# (stride, height, width) with at most conv.PATCHES_MAX_POSITIONS output positions at
# batch 2, even and odd sizes.
SMALL_GEOMETRIES = ((1, 4, 4), (2, 4, 4), (1, 3, 5), (2, 7, 6), (1, 1, 1))


@pytest.mark.parametrize("stride,height,width", SMALL_GEOMETRIES)
def test_small_maps_use_the_patch_product_and_match_lax_in_float64(stride, height, width):
  with jax.enable_x64(True):
    x, kernel, g = _inputs(jnp.float64, stride, height, width, seed=5, channels=(6, 4))
    assert g.shape[0] * g.shape[1] * g.shape[2] <= conv.PATCHES_MAX_POSITIONS
    (want_y, want_dx, want_dw), (y, dx, dw) = _both(x, kernel, g, stride, "xla")
    assert y.dtype == dx.dtype == dw.dtype == jnp.float64
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
      assert got.shape == want.shape
      assert _rel(got, want) < 1e-13
    # Forward mode works too (plain autodiff of a matrix product).
    tangent = jnp.ones_like(kernel)
    _, jvp = jax.jvp(lambda k: conv.conv3x3(x, k, stride), (kernel,), (tangent,))
    _, want_jvp = jax.jvp(lambda k: _reference(x, k, stride), (kernel,), (tangent,))
    assert _rel(jvp, want_jvp) < 1e-13
  # It really is the patch product: no convolution in the program; a batch with more
  # output positions than the limit gets the convolution.
  hlo = lambda batch: jax.jit(lambda a, b: conv.conv3x3(a, b, stride)).lower(
      jax.ShapeDtypeStruct((batch, height, width, 6), jnp.float32),
      jax.ShapeDtypeStruct((3, 3, 6, 4), jnp.float32)).compile().as_text()
  assert " convolution(" not in hlo(2)
  assert " convolution(" in hlo(conv.PATCHES_MAX_POSITIONS + 1)


def test_small_maps_in_float32_and_bfloat16():
  x, kernel, g = _inputs(jnp.float32, 1, 4, 4, seed=6, channels=(72, 80))
  (want_y, want_dx, want_dw), (y, dx, dw) = _both(x, kernel, g, 1, "xla")
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    assert _rel(got, want) < 1e-6
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  yb = conv.conv3x3(xb, kb, 1)
  assert yb.dtype == jnp.float32  # Products accumulate in float32, as the convolution's.
  assert _rel(yb, _reference(xb, kb, 1)) < 1e-5
