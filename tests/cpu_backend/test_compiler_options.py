"""The CPU backend's XLA:CPU options (`backends/cpu/compiler_options.py`): XLA's own CPU
convolutions, carried by the backend's `Ops` (config `cpu.compiler_options`), and none
for the pure-JAX operations or off CPU."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from kernel_references import eight_device_mesh
from kernel_references import one_device_mesh

from diffusion_jax import ops
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import compiler_options
from diffusion_jax.ops import reference

pytestmark = pytest.mark.native

CPU_PAIRS = tuple(sorted(compiler_options.CPU_OPTIONS.items()))


def _conv_grad_hlo(options) -> str:
  x = jnp.ones((2, 16, 16, 32))  # Large enough for XLA to offload it by default.
  kernel = jnp.ones((3, 3, 32, 32))
  loss = lambda w, x: jnp.sum(reference.conv3x3(x, w) ** 2)
  fn = jax.jit(jax.value_and_grad(loss), compiler_options=options)
  return fn.lower(kernel, x).compile().as_text()


def test_cpu_programs_keep_convolutions_out_of_ynnpack():
  options = cpu.make_ops(eight_device_mesh()).jit_options()
  assert options == compiler_options.CPU_OPTIONS
  with_options, default = _conv_grad_hlo(options), _conv_grad_hlo(None)
  # XLA's defaults wrap every convolution in a YNNPACK fusion; with the options the
  # forward and both gradients stay XLA convolutions and YNNPACK keeps only the rest.
  ynn_convs = lambda hlo: [l for l in hlo.splitlines()  # A YNNPACK call made for a conv.
                           if "ynn_fusion" in l and 'conv_general_dilated"' in l]
  xla_convs = lambda hlo: [l for l in hlo.splitlines() if " convolution(" in l]
  assert ynn_convs(default) and not ynn_convs(with_options)
  assert len(xla_convs(with_options)) == 2  # The forward and the kernel gradient.


def test_the_backend_carries_the_options_and_the_config_turns_them_off():
  for mesh in (one_device_mesh(), eight_device_mesh()):
    assert cpu.make_ops(mesh).compiler_options == CPU_PAIRS
    assert ops.resolve("auto", mesh).compiler_options == CPU_PAIRS
    off = cpu.make_ops(mesh, compiler_options=False)
    assert off.compiler_options == () and off.jit_options() is None
    assert ops.resolve("native", mesh, cpu_compiler_options=False).compiler_options == ()
  config = ml_collections.ConfigDict({"model": {"kernels": "auto"},
                                      "cpu": {"compiler_options": False}})
  assert ops.from_config(config, one_device_mesh()).compiler_options == ()
  config.cpu.compiler_options = True
  assert ops.from_config(config, one_device_mesh()).jit_options() == (
      compiler_options.CPU_OPTIONS)


def test_the_pure_jax_operations_and_other_platforms_get_no_options():
  assert ops.XLA.compiler_options == () and ops.XLA.jit_options() is None
  assert ops.resolve("xla", one_device_mesh()) is ops.XLA
  for platform in ("gpu", "tpu"):
    # Only the platform of the mesh's devices is read.
    mesh = types.SimpleNamespace(devices=np.asarray([types.SimpleNamespace(
        platform=platform)]))
    assert ops.resolve("auto", mesh) is ops.XLA
    with pytest.raises(ValueError, match=f"runs on {platform}; use model.kernels=auto"):
      ops.resolve("native", mesh)


def test_an_xla_that_rejects_the_option_gets_none(monkeypatch):
  monkeypatch.setattr(compiler_options, "CPU_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NOPE"})
  compiler_options.accepted.cache_clear()
  try:
    assert not compiler_options.accepted()
    assert compiler_options.options() == {}
  finally:
    monkeypatch.undo()
    compiler_options.accepted.cache_clear()
  assert compiler_options.accepted()
  assert compiler_options.options() == compiler_options.CPU_OPTIONS


def test_values_do_not_depend_on_the_options():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 6)), jnp.float32)
  loss = lambda w, x: jnp.sum(reference.conv3x3(x, w) ** 2)
  got = jax.jit(jax.grad(loss), compiler_options=compiler_options.CPU_OPTIONS)(kernel, x)
  want = jax.jit(jax.grad(loss))(kernel, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(want)).max() > 1.0
