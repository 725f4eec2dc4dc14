"""Per-platform XLA options: XLA's own CPU convolutions, and nothing on other platforms."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import compiler_options
from diffusion_jax import sharding
from diffusion_jax.models import conv


def _conv_grad_hlo(options) -> str:
  x = jnp.ones((2, 16, 16, 32))  # Large enough for XLA to offload it by default.
  kernel = jnp.ones((3, 3, 32, 32))
  loss = lambda w, x: jnp.sum(conv.conv3x3(x, w) ** 2)
  fn = jax.jit(jax.value_and_grad(loss), compiler_options=options)
  return fn.lower(kernel, x).compile().as_text()


def test_cpu_programs_keep_convolutions_out_of_ynnpack():
  mesh = sharding.make_mesh(jax.devices()[:2])
  options = compiler_options.for_mesh(mesh)
  assert options == compiler_options.CPU_OPTIONS
  with_options, default = _conv_grad_hlo(options), _conv_grad_hlo(None)
  # XLA's defaults wrap every convolution in a YNNPACK fusion; with the options the
  # forward and both gradients stay XLA convolutions and YNNPACK keeps only the rest.
  ynn_convs = lambda hlo: [l for l in hlo.splitlines()  # A YNNPACK call made for a conv.
                           if "ynn_fusion" in l and 'conv_general_dilated"' in l]
  xla_convs = lambda hlo: [l for l in hlo.splitlines() if " convolution(" in l]
  assert ynn_convs(default) and not ynn_convs(with_options)
  assert len(xla_convs(with_options)) == 2  # The forward and the kernel gradient.


def test_other_platforms_and_the_environment_switch_get_no_options(monkeypatch):
  assert compiler_options.for_platform("gpu") is None
  assert compiler_options.for_platform("tpu") is None
  assert compiler_options.for_default_backend() == compiler_options.CPU_OPTIONS  # CPU here.
  monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "1")
  assert compiler_options.for_platform("cpu") is None
  monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "0")
  assert compiler_options.for_platform("cpu") == compiler_options.CPU_OPTIONS


def test_an_xla_that_rejects_the_option_gets_none(monkeypatch):
  monkeypatch.setattr(compiler_options, "CPU_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NOPE"})
  compiler_options._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access
  try:
    assert compiler_options.for_platform("cpu") is None
  finally:
    monkeypatch.undo()
    compiler_options._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access
  assert compiler_options.for_platform("cpu") == compiler_options.CPU_OPTIONS


def test_values_do_not_depend_on_the_options():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 6)), jnp.float32)
  loss = lambda w, x: jnp.sum(conv.conv3x3(x, w) ** 2)
  got = jax.jit(jax.grad(loss), compiler_options=compiler_options.CPU_OPTIONS)(kernel, x)
  want = jax.jit(jax.grad(loss))(kernel, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(want)).max() > 1.0
