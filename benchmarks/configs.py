"""Experiment configs and counted FLOPs for the benchmarks."""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

from benchmarks import harness
from diffusion_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's real data files lie in the shared folder beside the checkout.
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
CIFAR_SUBSET = os.path.join(SHARED_DATA, "cifar10_train_first4000.npz")
MNIST = os.path.join(SHARED_DATA, "mnist.npz")
NETWORKS = {"cifar10": "cifar10.py", "mnist": "mnist.py", "256": "celebahq256.py"}


def load_config(network: str):
  """The experiment config of a network: cifar10, mnist or 256 (configs/<file>)."""
  path = os.path.join(REPO, "configs", NETWORKS[network])
  spec = importlib.util.spec_from_file_location(NETWORKS[network], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@functools.lru_cache(maxsize=None)
def xla_forward_flops(unet_config: models.UNetConfig) -> float:
  """FLOPs of one single-image forward as XLA's cost analysis counts them (no compile).

  Traced with the pure-JAX operations (`ops.XLA`, the U-Net's default): the analysis
  cannot see into the CPU backend's custom calls.
  """
  model = models.UNet(unet_config)
  size = unet_config.image_size
  x = jax.ShapeDtypeStruct((1, size, size, unet_config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  lowered = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(
      models.param_shapes(unet_config), x, t)
  return float(lowered.cost_analysis()["flops"])


def forward_flops(network: str, unet_config: models.UNetConfig) -> tuple[float, str]:
  """Counted FLOPs of one image's forward and where the figure comes from.

  The paper's networks use REFERENCE.md's counts (12.1 GFLOP at 32x32, 496 GFLOP at
  256x256); others use XLA's count scaled by the ratio of the CIFAR10 count to XLA's
  count of the CIFAR10 network (so all figures are counted the same way).
  """
  if network == "cifar10":
    return harness.CIFAR10_FORWARD_FLOPS, "REFERENCE.md"
  if network == "256":
    return harness.LARGE256_FORWARD_FLOPS, "REFERENCE.md"
  cifar = models.unet_config_from(load_config("cifar10"))
  scale = harness.CIFAR10_FORWARD_FLOPS / xla_forward_flops(cifar)
  return scale * xla_forward_flops(unet_config), "XLA cost analysis x CIFAR10 scale"
