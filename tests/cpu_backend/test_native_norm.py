"""The CPU backend's GroupNorm (+ swish) kernels (`backends/cpu/group_norm.py`) against
float64.

The reference is `kernel_references.group_norm_values_and_grads`: the textbook formula in
float64, its gradients by JAX's autodiff, independent of both the closed form of
`ops.group_norm` and the C++ kernels. Shapes cover batch 1 (one slice), odd batches
(unequal slices on XLA's two threads), 1, some and one-channel groups, inputs whose mean
is far from zero (where a one-pass variance would lose digits) and pre-activations far
beyond the range where exp over- or underflows (the kernel's own exp clamps).

The operations are those of a one-device mesh (`make_ops`), where the kernels are called
directly; the runs over 8 devices are test_per_shard.py's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_references import EPSILON as EPS
from kernel_references import eight_device_mesh
from kernel_references import group_norm_values_and_grads
from kernel_references import one_device_mesh
from kernel_references import rel

from diffusion_jax import ops
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import group_norm as cpu_group_norm
from diffusion_jax.ops import group_norm as ops_group_norm

pytestmark = pytest.mark.native

TARGET = "diffusion_jax_group_norm"


def native_ops():
  """The CPU backend's operations on one device."""
  return cpu.make_ops(one_device_mesh())


def _native_values_and_grads(x, scale, bias, g, groups, swish):
  group_norm = native_ops().group_norm
  f = lambda *a: group_norm(*a, num_groups=groups, epsilon=EPS, swish=swish)
  y, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, scale, bias)
  return (y,) + jax.jit(vjp)(g)


def _inputs(shape, seed, offset=4.0, spread=2.0, scale_size=0.3):
  rng = np.random.default_rng(seed)
  x = (offset + spread * rng.standard_normal(shape)).astype(np.float32)
  scale = (1.0 + scale_size * rng.standard_normal(shape[-1])).astype(np.float32)
  bias = (0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return x, scale, bias, g


def test_the_kernels_are_built_and_registered():
  assert cpu.unavailable_reason() is None


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
  want = group_norm_values_and_grads(x, scale, bias, g, groups, swish)
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert a.dtype == jnp.float32 and a.shape == b.shape, name
    assert rel(a, b) < 2e-6, (name, rel(a, b))


def test_swish_beyond_the_range_of_exp():
  # Pre-activations out to about +-300: exp(-a) over- and underflows in float32 there;
  # the kernel clamps its argument, and swish and its derivative must still be right.
  x, scale, bias, g = _inputs((2, 8, 8, 16), seed=5, scale_size=0.0)
  scale = np.linspace(-150.0, 150.0, 16).astype(np.float32)
  got = _native_values_and_grads(x, scale, bias, g, 4, True)
  want = group_norm_values_and_grads(x, scale, bias, g, 4, True)
  assert np.abs(want[0]).max() > 200.0  # the test reaches far beyond +-88
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert np.all(np.isfinite(a)), name
    assert rel(a, b) < 2e-6, (name, rel(a, b))
  # Elementwise too: no value is far off (float32's x_hat is good to about 1e-7 of it;
  # the scale multiplies that error).
  error = np.abs(np.asarray(got[0], np.float64) - want[0])
  assert np.all(error <= 1e-6 * (np.abs(want[0]) + np.abs(scale)) + 1e-6)


def test_agrees_with_the_xla_version_under_vmap():
  x, scale, bias, g = _inputs((3, 2, 6, 6, 8), seed=9)  # 3 batches of 2
  grads = {}
  for backend in (native_ops(), ops.XLA):
    loss = lambda x, s, b, g, f=backend.group_norm: jnp.vdot(
        f(x, s, b, num_groups=4, epsilon=EPS, swish=True), g)
    grads[backend.name] = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)),
                                           in_axes=(0, None, None, 0)))(x, scale, bias, g)
  for a, b in zip(grads["native"], grads["xla"]):
    assert a.shape == b.shape
    assert rel(a, b) < 1e-5


def _lowered(backend, dtype=jnp.float32, out_dtype=None):
  x = jnp.zeros((2, 4, 4, 8), dtype)
  s = jnp.ones((8,))
  f = lambda x: backend.group_norm(x, s, s, num_groups=4, epsilon=EPS, out_dtype=out_dtype)
  return jax.jit(f).lower(x).as_text()


def test_used_where_the_cpu_backend_is():
  assert TARGET in _lowered(native_ops())
  assert TARGET in _lowered(cpu.make_ops(eight_device_mesh()))
  assert TARGET in _lowered(ops.resolve("auto", one_device_mesh()))
  assert TARGET not in _lowered(ops.XLA)
  assert TARGET not in _lowered(native_ops(), jnp.bfloat16)  # float32 only
  assert TARGET not in _lowered(native_ops(), out_dtype=jnp.bfloat16)
  assert not cpu_group_norm.applies(jnp.zeros(2, jnp.bfloat16), None)
  assert not cpu_group_norm.applies(jnp.zeros(2), jnp.bfloat16)
  assert cpu_group_norm.applies(jnp.zeros(2), jnp.float32)


def test_bad_input_is_named():
  x = jnp.zeros((2, 4, 4, 12))
  s = jnp.ones((12,))
  with pytest.raises(ValueError, match="num_groups=5"):
    ops_group_norm.group_norm(x, s, s, num_groups=5, epsilon=EPS,
                              kernels=cpu_group_norm.KERNELS)
  for mesh in (one_device_mesh(), eight_device_mesh()):  # not an error of shard_map's
    with pytest.raises(ValueError, match="num_groups=5"):
      cpu.make_ops(mesh).group_norm(x, s, s, num_groups=5, epsilon=EPS)
  with pytest.raises(ValueError, match="float32"):
    ops_group_norm.group_norm(x.astype(jnp.bfloat16), s, s, num_groups=4, epsilon=EPS,
                              kernels=cpu_group_norm.KERNELS)
  with pytest.raises(ValueError, match="float32"):
    cpu_group_norm.forward(x, s, s, 4, EPS, False, out_dtype=jnp.bfloat16)
